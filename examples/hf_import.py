"""Hugging Face transformers -> jmoe: convert a Mixtral, compare logits, generate.

Builds a tiny random Mixtral with transformers (no download), converts it with
`jmoe.hf.from_transformers`, checks that both give the same logits, generates
greedily with jmoe's KV cache (and with transformers, for comparison), samples
with temperature / top-p, and exports the weights back into transformers.

Needs the `hf` extra: pip install "jmoe[hf]" (torch + transformers).
Run: python examples/hf_import.py
"""

import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jmoe.hf
import jmoe.nn


def main():
  t0 = time.time()
  config = transformers.MixtralConfig(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
      num_experts_per_tok=2)
  torch.manual_seed(0)
  hf_model = transformers.MixtralForCausalLM(config).eval()  # float32

  lm = jmoe.hf.from_transformers(hf_model)  # a jmoe.nn.MoETransformerLM
  router = lm.blocks[0].mlp.config.router
  print(f"converted: {len(lm.blocks)} blocks, {lm.blocks[0].mlp.num_experts}"
        f" experts, router {router.score}/{router.order} top-{router.top_k}"
        f" normalize={router.normalize}")

  tokens = torch.randint(0, config.vocab_size, (2, 12))
  with torch.no_grad():
    ref = hf_model(tokens).logits.numpy()
  logits, aux = nnx.jit(lambda m, t: m(t))(lm, jnp.asarray(tokens.numpy()))
  err = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
  print(f"logits {logits.shape}: max|jmoe - hf| / max|hf| = {err:.2e};"
        f" tokens per expert (layer 0) {aux.tokens_per_expert[0].tolist()}")

  prompt = tokens[:, :5]
  ours = jmoe.nn.generate(lm, jnp.asarray(prompt.numpy()), 10)  # greedy
  with torch.no_grad():
    theirs = hf_model.generate(prompt, max_new_tokens=10, do_sample=False,
                               eos_token_id=None, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))
  print(f"greedy (jmoe):         {np.asarray(ours)[0, 5:].tolist()}")
  print(f"greedy (transformers): {theirs.numpy()[0, 5:].tolist()}"
        f"  same: {np.array_equal(np.asarray(ours), theirs.numpy())}")
  sampled = jmoe.nn.generate(lm, jnp.asarray(prompt.numpy()), 10,
                             temperature=0.8, top_p=0.9, key=jax.random.key(0))
  print(f"sampled T=0.8 p=0.9:   {np.asarray(sampled)[0, 5:].tolist()}")

  # Back to transformers (e.g. after training in jmoe).
  fresh = transformers.MixtralForCausalLM(
      jmoe.hf.to_transformers_config(lm, "mixtral")).eval()
  fresh.load_state_dict(jmoe.hf.to_transformers_state_dict(lm, "mixtral"))
  with torch.no_grad():
    same = torch.equal(fresh(tokens).logits, hf_model(tokens).logits)
  print(f"exported back into transformers: identical logits {same}")
  print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
  main()
