"""A tour of jmoe in one minute on a CPU.

1. route router logits to experts,
2. build the prefix-sum dispatch plan and permute tokens into expert order,
3. run every expert on its rows with one grouped matmul per projection,
4. combine back, and check the result against "every expert on every token",
5. train a small MoE layer for a few jitted optax steps.

Run: python examples/quickstart.py
"""

import time

import jax
import jax.numpy as jnp
import optax

import jmoe


def main():
  t0 = time.time()
  tokens, d_model, d_ff, num_experts = 64, 32, 64, 8
  params = jmoe.init_params(jax.random.key(0), d_model, d_ff, num_experts)
  x = jax.random.normal(jax.random.key(1), (tokens, d_model))

  # 1. Routing: Mixtral-style top-2 then softmax.
  router = jmoe.RouterConfig(top_k=2, order="topk_softmax")
  logits = x @ params.router
  routing = jmoe.route(logits, router)
  print(f"routing: experts {routing.experts.shape} {routing.experts.dtype},"
        f" weights {routing.weights.shape}; token 0 -> experts"
        f" {routing.experts[0].tolist()} with weights"
        f" {[round(w, 3) for w in routing.weights[0].tolist()]}")

  # 2. Dispatch: one cumsum over one-hot (token, slot) assignments.
  rows, plan = jmoe.permute(x, routing)
  print(f"dispatch: {rows.shape[0]} rows in expert order; tokens per expert"
        f" {plan.group_sizes.tolist()}; CSR indptr {plan.indptr.tolist()}")

  # 3. Experts: SwiGLU through three grouped matmuls (lax.ragged_dot's signature).
  out_rows = jmoe.expert_ffn(rows, params.w_up, params.w_down, params.w_gate,
                             plan.group_sizes, "swiglu")

  # 4. Combine, and compare with the dense oracle: all experts on all tokens.
  y = jmoe.unpermute(out_rows, plan, routing.weights)
  all_out = jax.vmap(lambda u, d, g: jmoe.ffn(x, jmoe.FFNParams(u, d, g), "swiglu"))(
      params.w_up, params.w_down, params.w_gate)  # [E, T, D]
  combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(routing.experts, num_experts),
                       routing.weights)
  y_dense = jnp.einsum("te,etd->td", combine, all_out)
  err = jnp.linalg.norm(y - y_dense) / jnp.linalg.norm(y_dense)
  print(f"layer: max |y| {float(jnp.abs(y).max()):.3f}; relative error vs dense"
        f" oracle {float(err):.2e}")
  assert err < 1e-5

  # The same in one call, with the losses and metrics.
  config = jmoe.MoEConfig(router=router, activation="swiglu")
  y2, aux = jmoe.moe_ffn(x, params, config)
  assert jnp.allclose(y, y2, atol=1e-6)
  print(f"moe_ffn aux: balance loss {float(aux.balance_loss):.3f}, z-loss"
        f" {float(aux.z_loss):.3f}, router entropy {float(aux.router_entropy):.3f}")

  # 5. Training: fit a random teacher FFN for a few jitted steps.
  teacher = jmoe.init_params(jax.random.key(2), d_model, d_ff, 1)
  target = lambda x: jmoe.ffn(x, jmoe.FFNParams(teacher.w_up[0], teacher.w_down[0],
                                                teacher.w_gate[0]), "swiglu")
  tx = optax.adamw(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, x):
    def loss_fn(p):
      y, aux = jmoe.moe_ffn(x, p, config)
      mse = jnp.mean((y - target(x)) ** 2)
      return mse + 0.01 * aux.balance_loss + 1e-3 * aux.z_loss, mse
    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, mse

  key = jax.random.key(3)
  first = None
  for step in range(60):
    key, sub = jax.random.split(key)
    batch = jax.random.normal(sub, (tokens, d_model))
    params, opt_state, mse = train_step(params, opt_state, batch)
    first = float(mse) if first is None else first
    if step % 20 == 0 or step == 59:
      print(f"step {step:3d}  mse {float(mse):.4f}")
  assert float(mse) < first, "training should reduce the loss"
  print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  main()
