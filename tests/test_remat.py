"""Named residuals: `moe_ffn` tags its intermediates for `jax.checkpoint` policies.

Every documented name appears in the layer's jaxpr, a `save_only_these_names`
policy saves exactly what it names (jax's own `print_saved_residuals` says so),
and every policy gives the gradients of the layer without remat.
"""

import contextlib
import io

import jax
import jax.extend
import jax.numpy as jnp
import pytest

import jmoe
from jmoe._src import moe as moe_lib
from tests.test_moe import make
from tests.utils import assert_tree_rel

POLICIES = jax.checkpoint_policies


def _names_in(jaxpr) -> set[str]:
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "name":
      found.add(eqn.params["name"])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found |= _names_in(sub)
  return found


def _setup(shared=False):
  x, params = make(jax.random.key(0), shared=shared)
  config = jmoe.MoEConfig(top_k=2)
  dy = jax.random.normal(jax.random.key(1), x.shape)

  def loss(params, x):
    y, aux = jmoe.moe_ffn(x, params, config)
    return jnp.sum(y * dy) + 0.01 * aux.balance_loss + 0.001 * aux.z_loss

  return loss, params, x


def test_every_documented_name_is_in_the_layer():
  loss, params, x = _setup(shared=True)
  found = _names_in(jax.make_jaxpr(loss)(params, x).jaxpr)
  assert set(moe_lib.CHECKPOINT_NAMES) <= found, set(moe_lib.CHECKPOINT_NAMES) - found
  # The shared expert is a dense FFN: its names are ffn's.
  assert {moe_lib.FFN_GATE, moe_lib.FFN_UP, moe_lib.FFN_HIDDEN} <= found
  assert jmoe.MOE_CHECKPOINT_NAMES == moe_lib.CHECKPOINT_NAMES


def test_save_only_these_names_saves_what_it_names():
  loss, params, x = _setup()
  keep = (moe_lib.UP, moe_lib.GATE)
  f = jax.checkpoint(loss, policy=POLICIES.save_only_these_names(*keep))
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(f, params, x)
  saved = buf.getvalue()
  for name in keep:
    assert f"named '{name}'" in saved, saved
  for name in set(moe_lib.CHECKPOINT_NAMES) - set(keep):
    assert f"named '{name}'" not in saved, saved


@pytest.fixture(scope="module")
def layer():
  loss, params, x = _setup(shared=True)
  want = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  return loss, params, x, want


@pytest.mark.parametrize("policy", [
    "nothing_saveable", "everything_saveable", "dots_saveable",
    "only_names", "all_but_hidden"])
def test_every_policy_gives_the_same_gradients(layer, policy):
  loss, params, x, want = layer
  p = {"only_names": POLICIES.save_only_these_names(*moe_lib.CHECKPOINT_NAMES),
       "all_but_hidden": POLICIES.save_any_names_but_these(moe_lib.HIDDEN),
       }.get(policy) or getattr(POLICIES, policy)
  got = jax.jit(jax.grad(jax.checkpoint(loss, policy=p), argnums=(0, 1)))(params, x)
  assert_tree_rel(got, want, what=policy)


def test_modules_take_a_remat_policy():
  """jmoe.nn.MoE / jmoe.linen.MoE(remat=policy): the policy decides what the
  backward keeps, the gradients are those of the layer without remat."""
  from flax import nnx
  import jmoe.linen as jlinen
  import jmoe.nn as jnn
  d, f, e = 16, 32, 4
  x = jax.random.normal(jax.random.key(0), (2, 6, d))
  keep = POLICIES.save_only_these_names(moe_lib.UP, moe_lib.GATE)
  with pytest.raises(TypeError, match="remat"):
    jnn.MoE(d, f, e, remat="yes", rngs=nnx.Rngs(0))

  def grads(remat):
    model = jnn.MoE(d, f, e, remat=remat, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)

    def loss(state, x):
      y, aux = nnx.merge(graph, state)(x)
      return jnp.sum(y ** 2) + aux.balance_loss

    return loss, state, jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)

  _, _, want = grads(None)
  for remat in (True, keep):
    loss, state, got = grads(remat)
    assert_tree_rel(got, want, what=f"nnx remat={remat}")
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(loss, state, x)
  assert f"named '{moe_lib.UP}'" in buf.getvalue()
  assert f"named '{moe_lib.HIDDEN}'" not in buf.getvalue()

  lin = lambda remat: jlinen.MoE(f, e, remat=remat)
  variables = lin(None).init(jax.random.key(1), x)
  lin_loss = lambda remat: lambda v, x: jnp.sum(lin(remat).apply(v, x)[0] ** 2)
  want = jax.jit(jax.grad(lin_loss(None), argnums=(0, 1)))(variables, x)
  got = jax.jit(jax.grad(lin_loss(keep), argnums=(0, 1)))(variables, x)
  assert_tree_rel(got, want, what="linen remat")
