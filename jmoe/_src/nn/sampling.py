"""Generation: nucleus / greedy sampling and a jitted KV-cached decode loop."""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp

from jmoe._src import checks
from jmoe._src.nn.transformer import MoETransformerLM

Array = jax.Array


def sample_logits(logits: Array, key: Array | None, *, temperature=0.0,
                  top_p=1.0) -> Array:
  """Next tokens int32 [B] from logits [B, vocab].

  temperature == 0 (a Python number): greedy (argmax; `key` unused). Otherwise
  softmax(logits / temperature) restricted to the nucleus: the most probable
  tokens whose cumulative probability before them is below `top_p` (always at
  least the top token), as Hugging Face's temperature then top-p warpers.
  `temperature` and `top_p` may be traced scalars.
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
  logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: MoETransformerLM, prompt_tokens: Array, max_new_tokens: int,
             *, temperature: float = 0.0, top_p: float = 1.0,
             key: Array | None = None, eos_id: int | None = None) -> Array:
  """Autoregressive generation with a static-shape KV cache, in one jitted call.

  The prompt is prefilled in one `decode` call, then a `lax.scan` runs one-token
  decode steps; the cache holds prompt + max_new_tokens positions, so every shape
  is static. One compile per (model, shapes, greedy or not); temperature, top_p
  and eos_id are traced.

  Args:
    model: a `MoETransformerLM`.
    prompt_tokens: int [B, P] prompts, all of length P (no padding).
    max_new_tokens: N, tokens to generate per row.
    temperature: 0.0: greedy; > 0: sampling from softmax(logits / temperature).
    top_p: nucleus sampling threshold in (0, 1] (1.0: off). Sampling only.
    key: PRNG key, required when sampling.
    eos_id: once a row emits this token, its remaining tokens are eos_id.

  Returns:
    int32 [B, P + N]: the prompts followed by the generated tokens.
  """
  fn = "generate"
  checks.check_rank(fn, "prompt_tokens", prompt_tokens, 2, "[batch, prompt_len]")
  checks.check_integer(fn, "prompt_tokens", prompt_tokens)
  if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
    raise ValueError(
        f"{fn}: `max_new_tokens` must be an int >= 0; got {max_new_tokens!r}.")
  if temperature < 0:
    raise ValueError(f"{fn}: `temperature` must be >= 0; got {temperature}.")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"{fn}: `top_p` must be in (0, 1]; got {top_p}.")
  greedy = temperature == 0
  if not greedy and key is None:
    raise ValueError(f"{fn}: sampling (temperature > 0) needs a PRNG `key`.")
  prompt_tokens = jnp.asarray(prompt_tokens, jnp.int32)
  if max_new_tokens == 0:
    return prompt_tokens
  key = jax.random.key(0) if key is None else key
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_tokens, key,
                   jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p),
                   jnp.int32(-1 if eos_id is None else eos_id),
                   max_new_tokens=max_new_tokens, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "greedy"))
def _generate(graphdef, state, prompt, key, temperature, top_p, eos, *,
              max_new_tokens, greedy):
  model = nnx.merge(graphdef, state)
  b, p = prompt.shape
  pick = functools.partial(sample_logits, temperature=0 if greedy else temperature,
                           top_p=top_p)
  keys = jax.random.split(key, max_new_tokens)
  cache = model.init_cache(b, p + max_new_tokens)
  logits, cache = model.decode(prompt, cache)
  first = pick(logits[:, -1], keys[0])

  def step(carry, k):
    token, cache, done = carry
    logits, cache = model.decode(token[:, None], cache)
    token = jnp.where(done, eos, pick(logits[:, 0], k))
    return (token, cache, done | (token == eos)), token

  _, rest = jax.lax.scan(step, (first, cache, first == eos), keys[1:])  # [N-1, B]
  return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)
