"""`AttentionConfig.implementation`: which `jax.nn.dot_product_attention` runs.

CPU (CI): the option is validated, None resolves to XLA there, an explicit "cudnn"
that cannot run says why, and "xla" / None give the same output. GPU (the `gpu`
marker, on the H200): cuDNN flash attention and XLA, both in bf16, against the same
float32 oracle (XLA attention of float32 inputs), forward and gradients.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe.nn as jnn
from jmoe._src.nn import attention as attention_lib
from tests.utils import assert_rel, rel_err


def _attention(implementation, dtype=jnp.float32, d=64, heads=4, kv=2):
  return jnn.Attention(d, heads, num_kv_heads=kv, implementation=implementation,
                       dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.cpu
def test_option_is_validated_and_resolved_on_cpu():
  with pytest.raises(ValueError, match="implementation"):
    jnn.AttentionConfig(num_heads=4, implementation="flash")
  assert attention_lib.attention_implementation(None, jnp.bfloat16, 64) == "xla"
  assert attention_lib.attention_implementation("xla", jnp.bfloat16, 64) == "xla"
  with pytest.raises(ValueError, match="implementation='cudnn' cannot run.*GPU"):
    attention_lib.attention_implementation("cudnn", jnp.bfloat16, 64)
  # The flat keyword of TransformerConfig reaches the attention.
  cfg = jnn.TransformerConfig.make(64, 64, 1, 4, 64, implementation="xla")
  assert cfg.attention.implementation == "xla"


def test_xla_and_default_agree_on_cpu():
  x = jax.random.normal(jax.random.key(1), (2, 16, 64), jnp.float32)
  y_default = _attention(None)(x)
  y_xla = _attention("xla")(x)
  np.testing.assert_array_equal(np.asarray(y_default), np.asarray(y_xla))


@pytest.mark.gpu
@pytest.mark.parametrize("seq,head_dim", [(128, 64), (256, 128)])
def test_cudnn_matches_xla_against_a_float32_oracle(seq, head_dim):
  heads, kv = 8, 2
  d = heads * head_dim
  assert attention_lib.cudnn_attention_fits(jnp.bfloat16, head_dim) is None
  assert attention_lib.attention_implementation(None, jnp.bfloat16,
                                                head_dim) == "cudnn"
  x = jax.random.normal(jax.random.key(2), (2, seq, d), jnp.float32)
  dy = jax.random.normal(jax.random.key(3), (2, seq, d), jnp.float32)

  def run(impl, dtype):
    m = _attention(impl, dtype, d, heads, kv)
    graph, params = nnx.split(m)

    def f(params, x):
      y = nnx.merge(graph, params)(x.astype(dtype)).astype(jnp.float32)
      return jnp.sum(y * dy), y

    (_, y), (gp, gx) = jax.jit(jax.value_and_grad(f, argnums=(0, 1),
                                                  has_aux=True))(params, x)
    return y, gx, gp

  ref = run("xla", jnp.float32)
  for impl in ("cudnn", None):
    out = run(impl, jnp.bfloat16)
    xla = run("xla", jnp.bfloat16)
    for name, o, b, r in zip(("y", "dx", "dparams"), out, xla, ref):
      o, b, r = (jax.tree.leaves(t) for t in (o, b, r))
      for oi, bi, ri in zip(o, b, r):
        assert_rel(oi, ri, jnp.bfloat16, f"{impl} {name}")
        # cuDNN is no less accurate than XLA in the same dtype (2x slack).
        assert rel_err(oi, ri) <= 2 * rel_err(bi, ri) + 1e-3, f"{impl} {name}"
