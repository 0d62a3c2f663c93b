"""Expert parallelism on 8 fake CPU devices against the single-device layer.

Oracle: `jmoe.moe_ffn` on one device. "dropless" and "all_gather" must equal it on
the whole batch; "all_to_all" must equal it run on each token shard separately with
the per-shard capacity (its documented rule), with the aux metrics of the whole
batch. Outputs, every aux field and the gradients (x, router, experts, shared
expert) are compared at float32 tolerance.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

import jmoe
from jmoe import parallel
from tests.utils import assert_rel, assert_tree_rel

T, D, F, E, K = 64, 16, 32, 8, 2
X_SHAPE = (16, 4, D)  # 64 tokens; the leading dim is what the data axes split
SHARDS = 8  # token shards on every mesh below (all 8 devices)
CF = 1.0  # per-shard capacity factor of the all_to_all tests: C = 2 rows / expert

MESHES = {
    "8": ((8,), ("expert",)),
    "2x4": ((2, 4), ("data", "expert")),
    "4x2": ((4, 2), ("data", "expert")),
}
DISPATCHERS = ("dropless", "all_to_all", "all_gather")
CONFIG = jmoe.MoEConfig()
# A token mask whose shards keep different numbers of tokens (shard s of the 8
# holds rows 2s, 2s+1 of x [16, 4, D]).
MASK = np.random.default_rng(0).random(X_SHAPE[:-1]) < 0.6
MASK[:2] = False  # shard 0 keeps nothing
MASK[2:4] = True  # shard 1 keeps everything


@functools.cache
def mesh(name, auto=False):
  shape, names = MESHES[name]
  types = (AxisType.Auto,) * len(shape) if auto else None
  return jax.make_mesh(shape, names, axis_types=types)


@functools.cache
def inputs():
  # A (zero) router bias in every test keeps one pytree structure, so the skewed
  # routings below reuse the compiled functions.
  params = jmoe.init_params(jax.random.key(0), D, F, E, shared_d_ff=8,
                            shared_gate=True, router_bias=True)
  x = jax.random.normal(jax.random.key(1), X_SHAPE, jnp.float32)
  ct = jax.random.normal(jax.random.key(2), X_SHAPE, jnp.float32)
  return x, params, ct


def skewed(params, bias):
  """Same params with a selection bias: routing forced by `bias`."""
  return dataclasses.replace(params, router_bias=jnp.asarray(bias, jnp.float32))


def loss(y, aux, ct):
  return (jnp.sum(y.astype(jnp.float32) * ct) + aux.balance_loss
          + 0.1 * aux.z_loss + 0.01 * aux.router_entropy)


def _value_and_grads(layer):
  """jit(x, params, ct -> (y, aux, extra), (dx, dparams))."""
  def f(x, params, ct):
    out = layer(x, params)
    return loss(out[0], out[1], ct), out
  g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
  return jax.jit(lambda x, p, ct: (lambda r: (r[0][1], r[1]))(g(x, p, ct)))


def _key(seed):
  return None if seed is None else jax.random.key(seed)


def _mask(masked):
  return MASK if masked else None


@functools.cache
def reference(config=CONFIG, seed=None, masked=False):
  """Single-device moe_ffn on the whole batch: (y, aux), grads."""
  return _value_and_grads(lambda x, p: jmoe.moe_ffn(
      x, p, config, key=_key(seed), mask=_mask(masked)))


def _per_shard(x, params, config, cf, mask=None, shards=SHARDS):
  """The documented all_to_all rule on one device: capacity mode on each shard."""
  cap = dataclasses.replace(config, capacity_factor=cf)
  split = lambda a: jnp.split(a.reshape(-1, *a.shape[2:]), shards)  # token order
  ms = [None] * shards if mask is None else split(jnp.asarray(mask))
  outs = [jmoe.moe_ffn(xi, params, cap, mask=mi) for xi, mi in zip(split(x), ms)]
  # routing-only metrics: whole batch
  _, full = jmoe.moe_ffn(x, params, config, mask=mask)
  slots = [K * (xi.shape[0] if mi is None else jnp.sum(mi))
           for xi, mi in zip(split(x), ms)]
  dropped = sum(a.dropped_fraction * n for (_, a), n in zip(outs, slots))
  aux = dataclasses.replace(full, dropped_fraction=dropped / jnp.maximum(sum(slots), 1))
  return jnp.concatenate([y for y, _ in outs]).reshape(x.shape), aux


@functools.cache
def shard_reference(config=CONFIG, cf=CF, masked=False):
  return _value_and_grads(lambda x, p: _per_shard(x, p, config, cf, _mask(masked)))


@functools.cache
def expert_parallel(ep, config=CONFIG, seed=None, masked=False):
  return _value_and_grads(lambda x, p: ep.moe_ffn_with_stats(
      x, p, config, key=_key(seed), mask=_mask(masked)))


def run(ep, x, params, ct, config=CONFIG, seed=None, masked=False):
  """The expert-parallel layer and its reference; returns the stats."""
  xs, ps = parallel.shard_inputs(x, ep), parallel.shard_params(params, ep)
  (y, aux, stats), grads = expert_parallel(ep, config, seed, masked)(xs, ps, ct)
  if ep.dispatcher == "all_to_all":
    (ry, raux), rgrads = shard_reference(config, ep.capacity_factor, masked)(
        x, params, ct)
  else:
    (ry, raux), rgrads = reference(config, seed, masked)(x, params, ct)
  what = f"{ep.dispatcher} on {dict(ep.mesh.shape)}"
  assert y.shape == x.shape and y.dtype == x.dtype
  assert_rel(y, ry, x.dtype, f"{what}: y")
  assert_tree_rel(aux, raux, jnp.float32, f"{what}: aux")
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert),
                                np.asarray(raux.tokens_per_expert))
  assert_tree_rel(grads, rgrads, x.dtype, f"{what}: grads")
  return aux, stats


def make_ep(mesh_name, dispatcher, **kw):
  if dispatcher == "all_to_all":
    kw.setdefault("capacity_factor", CF)
  if dispatcher == "dropless":
    kw.setdefault("dropless_bound", 3.0)  # a2a path for this routing (checked)
  return parallel.ExpertParallel(mesh(mesh_name), dispatcher=dispatcher, **kw)


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_matches_single_device(dispatcher, mesh_name):
  x, params, ct = inputs()
  ep = make_ep(mesh_name, dispatcher)
  aux, stats = run(ep, x, params, ct)
  assert int(stats.fallback) == 0  # the all-to-all path itself was compared
  assert int(stats.max_block_rows) <= int(stats.block_rows)
  if dispatcher == "all_to_all":
    assert float(aux.dropped_fraction) > 0  # the capacity rule was exercised


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_pallas_kernels_inside_shard_map(dispatcher):
  """The same per-shard code with jmoe's Pallas grouped matmul (interpreted on
  CPU) in place of XLA's: values, aux and gradients still match one device."""
  x, params, ct = inputs()
  config = dataclasses.replace(CONFIG, gmm_implementation="pallas_interpret")
  run(make_ep("2x4", dispatcher), x, params, ct, config)


