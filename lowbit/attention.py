"""Grouped-query attention: the plain-jnp reference the attention kernels are tested against,
and the prefill dispatcher.

Scores and softmax run in float32 whatever the activation dtype, as the Hugging Face
implementations do, so float models agree with them to rounding.

Dispatch (measured on an H200, bench/results/kv_attention.md):
  * prefill (T queries over the same T keys, causal) on a GPU in bf16/f16 runs cuDNN's
    fused flash attention through `jax.nn.dot_product_attention`: the reference
    materializes the [T, T] scores; cuDNN makes an 8B prefill of 2048 tokens 1.35x faster
    at batch 1 and 1.43x at batch 8 (80.7% / 89.8% of the measured matmul rate).
  * one decode token over a dense cache on a GPU runs cuDNN with per-sequence key lengths
    once the cache holds at least DENSE_DECODE_CUDNN_MIN_TOKENS slots over the batch:
    XLA's einsum reads the cache at ~30% of HBM bandwidth there, cuDNN at 78-100%
    (2.8-3.4x); on short caches XLA is faster (batch 1 at 4k: 17 us against 31 us).
  * quantized caches (8, 4 and 2 bits: per-token grids, and KIVI's per-channel keys with
    the float window merged by log-sum-exp) decode through `paged_decode_attention`.
  * Palu latent caches decode through `latent_decode_attention` (K rebuilt from latents
    inside the kernel).
Everywhere else, for logit softcaps (which cuDNN does not take) and for sliding-window
decode, the reference runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import api as decode_attention_api
from pallas_kernels.decode_attention.reference import rope_rotate
from pallas_kernels.latent_decode_attention import api as latent_decode_attention_api


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


PREFILL_IMPLEMENTATIONS = ("cudnn", "reference")


def _prefill_implementation(q: jax.Array, logit_softcap) -> str:
  return "cudnn" if _cudnn_serves(q, logit_softcap) else "reference"


def _cudnn_serves(q: jax.Array, logit_softcap) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and logit_softcap is None and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          sliding_window: int | None = None,
                          logit_softcap: float | None = None,
                          implementation: str | None = None) -> jax.Array:
  """Prefill attention: q [B, T, N, H] over k/v [B, T, K, H] of the same consecutive
  positions, causal (and sliding-window) -> [B, T, N, H] in q's dtype.

  implementation: None (cuDNN where it serves, see the module docstring), "cudnn" or
  "reference".
  """
  implementation = implementation or _prefill_implementation(q, logit_softcap)
  if implementation not in PREFILL_IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}; expected one of "
                     f"{PREFILL_IMPLEMENTATIONS} or None")
  if implementation == "cudnn":
    if logit_softcap is not None:
      raise ValueError("cuDNN attention takes no logit_softcap; use the reference")
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=window, implementation="cudnn")
  positions = jnp.arange(q.shape[1])
  return gqa_attention(q, k, v, attention_mask(positions, positions, sliding_window),
                       scale=scale, logit_softcap=logit_softcap)


# Dense-cache decode on a GPU switches from XLA to cuDNN at this many cache slots summed
# over the batch (module docstring).
DENSE_DECODE_CUDNN_MIN_TOKENS = 32768


def dense_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, length, *,
                           scale: float, sliding_window: int | None = None,
                           logit_softcap: float | None = None) -> jax.Array:
  """One new token per sequence over a dense cache (after the token's own write):
  q [B, 1, N, H], k/v [B, S, K, H] with the first `length` slots valid -> [B, 1, N, H]."""
  b, s = k.shape[:2]
  if (sliding_window is None and _cudnn_serves(q, logit_softcap)
      and b * s >= DENSE_DECODE_CUDNN_MIN_TOKENS):
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=jnp.full((b,), length, jnp.int32),
        implementation="cudnn")
  positions = jnp.arange(s)
  mask = attention_mask(jnp.reshape(length - 1, (1,)), positions, sliding_window)
  return gqa_attention(q, k, v, mask, scale=scale, logit_softcap=logit_softcap)


def paged_decode_attention(q: jax.Array, cache, length, *, scale: float,
                           sliding_window: int | None = None,
                           logit_softcap: float | None = None,
                           rope_inv_freq=None) -> jax.Array:
  """One new token per sequence over a quantized cache (after the token's own write):
  q [B, 1, N, H] -> [B, 1, N, H].

  Runs `pallas_kernels.decode_attention` (the Pallas kernel on GPU/TPU, its XLA reference
  elsewhere), which reads the packed codes and dequantizes in the kernel instead of
  materializing a float copy of the cache. `length`: tokens in the cache (the new token's
  position + 1), the same for every sequence. `rope_inv_freq` [H/2]: the cache holds keys
  before RoPE (Atom) and the kernel rotates them at their positions.

  Per-channel keys (KIVI): the pages hold codes for the complete key groups only. The
  kernel attends to those (its sliding window placed at the query's position) and returns
  its log-sum-exp; the newest tokens (float window keys, per-token values) go through the
  XLA reference as float pages of their own, and the two softmaxes are merged exactly:
  softmax over the union = each part's output weighted by exp(its lse - the union's lse).
  """
  b = q.shape[0]
  pages = cache.pages()
  k_pages, v_pages, table = (pages.pop(name) for name in ("k_pages", "v_pages", "page_table"))
  inv_freq = None if rope_inv_freq is None else jnp.asarray(rope_inv_freq, jnp.float32)
  per_sequence = lambda x: jnp.full((b,), x, jnp.int32)
  attend = dict(scale=scale, logit_softcap=logit_softcap, sliding_window=sliding_window)
  if not cache.key_group:
    out = decode_attention_api.decode_attention(
        q[:, 0], k_pages, v_pages, per_sequence(length), table, **pages, **attend,
        rope_inv_freq=inv_freq)
    return out[:, None]
  complete = cache.complete_length(length)
  query = per_sequence(length - 1)
  out_pages, lse_pages = decode_attention_api.decode_attention(
      q[:, 0], k_pages, v_pages, per_sequence(complete), table, **pages, **attend,
      rope_inv_freq=inv_freq, return_lse=True, query_positions=query)
  # The window: slot i holds position complete + i; keys rotated here when stored before
  # RoPE (the reference would rotate them at their in-page slot).
  k_window, v_window = cache.window(length)  # f32 [K, B, G, H]
  if inv_freq is not None:
    k_window = rope_rotate(
        k_window, complete + jnp.arange(cache.key_group), inv_freq)
  out_window, lse_window = decode_attention_api.decode_attention(
      q[:, 0], k_window, v_window, per_sequence(length - complete),
      jnp.arange(b, dtype=jnp.int32)[:, None], **attend, return_lse=True,
      query_positions=query - complete, implementation="xla")
  lse = jnp.logaddexp(lse_pages, lse_window)  # [B, N]
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # no visible key at all: both weights 0
  weight = lambda part_lse: jnp.exp(part_lse - lse)[..., None]
  out = out_pages * weight(lse_pages) + out_window * weight(lse_window)
  return out.astype(q.dtype)[:, None]


def latent_decode_attention(q: jax.Array, cache, k_up: jax.Array, v_up: jax.Array,
                            lengths: jax.Array, *, rope_inv_freq, scale: float,
                            sliding_window: int | None = None,
                            logit_softcap: float | None = None,
                            v_bias: jax.Array | None = None) -> jax.Array:
  """One new token per sequence over a Palu latent cache (`lowbit.latent_cache`, after the
  token's own write): q [B, 1, N, H] (rotated) -> [B, 1, N, H] in q's dtype.

  `pallas_kernels.latent_decode_attention` rebuilds each key from its latent with k_up
  [G, gh*H, Rk] (the K factor's `up`), rotates it at its slot with `rope_inv_freq` [H/2]
  and returns the attention-weighted V latents [B, N, Rv]; the V up-projection v_up
  [G, gh*H, Rv] is applied here, once per query head instead of once per cached token, and
  `v_bias` [K*H] after it (the probabilities sum to 1). Keys are rebuilt as up @ latent
  then rotated, so a layer with a key bias or a key norm (Qwen2, Gemma 3) cannot use this:
  it rebuilds keys with jnp (models/transformer.py). lengths: int32 [B], tokens in the
  cache (the new token's position + 1).
  """
  weighted = latent_decode_attention_api.latent_decode_attention(
      q[:, 0], k_up=k_up, lengths=lengths, rope_inv_freq=rope_inv_freq, scale=scale,
      logit_softcap=logit_softcap, sliding_window=sliding_window, **cache.kernel_inputs())
  b, n, h = q.shape[0], q.shape[2], q.shape[3]
  groups, rows, v_rank = v_up.shape
  group_heads = rows // h
  # Query head n = (g * gh + j) * (N / K) + i reads kv head g * gh + j.
  weighted = weighted.reshape(b, groups, group_heads, -1, v_rank)  # [B, G, gh, N/K, Rv]
  out = jnp.einsum("bgjir,gjhr->bgjih", weighted, v_up.reshape(groups, group_heads, h, v_rank),
                   precision=jax.lax.Precision.HIGHEST)
  if v_bias is not None:
    out = out + v_bias.astype(jnp.float32).reshape(groups, group_heads, 1, h)
  return out.reshape(b, 1, n, h).astype(q.dtype)
