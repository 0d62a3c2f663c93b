"""Test session set-up: 8 fake CPU devices, float32 matmuls at full precision.

`jax_num_cpu_devices` must be set before any JAX computation, so it lives here.
Single-device tests run on device 0; multi-device tests build meshes over all 8.
"""

import jax

# Harmless where a GPU is present: it only sizes the CPU backend.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  """GPU tests run only where a GPU is present (the lent H200), never in CI;
  `cpu` tests (the CPU backend's defaults, or a mesh of the 8 fake CPU devices
  on the default backend) only where the default backend is the CPU."""
  has_gpu = any(d.platform == "gpu" for d in jax.devices())
  on_cpu = jax.default_backend() == "cpu"
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
  skip_cpu = pytest.mark.skip(reason="assumes the CPU backend (8 fake devices)")
  for item in items:
    if "gpu" in item.keywords and not has_gpu:
      item.add_marker(skip)
    if "cpu" in item.keywords and not on_cpu:
      item.add_marker(skip_cpu)
