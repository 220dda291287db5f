"""Plain-jnp paged decode attention: the oracle for the kernels and the XLA fallback.

The op (one query token per sequence, grouped-query attention over a paged KV cache):

  q           [B, N, H]            bf16 / f32, already rotated (RoPE) if the model rotates
  k_pages     [K, P, page, H]      float pages (bits=None), uint8 codes (bits=8), or
              [K, P, page, H * bits / 8] uint8 (bits=4 or 2: 8 / bits codes per byte,
                                   "fraction" packing)
  v_pages     same as k_pages
  lengths     i32[B]               valid tokens of each sequence (0 allowed -> zeros out)
  page_table  i32[B, pages_per_seq] token p of sequence b lives in page
                                   page_table[b, p // page], slot p % page
  k/v_scales, k/v_offsets  f32[K, P, page]   x = code * scale + offset (per token, kv head)
  key_group   int or None          per-channel keys (KIVI): k_scales / k_offsets are
                                   f32[K, P, page // key_group, H], one grid per channel and
                                   group of key_group tokens of a page (page % key_group == 0);
                                   values keep their per-token grids
  return_lse  bool                 also return the log-sum-exp of the visible scores
  query_positions  i32[B] or None  the query's position for the sliding window (default
                                   lengths - 1): lets the pages be a prefix of a longer
                                   sequence whose newest keys the caller attends itself

Letters: B batch, N query heads, K kv heads, G = N / K query heads per kv head, H head dim,
P pages in the pool, S = pages_per_seq * page the longest context a table can address.

"Fraction" packing of f = 8 / bits codes per byte (lowbit.kv_cache's cache layout, defined
here by `pack_codes`): byte j holds elements j, j + H/f, .., j + (f-1) H/f from the low bits
up, so unpacking with shifts and masks gives f contiguous column parts of width H/f. At 4
bits ("halves") the low nibble of byte j is element j, the high nibble element j + H/2; at
2 bits ("quarters") bits 2i..2i+1 hold element j + i H/4. RoPE's rotate-half convention
pairs element j with j + H/2, i.e. part i with part i + f/2, so a kernel that rotates keys
works on the unpacked parts directly (no interleave, no concatenation).

Keys are stored before RoPE when `rope_inv_freq` is given: the key at absolute position p
is rotated by angles p * inv_freq (HF rotate-half: k1' = k1 cos - k2 sin,
k2' = k2 cos + k1 sin) inside the op. The angle is computed as float32(p) * inv_freq in
float32, as Hugging Face does.

Masking: key p is visible iff p < length and, with a sliding window, p > query_position -
window (query_position = length - 1 unless given).
Masked positions (and pages the table does not reach) may hold garbage or NaN; they are
removed with `where` (never multiplied by zero), so no NaN can leak. The logit soft cap
(Gemma) is tanh(s / c) * c, applied before the mask.

Precision: dequantization, RoPE, scores, softmax and the weighted sum all run in float32
(HIGHEST precision dots); the result is cast to q.dtype.

With `return_lse=True` the op returns (out f32 [B, N, H], lse f32 [B, N]): lse is
log(sum_p exp(s_p)) over the visible keys p of the scaled, soft-capped scores s, -inf for a
sequence with no visible key. A caller that attends to further keys outside the pages (the
float window of a per-channel key cache) merges the two parts exactly by their lse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

BITS = (None, 8, 4, 2)


def codes_per_byte(bits: int | None) -> int:
  """8 / bits codes share a byte (1 for 8-bit codes and float pages)."""
  return 1 if bits is None else 8 // bits


def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
  """uint8 codes [..., H] < 2**bits -> [..., H * bits / 8] in the fraction packing: byte j
  holds code j + i H/f at bits i * bits (f = 8 / bits codes per byte)."""
  per_byte = codes_per_byte(bits)
  if per_byte == 1:
    return codes
  h = codes.shape[-1]
  parts = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], per_byte, h // per_byte)
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[:, None]
  return jnp.sum(parts << shifts, axis=-2, dtype=jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
  """The inverse of `pack_codes`: uint8 [..., H * bits / 8] -> uint8 codes [..., H]."""
  per_byte = codes_per_byte(bits)
  if per_byte == 1:
    return packed
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[:, None]
  parts = (packed[..., None, :] >> shifts) & jnp.uint8(2**bits - 1)
  return parts.reshape(*packed.shape[:-1], per_byte * packed.shape[-1])


def unpack_halves(packed: jax.Array) -> jax.Array:
  """uint8 [..., H/2] in "halves" packing (4 bits) -> uint8 codes [..., H]."""
  return unpack_codes(packed, 4)


def pack_halves(codes: jax.Array) -> jax.Array:
  """uint8 codes [..., H] in 0..15 -> [..., H/2]: byte j = code j | code (j + H/2) << 4."""
  return pack_codes(codes, 4)


def rope_rotate(k: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """HF rotate-half RoPE. k f32 [..., S, ..., H] with positions broadcastable to k[..., 0]
  after adding a trailing axis; returns f32."""
  ang = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  h2 = k.shape[-1] // 2
  k1, k2 = k[..., :h2], k[..., h2:]
  return jnp.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], axis=-1)


def validate_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, k_offsets,
                    v_scales, v_offsets, *, bits, rope_inv_freq=None,
                    sliding_window=None, key_group=None, query_positions=None) -> None:
  """Static (shape and dtype) checks shared by every implementation; raises ValueError."""
  if bits not in BITS:
    raise ValueError(f"bits={bits!r} must be one of {BITS}")
  if key_group is not None:
    if bits is None:
      raise ValueError(f"key_group={key_group} needs quantized pages, got bits=None")
    if key_group < 1:
      raise ValueError(f"key_group={key_group} must be >= 1")
  if q.ndim != 3:
    raise ValueError(f"q must be [B, N, H], got {q.shape=}")
  b, n, h = q.shape
  if q.dtype not in (jnp.bfloat16, jnp.float32, jnp.float16):
    raise ValueError(f"{q.dtype=} must be a float type")
  if k_pages.ndim != 4:
    raise ValueError(f"k_pages must be [K, P, page_size, H'], got {k_pages.shape=}")
  if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
    raise ValueError(f"{v_pages.shape=} {v_pages.dtype=} must equal {k_pages.shape=} "
                     f"{k_pages.dtype=}")
  kh, p, ps, hc = k_pages.shape
  if key_group is not None and ps % key_group:
    raise ValueError(f"page_size={ps} must be a multiple of key_group={key_group}")
  if n % kh:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kh} "
                     f"(q.shape={q.shape}, k_pages.shape={k_pages.shape})")
  per_byte = codes_per_byte(bits)
  if h % per_byte:
    raise ValueError(f"bits={bits} needs a head dim that is a multiple of {per_byte} "
                     f"(codes per byte), got H={h} (q.shape={q.shape})")
  want_hc = h // per_byte
  if hc != want_hc:
    raise ValueError(f"k_pages.shape={k_pages.shape} last dim must be {want_hc} for "
                     f"bits={bits} and head dim {h}")
  if bits is None:
    if not jnp.issubdtype(k_pages.dtype, jnp.floating):
      raise ValueError(f"bits=None needs float pages, got {k_pages.dtype=}")
    for name, a in (("k_scales", k_scales), ("k_offsets", k_offsets),
                    ("v_scales", v_scales), ("v_offsets", v_offsets)):
      if a is not None:
        raise ValueError(f"{name} given for float pages (bits=None)")
  else:
    if k_pages.dtype != jnp.uint8:
      raise ValueError(f"bits={bits} needs uint8 pages, got {k_pages.dtype=}")
    key_grid = (kh, p, ps) if key_group is None else (kh, p, ps // key_group, h)
    for name, a, want in (("k_scales", k_scales, key_grid), ("k_offsets", k_offsets, key_grid),
                          ("v_scales", v_scales, (kh, p, ps)),
                          ("v_offsets", v_offsets, (kh, p, ps))):
      if a is None:
        raise ValueError(f"{name} is required for quantized pages (bits={bits})")
      if a.shape != want or a.dtype != jnp.float32:
        raise ValueError(f"{name}.shape={a.shape} {name}.dtype={a.dtype} must be float32 "
                         f"{want} (key_group={key_group})")
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths.shape={lengths.shape} ({lengths.dtype}) must be int [{b}]")
  if (page_table.ndim != 2 or page_table.shape[0] != b
      or not jnp.issubdtype(page_table.dtype, jnp.integer)):
    raise ValueError(f"page_table.shape={page_table.shape} ({page_table.dtype}) must be "
                     f"int [{b}, pages_per_seq]")
  if query_positions is not None and (
      query_positions.shape != (b,) or not jnp.issubdtype(query_positions.dtype, jnp.integer)):
    raise ValueError(f"query_positions.shape={query_positions.shape} "
                     f"({query_positions.dtype}) must be int [{b}]")
  if rope_inv_freq is not None and rope_inv_freq.shape != (h // 2,):
    raise ValueError(f"rope_inv_freq.shape={rope_inv_freq.shape} must be [{h // 2}]")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window={sliding_window} must be >= 1")


def dynamic_validate_inputs(lengths, page_table, num_pages: int, page_size: int) -> None:
  """Value checks (tests and debugging only; not traced): lengths fit the table and the
  live part of the table points into the pool."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  lengths, table = np.asarray(lengths), np.asarray(page_table)
  cap = table.shape[1] * page_size
  if np.any(lengths < 0) or np.any(lengths > cap):
    raise ValueError(f"lengths={lengths} must lie in [0, {cap}]")
  for b, n in enumerate(lengths):
    live = table[b, : -(-int(n) // page_size)]
    if np.any(live < 0) or np.any(live >= num_pages):
      raise ValueError(f"page_table[{b}] = {live} points outside [0, {num_pages})")


def gather_dequantized(pages, scales, offsets, page_table, *, bits,
                       key_group=None) -> jax.Array:
  """[K, P, page, H'] pages -> f32 [B, S, K, H] in token order (S = pages_per_seq * page).

  Per-token grids: scales / offsets [K, P, page]; per-channel grids (key_group):
  [K, P, page // key_group, H]."""
  kh, p, ps, _ = pages.shape
  table = jnp.clip(page_table, 0, p - 1)
  b, pps = table.shape
  x = pages[:, table]  # [K, B, pps, page, H']
  if bits is not None:
    x = unpack_codes(x, bits)
  x = x.astype(jnp.float32)
  if key_group is not None:
    h = x.shape[-1]
    # [K, B, pps, page / G, G, H] * [K, B, pps, page / G, 1, H]
    grouped = x.reshape(kh, b, pps, ps // key_group, key_group, h)
    x = (grouped * scales[:, table][..., None, :] + offsets[:, table][..., None, :]
         ).reshape(kh, b, pps, ps, h)
  elif bits is not None:
    x = x * scales[:, table][..., None] + offsets[:, table][..., None]
  # [K, B, pps, page, H] -> [B, S, K, H]
  return x.reshape(kh, b, pps * ps, -1).transpose(1, 2, 0, 3)


def window_starts(lengths, query_positions, sliding_window: int) -> jax.Array:
  """i32[B]: the first position a sliding window shows the query (at query_positions,
  default lengths - 1)."""
  if query_positions is None:
    query_positions = lengths.astype(jnp.int32) - 1
  return jnp.maximum(query_positions.astype(jnp.int32) + 1 - sliding_window, 0)


def visible_mask(lengths, s: int, sliding_window: int | None,
                 query_positions=None) -> jax.Array:
  """bool [B, S]: key p visible iff p < length (and p > query position - window)."""
  pos = jnp.arange(s, dtype=jnp.int32)[None, :]
  visible = pos < lengths.astype(jnp.int32)[:, None]
  if sliding_window is not None:
    visible &= pos >= window_starts(lengths, query_positions, sliding_window)[:, None]
  return visible


def lse_of(m, l):
  """Log-sum-exp from a running max m and sum l = sum exp(s - m): -inf where l == 0."""
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("bits", "scale", "logit_softcap",
                                             "sliding_window", "key_group", "return_lse"))
def decode_attention(q, k_pages, v_pages, lengths, page_table, *, k_scales=None,
                     k_offsets=None, v_scales=None, v_offsets=None, bits=None,
                     scale: float, logit_softcap: float | None = None,
                     sliding_window: int | None = None, rope_inv_freq=None,
                     key_group: int | None = None, return_lse: bool = False,
                     query_positions=None):
  """Paged decode attention in plain jnp (see the module docstring); -> [B, N, H] q.dtype,
  or (f32 [B, N, H], lse f32 [B, N]) with return_lse."""
  validate_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, k_offsets, v_scales,
                  v_offsets, bits=bits, rope_inv_freq=rope_inv_freq,
                  sliding_window=sliding_window, key_group=key_group,
                  query_positions=query_positions)
  b, n, h = q.shape
  kh = k_pages.shape[0]
  k = gather_dequantized(k_pages, k_scales, k_offsets, page_table, bits=bits,
                         key_group=key_group)
  v = gather_dequantized(v_pages, v_scales, v_offsets, page_table, bits=bits)
  s = k.shape[1]
  if rope_inv_freq is not None:
    pos = jnp.arange(s, dtype=jnp.int32)[:, None]  # [S, 1] broadcasts over K
    k = rope_rotate(k, pos, rope_inv_freq)
  visible = visible_mask(lengths, s, sliding_window, query_positions)  # [B, S]
  qg = q.astype(jnp.float32).reshape(b, kh, n // kh, h)
  hi = lax.Precision.HIGHEST
  # [B, K, G, S]
  scores = jnp.einsum("bkgh,bskh->bkgs", qg, k, precision=hi) * scale
  if logit_softcap is not None:
    scores = jnp.tanh(scores / logit_softcap) * logit_softcap
  vis = visible[:, None, None, :]
  scores = jnp.where(vis, scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # a sequence with no visible key
  p = jnp.where(vis, jnp.exp(scores - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  v = jnp.where(visible[:, :, None, None], v, 0.0)  # garbage slots never reach the sum
  out = jnp.einsum("bkgs,bskh->bkgh", p, v, precision=hi)
  out = jnp.where(l > 0, out / jnp.where(l > 0, l, 1.0), 0.0).reshape(b, n, h)
  if return_lse:
    return out, lse_of(m, l).reshape(b, n)
  return out.astype(q.dtype)