@pytest.mark.parametrize("mesh_name", ["8", "2x4"])
def test_dropless_overflow_falls_back(mesh_name):
  """Every token on experts 0 and 1 (device 0): blocks overflow, the all-gather
  path runs, nothing is dropped, experts 2..7 get zero tokens."""
  x, params, ct = inputs()
  params = skewed(params, [10.0, 9.0] + [0.0] * (E - 2))
  ep = make_ep(mesh_name, "dropless", dropless_bound=2.0)
  aux, stats = run(ep, x, params, ct)
  assert int(stats.fallback) == 1
  assert int(stats.max_block_rows) > int(stats.block_rows)
  np.testing.assert_array_equal(np.asarray(aux.tokens_per_expert),
                                [T, T] + [0] * (E - 2))
  assert float(aux.dropped_fraction) == 0.0


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_zero_token_experts(dispatcher):
  """Experts 6 and 7 (device 3 of the 2x4 mesh) get no tokens at all."""
  x, params, ct = inputs()
  params = skewed(params, [0.0] * (E - 2) + [-100.0, -100.0])
  aux, stats = run(make_ep("2x4", dispatcher), x, params, ct)
  assert np.all(np.asarray(aux.tokens_per_expert)[-2:] == 0)
  if dispatcher == "dropless":
    assert int(stats.fallback) == 0


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_tokens_replicated_over_expert_axis(dispatcher):
  """data_axes=("data",): x split over "data" only; the layer splits each data
  shard's tokens over the expert axis itself (still 8 token shards)."""
  x, params, ct = inputs()
  ep = make_ep("2x4", dispatcher, data_axes=("data",))
  assert ep.num_token_shards == SHARDS
  run(ep, x, params, ct)


