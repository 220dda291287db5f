"""Prefill and decode with a KV cache: greedy or sampled, streamed or in one compiled loop.

The model is split once into (graphdef, state) and merged inside each jitted function, so
the compiled step takes the parameter state as an argument: a compressed state (other leaf
types at the same paths) runs through the same functions. The cache buffer is donated, so a
decode step updates it in place instead of copying it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.transformer import DecoderLM


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 means greedy; top_k / top_p restrict the sampled set."""

  temperature: float = 0.0
  top_k: int | None = None
  top_p: float | None = None

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1, got {self.top_k}")
    if self.top_p is not None and not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
  """logits [B, V] float32 -> token ids [B] int32."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k is not None:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def _prefill(graphdef, state, tokens, cache):
  """tokens [B, T] into an empty cache -> (last-position logits [B, V], cache)."""
  model = nnx.merge(graphdef, state)
  # Only the last position's logits are needed: skip the head for the others.
  hidden, cache = model.hidden_states(tokens, cache=cache, prefill=True)
  return model.logits(hidden[:, -1]), cache


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(3,))
def _decode_step(graphdef, state, token, cache, position, key, sampling):
  """token [B] at `position` -> (next token [B], its logits [B, V], cache)."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(token[:, None], start=position, cache=cache)
  return sample_tokens(logits[:, 0], key, sampling), logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(3,))
def _decode_loop(graphdef, state, token, cache, position, key, steps, sampling):
  """`steps` decode steps in one compiled loop -> (tokens [B, steps], cache)."""
  model = nnx.merge(graphdef, state)

  def step(carry, key):
    token, cache, position = carry
    logits, cache = model(token[:, None], start=position, cache=cache)
    token = sample_tokens(logits[:, 0], key, sampling)
    return (token, cache, position + 1), token

  (_, cache, _), tokens = jax.lax.scan(step, (token, cache, position),
                                       jax.random.split(key, steps))
  return tokens.T, cache


class Generator:
  """Holds a split model and compiled prefill/decode functions for one cache length."""

  def __init__(self, model: DecoderLM, max_len: int):
    if max_len > model.config.max_position_embeddings:
      raise ValueError(f"max_len={max_len} exceeds the model's context of "
                       f"{model.config.max_position_embeddings} tokens")
    self.model = model
    self.max_len = max_len
    self.graphdef, self.state = nnx.split(model)

  def _check_prompt(self, prompt_ids: jax.Array, new_tokens: int) -> None:
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] == 0:
      raise ValueError(f"prompt_ids must be [batch, tokens>0], got shape {prompt_ids.shape}")
    if prompt_ids.shape[1] + new_tokens > self.max_len:
      raise ValueError(f"prompt of {prompt_ids.shape[1]} tokens + {new_tokens} new tokens "
                       f"exceeds max_len={self.max_len}")

  def prefill(self, prompt_ids: jax.Array):
    """prompt_ids [B, T] -> (logits of the last position [B, V], filled cache)."""
    cache = self.model.init_cache(prompt_ids.shape[0], self.max_len)
    return _prefill(self.graphdef, self.state, jnp.asarray(prompt_ids, jnp.int32), cache)

  def generate(self, prompt_ids: jax.Array, max_new_tokens: int, *,
               sampling: Sampling = Sampling(), seed: int = 0) -> jax.Array:
    """All new tokens [B, max_new_tokens] in one compiled loop (no early stop)."""
    self._check_prompt(prompt_ids, max_new_tokens)
    key, first_key = jax.random.split(jax.random.key(seed))
    logits, cache = self.prefill(prompt_ids)
    first = sample_tokens(logits, first_key, sampling)
    if max_new_tokens == 1:
      return first[:, None]
    rest, _ = _decode_loop(self.graphdef, self.state, first, cache,
                           jnp.int32(prompt_ids.shape[1]), key, max_new_tokens - 1, sampling)
    return jnp.concatenate([first[:, None], rest], axis=1)

  def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), seed: int = 0,
             stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yields new token ids of one prompt as they are produced; stops after a stop id."""
    prompt = jnp.asarray([list(prompt_ids)], jnp.int32)
    self._check_prompt(prompt, max_new_tokens)
    key = jax.random.key(seed)
    logits, cache = self.prefill(prompt)
    key, sub = jax.random.split(key)
    token = sample_tokens(logits, sub, sampling)
    position = prompt.shape[1]
    for produced in range(1, max_new_tokens + 1):
      token_id = int(token[0])
      yield token_id
      if token_id in stop_ids or produced == max_new_tokens:
        return
      key, sub = jax.random.split(key)
      token, _, cache = _decode_step(self.graphdef, self.state, token, cache,
                                     jnp.int32(position), sub, sampling)
      position += 1
