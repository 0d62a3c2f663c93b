"""Expert parallelism across processes: 2 local processes x 4 CPU devices, one mesh.

The test launches this file twice as a script (`python tests/test_multiprocess.py
WORKER_ID PORT`); the two workers join through `jax.distributed` (gloo collectives
on CPU), build one global 8-device mesh whose expert axis spans both processes, run
the expert-parallel layer (forward and gradients) and compare every addressable
shard with the single-device `jmoe.moe_ffn` run locally on the whole batch. Each
worker prints one MATCH line per check and exits 0 only if all of them hold.
"""

import os
import socket
import subprocess
import sys
import time

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
TIMEOUT_S = 150  # both workers together; the test takes ~30-60 s on 2 cores
# dispatcher@mesh; gradients are checked on the first (the cross-process transposes
# of all_to_all, psum_scatter and the replicated params' psum), outputs on all.
CHECKS = ("dropless@8", "all_gather@8", "all_to_all@8", "dropless@2x4")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_device():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  port = _free_port()
  start = time.time()
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i),
                             str(port)], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  outs = []
  try:
    for p in procs:
      left = max(1.0, TIMEOUT_S - (time.time() - start))
      outs.append(p.communicate(timeout=left)[0])
  finally:
    for p in procs:  # only the workers this test started
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"worker {i} exited {p.returncode}:\n{out[-4000:]}"
    for check in CHECKS:
      assert f"MATCH {check}" in out, f"worker {i} did not match {check}:\n{out[-4000:]}"


# ---------------------------------------------------------------------------
# The worker (runs in a subprocess).


def _worker(process_id: int, port: int) -> None:
  import jax

  jax.config.update("jax_num_cpu_devices", DEVICES_PER_PROCESS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=NUM_PROCESSES, process_id=process_id,
                             initialization_timeout=60)
  import dataclasses

  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh

  import jmoe
  from jmoe import parallel
  from tests.utils import rel_err, tol

  assert jax.process_count() == NUM_PROCESSES and jax.device_count() == 8
  devices = np.array(jax.devices())  # process 0 holds the first 4
  meshes = {
      "8": Mesh(devices, ("expert",)),
      # The expert axis crosses the processes: row d = devices d, d+2, d+4, d+6.
      "2x4": Mesh(devices.reshape(4, 2).T, ("data", "expert")),
  }
  t, d, f, e = 64, 16, 32, 8
  params = jmoe.init_params(jax.random.key(0), d, f, e, shared_d_ff=8)
  x = jax.random.normal(jax.random.key(1), (16, 4, d))
  ct = jax.random.normal(jax.random.key(2), (16, 4, d))
  config = jmoe.MoEConfig()
  cap = dataclasses.replace(config, capacity_factor=1.0)

  def per_shard(x, p):  # the all_to_all rule: capacity mode on each token shard
    ys = [jmoe.moe_ffn(xi, p, cap)[0] for xi in jnp.split(x.reshape(t, d), 8)]
    return jnp.concatenate(ys).reshape(x.shape), None

  def value_and_grad(layer):
    def loss(x, p):
      y = layer(x, p)[0]
      return jnp.sum(y * ct), y
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

  exact = lambda x, p: jmoe.moe_ffn(x, p, config)
  (_, ref_y), ref_grads = jax.tree.map(np.asarray, value_and_grad(exact)(x, params))
  ref_shard_y = np.asarray(jax.jit(per_shard)(x, params)[0])

  def close(out, ref, what):
    """Every addressable shard of the global `out` against the full `ref`."""
    for shard in out.addressable_shards:
      got, want = np.asarray(shard.data), ref[shard.index]
      err = rel_err(got, want)
      assert err < tol(jnp.float32), f"{what} shard {shard.index}: rel err {err:.3g}"

  for check in CHECKS:
    dispatcher, mesh_name = check.split("@")
    ep = parallel.ExpertParallel(
        meshes[mesh_name], dispatcher=dispatcher,
        capacity_factor=1.0 if dispatcher == "all_to_all" else None)
    xs, ps = parallel.shard_inputs(x, ep), parallel.shard_params(params, ep)
    layer = lambda a, b: ep.moe_ffn(a, b, config)
    if check == CHECKS[0]:
      (_, y), (dx, dp) = value_and_grad(layer)(xs, ps)
      rdx, rdp = ref_grads
      close(dx, rdx, f"{check} dx")
      for name in ("router", "w_up", "w_down", "w_gate"):
        close(getattr(dp, name), getattr(rdp, name), f"{check} d{name}")
    else:
      y = jax.jit(layer)(xs, ps)[0]
    assert not y.is_fully_addressable  # a real global array over both processes
    close(y, ref_shard_y if dispatcher == "all_to_all" else ref_y, f"{check} y")
    print(f"MATCH {check}", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]))
