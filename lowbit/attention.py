"""Grouped-query attention in plain jnp: the reference the attention kernels are tested against.

Scores and softmax run in float32 whatever the activation dtype, as the Hugging Face
implementations do, so float models agree with them to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_positions: jax.Array, k_positions: jax.Array,
                   sliding_window: int | None) -> jax.Array:
  """Causal (and sliding-window) mask.

  q_positions [T], k_positions [S] -> bool [T, S]: key s is visible to query t when
  k <= q and, for sliding layers, q - k < sliding_window.
  """
  delta = q_positions[:, None] - k_positions[None, :]
  visible = delta >= 0
  if sliding_window is not None:
    visible &= delta < sliding_window
  return visible


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                  scale: float, logit_softcap: float | None = None) -> jax.Array:
  """q [B, T, N, H], k/v [B, S, K, H], mask [T, S] -> [B, T, N, H] in q's dtype."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  # [B, K, G, T, S]
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if logit_softcap is not None:
    scores = jnp.tanh(scores / logit_softcap) * logit_softcap
  scores = jnp.where(mask, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)