def test_batch_axes_fit_the_batch():
  ep = parallel.ExpertParallel(mesh("2x4"))
  assert ep.data_axes is None
  assert ep.batch_axes() == ep.batch_axes(16) == ("data", "expert")
  assert ep.batch_axes(2) == ep.batch_axes(6) == ("data",)
  assert ep.batch_axes(4) == ("data",) and ep.batch_axes(1) == ()
  assert ep.token_axes_for(2 * 8, 2) == ("data", "expert")  # 8 tokens per shard
  assert ep.token_axes_for(2 * 3, 2) == ("data",)  # 3 tokens: replicated
  assert ep.input_spec(2) == jax.sharding.PartitionSpec("data")
  assert parallel.ExpertParallel(mesh("4x2")).batch_axes(2) == ("expert",)
  given = parallel.ExpertParallel(mesh("2x4"), data_axes="data")
  assert given.batch_axes(8) == given.batch_axes(1) == ("data",)


@functools.cache
def small_reference(config, cf, shards):
  if cf is None:
    return reference(config)
  return _value_and_grads(lambda x, p: _per_shard(x, p, config, cf, shards=shards))


@pytest.mark.parametrize("dispatcher,mesh_name,shape,shards", [
    # over "data"; 3 tokens per shard: not over "expert"
    ("dropless", "2x4", (2, 3, D), 2),
    ("all_to_all", "2x4", (2, 3, D), 2),
    # a batch of 1: every device holds the same 5 tokens
    ("all_gather", "8", (1, 5, D), 1),
])
def test_small_batches_replicate_tokens_over_the_expert_axis(
    dispatcher, mesh_name, shape, shards):
  """Batches too small to split over every device (decoding): the layer keeps
  each batch shard's tokens on every device of the expert axis, runs its local
  experts and sums; values, aux and gradients equal one device (for
  "all_to_all": the per-shard rule on each batch shard)."""
  x = jax.random.normal(jax.random.key(3), shape, jnp.float32)
  ct = jax.random.normal(jax.random.key(4), shape, jnp.float32)
  _, params, _ = inputs()
  ep = make_ep(mesh_name, dispatcher)
  assert ep.expert_axis not in ep.token_axes_for(shape[0] * shape[1], shape[0])
  xs, ps = parallel.shard_inputs(x, ep), parallel.shard_params(params, ep)
  (y, aux, stats), grads = expert_parallel(ep)(xs, ps, ct)
  cf = ep.capacity_factor if dispatcher == "all_to_all" else None
  (ry, raux), rgrads = small_reference(CONFIG, cf, shards)(x, params, ct)
  assert y.sharding.is_equivalent_to(ep.input_sharding(shape[0]), y.ndim)
  assert_rel(y, ry, jnp.float32, "y")
  assert_tree_rel(aux, raux, jnp.float32, "aux")
  assert_tree_rel(grads, rgrads, jnp.float32, "grads")
  assert int(stats.fallback) == 0
  assert int(stats.max_block_rows) <= int(stats.block_rows)


@pytest.mark.parametrize("dispatcher", ["dropless", "all_gather"])
def test_exact_dispatchers_follow_global_capacity(dispatcher):
  """MoEConfig.capacity_factor under an exact dispatcher: the single-device
  capacity of the whole batch (first C pairs of each expert in token order)."""
  x, params, ct = inputs()
  config = jmoe.MoEConfig(capacity_factor=0.75)
  aux, _ = run(make_ep("2x4", dispatcher), x, params, ct, config)
  assert float(aux.dropped_fraction) > 0


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_token_mask(dispatcher):
  """A mask whose shards keep 0, all or some of their tokens: as one device
  (itself tested against the oracle without the masked tokens), gradients too;
  masked tokens give zeros. The exact dispatchers run with a global capacity."""
  x, params, ct = inputs()
  config = CONFIG if dispatcher == "all_to_all" else jmoe.MoEConfig(
      capacity_factor=0.75)
  aux, _ = run(make_ep("2x4", dispatcher), x, params, ct, config, masked=True)
  assert int(jnp.sum(aux.tokens_per_expert)) == K * int(MASK.sum())
  assert float(aux.dropped_fraction) > 0
  ep = make_ep("2x4", dispatcher)
  y, _ = jax.jit(lambda a, b: ep.moe_ffn(a, b, config, mask=MASK))(
      parallel.shard_inputs(x, ep), parallel.shard_params(params, ep))
  assert np.all(np.asarray(y)[~MASK] == 0)


def test_deterministic_uses_the_eval_capacity_and_no_noise():
  x, params, ct = inputs()
  config = jmoe.MoEConfig(capacity_factor=0.5, eval_capacity_factor=0.75,
                          noise_std=1.0)
  ep = make_ep("2x4", "dropless")
  y, aux = jax.jit(lambda a, b: ep.moe_ffn(a, b, config, key=jax.random.key(3),
                                           deterministic=True))(
      parallel.shard_inputs(x, ep), parallel.shard_params(params, ep))
  ry, raux = jax.jit(jmoe.moe_ffn, static_argnums=2)(
      x, params, jmoe.MoEConfig(capacity_factor=0.75))
  assert_rel(y, ry, jnp.float32, "eval y")
  assert_tree_rel(aux, raux, jnp.float32, "eval aux ")
  assert float(aux.dropped_fraction) > 0


def test_router_noise_matches_whole_batch_draws():
  x, params, ct = inputs()
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(jitter_eps=0.1, noise_std=0.5))
  run(make_ep("2x4", "dropless"), x, params, ct, config, seed=7)


def test_all_to_all_takes_capacity_from_config():
  x, params, ct = inputs()
  config = jmoe.MoEConfig(capacity_factor=CF)
  ep = parallel.ExpertParallel(mesh("8"), dispatcher="all_to_all")
  xs, ps = parallel.shard_inputs(x, ep), parallel.shard_params(params, ep)
  y, aux = jax.jit(lambda a, b: ep.moe_ffn(a, b, config))(xs, ps)
  (ry, raux), _ = shard_reference(CONFIG, CF)(x, params, ct)  # compiled already
  assert_rel(y, ry, jnp.float32, "y")
  assert_tree_rel(aux, raux, jnp.float32, "aux")


def test_bfloat16_and_auto_mesh():
  """bf16 activations and weights on a mesh of Auto axes (with_sharding_constraint)."""
  x, params, _ = inputs()
  x = x.astype(jnp.bfloat16)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  ep = parallel.ExpertParallel(mesh("2x4", auto=True), data_axes="data")
  y, aux = jax.jit(ep.moe_ffn)(parallel.shard_inputs(x, ep),
                               parallel.shard_params(params, ep))
  ry, raux = jax.jit(jmoe.moe_ffn)(x, params)
  assert y.dtype == jnp.bfloat16
  assert_rel(y, ry, jnp.bfloat16, "bf16 y")
  assert_rel(aux.balance_loss, raux.balance_loss, jnp.float32, "bf16 balance")


def test_bfloat16_outputs_equal_one_device_bitwise():
  """bf16 x and weights: every dispatcher, and the small-batch path, give one
  device's output bit for bit (partial combines are summed in float32)."""
  x, params, _ = inputs()
  x = x.astype(jnp.bfloat16)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  for ep, xi in ((make_ep("2x4", "all_gather"), x),
                 (make_ep("2x4", "dropless"), x),
                 (make_ep("2x4", "dropless"), x[:2, :3])):
    y, _ = jax.jit(ep.moe_ffn)(parallel.shard_inputs(xi, ep),
                               parallel.shard_params(params, ep))
    ry, _ = jax.jit(jmoe.moe_ffn)(xi, params)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(ry, np.float32))


def test_nonfinite_tokens_are_counted_globally():
  x, params, _ = inputs()
  x = x.at[3, 1, 0].set(jnp.nan).at[12, 0, 5].set(jnp.inf)
  ep = make_ep("4x2", "dropless")
  _, aux = jax.jit(ep.moe_ffn)(parallel.shard_inputs(x, ep),
                               parallel.shard_params(params, ep))
  _, raux = jax.jit(jmoe.moe_ffn)(x, params)
  assert int(aux.nonfinite_tokens) == int(raux.nonfinite_tokens) == 2


def test_sharding_helpers():
  x, params, _ = inputs()
  ep = make_ep("2x4", "dropless")
  ps = parallel.shard_params(params, ep)
  assert ps.w_up.sharding.spec == jax.sharding.PartitionSpec("expert")
  assert ps.router.sharding.spec == jax.sharding.PartitionSpec()
  assert ps.w_up.addressable_shards[0].data.shape == (E // 4, D, F)
  xs = parallel.shard_inputs(x, ep)
  assert xs.sharding.spec == jax.sharding.PartitionSpec(("data", "expert"))
  y, _ = jax.jit(ep.moe_ffn)(xs, ps)
  assert y.sharding.is_equivalent_to(xs.sharding, y.ndim)
  assert hash(ep) == hash(make_ep("2x4", "dropless"))  # usable as a static arg


# ----------------------------------------------------------------- errors


def test_error_experts_not_divisible():
  x, _, _ = inputs()
  params = jmoe.init_params(jax.random.key(0), D, F, 6)
  ep = parallel.ExpertParallel(mesh("2x4"))
  with pytest.raises(ValueError, match=r"experts \(6.*divisible.*expert_axis.*\(4\)"):
    ep.moe_ffn(x, params)


def test_error_batch_not_divisible_by_given_data_axes():
  _, params, _ = inputs()
  ep = parallel.ExpertParallel(mesh("8"), data_axes="expert")
  with pytest.raises(ValueError, match=r"leading dimension \(12.*data_axes.*\(8\)"):
    ep.moe_ffn(jnp.zeros((12, D)), params)


def test_error_unknown_axes():
  m = mesh("2x4")
  with pytest.raises(ValueError, match=r"`expert_axis`='experts'.*\('data', 'expert'\)"):
    parallel.ExpertParallel(m, expert_axis="experts")
  with pytest.raises(ValueError, match=r"'batch' in `data_axes`.*\('data', 'expert'\)"):
    parallel.ExpertParallel(m, data_axes=("batch",))


def test_error_bad_options():
  m = mesh("8")
  with pytest.raises(ValueError, match=r"`dispatcher`='ragged'.*'all_to_all'"):
    parallel.ExpertParallel(m, dispatcher="ragged")
  with pytest.raises(ValueError, match="capacity_factor"):
    parallel.ExpertParallel(m, dispatcher="dropless", capacity_factor=1.0)
  with pytest.raises(ValueError, match="dropless_bound"):
    parallel.ExpertParallel(m, dropless_bound=0.5)
  x, params, _ = inputs()
  with pytest.raises(ValueError, match="needs a capacity factor"):
    parallel.ExpertParallel(m, dispatcher="all_to_all").moe_ffn(x, params)
  config = jmoe.MoEConfig(router=jmoe.RouterConfig(kind="expert_choice"))
  with pytest.raises(ValueError, match="expert-choice"):
    parallel.ExpertParallel(m).moe_ffn(x, params, config)


# ------------------------------------------------------------------------------
# exchange="ragged_all_to_all": the offset/size tables on CPU, the dispatcher with
# the collective emulated (XLA:CPU has no ragged-all-to-all), the real collective
# under the gpu marker.
# ------------------------------------------------------------------------------


def _simulate_ragged(operands, tables):
  """numpy: `lax.ragged_all_to_all` on n devices, as its docstring specifies:
  update i of device src goes to device i // splits, rows
  operand[in_off[i]:+send[i]] written at out_off[i] there; outputs start zero.
  Also checks send_sizes == all_to_all(recv_sizes)."""
  n = len(operands)
  outs = [np.zeros_like(o) for o in operands]
  send = np.stack([t[1] for t in tables]).reshape(n, n, -1)  # [src, dst, u]
  recv = np.stack([t[3] for t in tables]).reshape(n, n, -1)  # [dst, src, u]
  np.testing.assert_array_equal(send, recv.transpose(1, 0, 2))
  for src, (in_off, sizes, out_off, _) in enumerate(tables):
    per = len(in_off) // n
    for i in range(len(in_off)):
      dst, a, m, o = i // per, in_off[i], sizes[i], out_off[i]
      assert 0 <= m and a + m <= len(operands[src]) and o + m <= len(outs[dst])
      outs[dst][o:o + m] = operands[src][a:a + m]
  return outs


@pytest.mark.parametrize("n,block,splits", [(2, 7, 1), (4, 5, 3), (8, 6, 32)])
def test_ragged_tables_move_the_routed_rows_of_each_block(n, block, splits):
  """Random counts (empty and full blocks included): with the tables, the ragged
  exchange gives what an all_to_all of the whole blocks gives, every row past a
  block's count zero."""
  rng = np.random.default_rng(n * 100 + block)
  counts = rng.integers(0, block + 1, (n, n))  # counts[src, dst]
  counts[0, :] = 0
  counts[:, -1] = block
  operands = []
  for src in range(n):
    buf = np.zeros((n * block, 3), np.float32)
    for dst in range(n):
      buf[dst * block:dst * block + counts[src, dst]] = rng.normal(
          size=(counts[src, dst], 3)) + 1.0
    operands.append(buf)
  tables = [[np.asarray(a) for a in parallel.ragged_tables(
      jnp.asarray(counts[me]), jnp.asarray(counts[:, me]), jnp.asarray(me), block,
      splits)] for me in range(n)]
  for t in tables:
    assert all(a.shape == (n * splits,) and a.dtype == np.int32 for a in t)
  got = _simulate_ragged(operands, tables)
  for dst in range(n):  # all_to_all of the whole blocks
    want = np.concatenate([operands[src][dst * block:(dst + 1) * block]
                           for src in range(n)])
    np.testing.assert_array_equal(got[dst], want)


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                output_offsets, recv_sizes, *, axis_name):
  """`lax.ragged_all_to_all` from `lax.all_to_all` (differentiable), for CPU
  meshes: every row of the operand goes to each device with its target row there
  (or none), and the receiver writes the rows it was sent."""
  del recv_sizes  # the receiver side follows the senders (tables checked above)
  n = jax.lax.axis_size(axis_name)
  rows = operand.shape[0]
  r = jnp.arange(rows)[None, :]
  inside = (r >= input_offsets[:, None]) & (r < (input_offsets + send_sizes)[:, None])
  target = jnp.where(inside, output_offsets[:, None] + r - input_offsets[:, None], -1)
  target = target.reshape(n, -1, rows).max(axis=1)  # [dst, rows], updates disjoint
  payload = jnp.broadcast_to(operand[None], (n,) + operand.shape)
  got = jax.lax.all_to_all(payload, axis_name, 0, 0)
  where = jax.lax.all_to_all(target, axis_name, 0, 0).reshape(-1)
  where = jnp.where(where < 0, output.shape[0], where)
  return output.at[where].set(got.reshape((-1,) + operand.shape[1:]), mode="drop")


@pytest.fixture
def emulated_ragged(monkeypatch):
  monkeypatch.setattr(parallel, "_RAGGED_UNSUPPORTED", ())
  monkeypatch.setattr(parallel, "_ragged_all_to_all", _emulated_ragged_all_to_all)


@pytest.mark.parametrize("dispatcher,mesh_name", [("dropless", "2x4"),
                                                  ("all_to_all", "8")])
def test_ragged_exchange_equals_the_all_to_all_exchange(emulated_ragged, dispatcher,
                                                        mesh_name):
  """exchange="ragged_all_to_all" (emulated collective): outputs, aux and
  gradients equal the default exchange's bit for bit, and match one device; with
  experts of zero tokens."""
  x, params, ct = inputs()
  params = skewed(params, [0.0] * (E - 2) + [-100.0, -100.0])
  ep = make_ep(mesh_name, dispatcher, exchange="ragged_all_to_all", ragged_splits=3)
  run(ep, x, params, ct)
  xs = parallel.shard_inputs(x, ep)
  ps = parallel.shard_params(params, ep)
  base = dataclasses.replace(ep, exchange="all_to_all")
  got = expert_parallel(ep)(xs, ps, ct)
  want = expert_parallel(base)(xs, ps, ct)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_ragged_exchange_options_are_checked():
  m = mesh("8")
  with pytest.raises(ValueError, match="XLA on 'cpu' does not implement"):
    parallel.ExpertParallel(m, exchange="ragged_all_to_all")
  with pytest.raises(ValueError, match=r"`exchange`='ragged'"):
    parallel.ExpertParallel(m, exchange="ragged")
  with pytest.raises(ValueError, match="ragged_splits"):
    parallel.ExpertParallel(m, ragged_splits=0)
  with pytest.raises(ValueError, match="all_gather"):
    parallel.ExpertParallel(m, dispatcher="all_gather", exchange="ragged_all_to_all")


@pytest.mark.gpu
def test_ragged_exchange_on_the_gpu():
  """The real collective, on the local GPUs (a 1-device mesh on one GPU):
  equal to the default exchange, bit for bit."""
  gpus = jax.devices("gpu")
  n = 2 if len(gpus) >= 2 else 1
  m = jax.make_mesh((n,), ("expert",), devices=gpus[:n])
  x, params, ct = inputs()
  ep = parallel.ExpertParallel(m, exchange="ragged_all_to_all", dropless_bound=3.0)
  xs, ps = parallel.shard_inputs(x, ep), parallel.shard_params(params, ep)
  got = expert_parallel(ep)(xs, ps, ct)
  want = expert_parallel(dataclasses.replace(ep, exchange="all_to_all"))(xs, ps, ct)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
