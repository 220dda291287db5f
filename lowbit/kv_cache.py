"""KV-cache leaf types that attention blocks store, and the formats that choose them.

An attention block holds a `KVFormat` (static, chosen by a recipe, saved in a compressed
folder's manifest) and talks to the cache it makes through `write` and `read`, so the model
code is written once for float, quantized and (later) low-rank caches. Slots are absolute
positions: slot s holds the token at position s.

Formats (`KV_FORMATS` names them):
  * dense: keys and values in the activation dtype (`DenseKVCache`, [B, S, K, H]).
  * per-token (kv8, kv4-token, kv4-atom): every token's key and value quantized on its own,
    per kv head, asymmetric (x ~ code * scale + offset, scale = (max - min) / (2^bits - 1),
    offset = min). Atom quantizes keys before RoPE (`keys_before_rope`): the cache holds
    pre-RoPE keys and the reader rotates them at their positions.
  * per-channel keys (kv4, kv2; KIVI): keys carry outlier channels, so each channel is
    quantized over a group of `key_group` consecutive tokens; the newest tokens of a group
    that is not yet full stay in the activation dtype (the float window) until it fills.
    Values stay per token.
Codes are packed along the head dimension, `8 // bits` codes per byte, "fraction" layout
(`pack_codes`, defined with the decode kernels that read it):
byte j holds elements j, j + H/f, j + 2H/f, ... (f codes per byte) from the low bits up. At 4
bits that is the low nibble = element j, high nibble = element j + H/2: RoPE's rotate-half
pairs, so a kernel can rotate unpacked keys without shuffling (at 2 bits, part i pairs with
part i + 2).

Quantized caches store [K, B, S, ...] (kv head major) so that a [K, B*S/page, page, ...]
view is the paged layout of `pallas_kernels.decode_attention` with no copy.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels.decode_attention import reference as decode_attention_reference
# The codes' packing is the paged decode kernels' (one definition: they read these bytes).
from pallas_kernels.decode_attention.reference import pack_codes, unpack_codes

KeyGranularity = Literal["token", "channel"]

# Quantized per-token caches have a multiple of this many slots, so their paged view
# (`QuantizedKVCache.pages`) has pages of at least 16 tokens.
PAGE_ALIGN = 16
# Page sizes of the paged view, largest first: powers of two (the GPU kernel's Triton
# blocks); 64 keeps the page-table gather short without padding small caches.
PAGE_SIZES = (64, 32, 16, 8, 4, 2, 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
  """Keys and values of one layer in the activation dtype.

  k, v: [B, S_max, K, H]. Slots at or past the current length hold stale data; attention
  masks them by position.
  """

  k: jax.Array
  v: jax.Array

  # Reading back gives exactly what was written: prefill may attend over its new keys.
  exact = True
  keys_before_rope = False
  # [B, S, K, H] is not the paged kernel's layout; XLA's einsum reads it at ~80% of HBM
  # bandwidth in the float baseline.
  paged = False

  @classmethod
  def zeros(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32) -> "DenseKVCache":
    shape = (batch, max_len, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  def write(self, k_new: jax.Array, v_new: jax.Array, start, prefill: bool = False
            ) -> "DenseKVCache":
    """Stores k_new, v_new [B, T, K, H] at slots start .. start+T-1."""
    del prefill
    index = (0, start, 0, 0)
    return DenseKVCache(
        jax.lax.dynamic_update_slice(self.k, k_new.astype(self.k.dtype), index),
        jax.lax.dynamic_update_slice(self.v, v_new.astype(self.v.dtype), index))

  def read(self, dtype=None) -> tuple[jax.Array, jax.Array]:
    """-> (k, v) [B, S, K, H] as stored (`dtype` is for the quantized caches' signature)."""
    del dtype
    return self.k, self.v

  @property
  def nbytes(self) -> int:
    return self.k.nbytes + self.v.nbytes


def quantize_asymmetric(x: jax.Array, bits: int, axis: int, clip: float = 1.0):
  """x -> (uint8 codes like x, scale, offset) with min/max reduced over `axis` (kept as 1).

  The clip shrinks [min, max] toward zero at both ends (Atom's KV clip; 1.0 by default).
  A constant slice gets scale 1 and reproduces its value exactly through the offset.
  """
  x = x.astype(jnp.float32)
  low = jnp.min(x, axis=axis, keepdims=True) * clip
  high = jnp.max(x, axis=axis, keepdims=True) * clip
  scale = (high - low) / (2**bits - 1)
  scale = jnp.where(scale > 0, scale, 1.0)
  codes = jnp.clip(jnp.round((x - low) / scale), 0, 2**bits - 1).astype(jnp.uint8)
  return codes, scale, low


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKVCache:
  """Keys and values of one layer as packed integer codes.

  Values: v_codes [K, B, S, H*bits/8] uint8, v_scales / v_offsets [K, B, S] float32 (one
  grid per token and kv head). Keys: the same layout when `key_group` is 0 (per token);
  otherwise (per channel, KIVI) k_scales / k_offsets are [K, B, S / key_group, H] (one grid
  per channel and group of tokens) and k_window [K, B, key_group, H] (activation dtype)
  holds the newest tokens of the group being filled, at slot s % key_group.
  length: int32 [], the number of tokens written (slots >= length are stale).
  """

  k_codes: jax.Array
  k_scales: jax.Array
  k_offsets: jax.Array
  v_codes: jax.Array
  v_scales: jax.Array
  v_offsets: jax.Array
  k_window: jax.Array | None
  length: jax.Array
  bits: int = dataclasses.field(metadata=dict(static=True), default=4)
  key_group: int = dataclasses.field(metadata=dict(static=True), default=0)
  keys_before_rope: bool = dataclasses.field(metadata=dict(static=True), default=False)
  clip: float = dataclasses.field(metadata=dict(static=True), default=1.0)

  exact = False

  @property
  def max_len(self) -> int:
    return self.v_codes.shape[2]

  @property
  def page_size(self) -> int | None:
    """Slots per page of the paged view: the largest power of two up to 64 that divides
    the slots (and is a multiple of `key_group` for per-channel keys, whose grids must not
    straddle pages); None where there is none."""
    slots = self.v_scales.shape[2]
    return next((p for p in PAGE_SIZES if slots % p == 0 and p % max(self.key_group, 1) == 0),
                None)

  @property
  def paged(self) -> bool:
    """Whether `pages` serves the paged decode kernel: 8, 4 or 2 bits (the kernel's widths,
    keys per token or per channel) and a page size (per-channel keys: a power-of-two
    key_group up to 64)."""
    return self.bits in decode_attention_reference.BITS and self.page_size is not None

  def pages(self) -> dict:
    """The cache as the paged layout of `pallas_kernels.decode_attention` (no copy): pages
    of `page_size` slots, sequence b owning pages b * S / page_size onwards.

    -> dict(k_pages, v_pages [K, P, page, H'], v_scales, v_offsets [K, P, page],
    k_scales, k_offsets ([K, P, page] per token; [K, P, page / key_group, H] per channel),
    page_table int32 [B, S / page], bits, key_group (None per token)).

    Per-channel keys: the pages hold codes for the complete groups only (slots below
    `complete_length`); the newest tokens are in `window`.
    """
    if not self.paged:
      raise ValueError(f"a {self.bits}-bit cache with key_group={self.key_group} and "
                       f"{self.v_scales.shape[2]} slots has no paged layout")
    kv_heads, batch, slots = self.v_scales.shape
    page = self.page_size
    num_pages = batch * slots // page
    to_pages = lambda x: x.reshape(kv_heads, num_pages, page, *x.shape[3:])
    if self.key_group:  # [K, B, S / G, H] -> [K, P, page / G, H]
      key_grid = lambda x: x.reshape(kv_heads, num_pages, page // self.key_group, -1)
    else:
      key_grid = to_pages
    table = jnp.arange(num_pages, dtype=jnp.int32).reshape(batch, slots // page)
    return dict(k_pages=to_pages(self.k_codes), v_pages=to_pages(self.v_codes),
                k_scales=key_grid(self.k_scales), k_offsets=key_grid(self.k_offsets),
                v_scales=to_pages(self.v_scales), v_offsets=to_pages(self.v_offsets),
                page_table=table, bits=self.bits, key_group=self.key_group or None)

  def complete_length(self, length):
    """Tokens of the first `length` whose keys are codes: all of them per token; per
    channel, the complete groups (length // key_group * key_group)."""
    if not self.key_group:
      return length
    return length // self.key_group * self.key_group

  def window(self, length) -> tuple[jax.Array, jax.Array]:
    """The per-channel keys' float window and its values as float pages, page b for
    sequence b: (k, v) f32 [K, B, key_group, H], slot i the token at position
    complete_length(length) + i; slots at or past `length` are stale (mask them)."""
    if not self.key_group:
      raise ValueError("per-token keys have no float window")
    start = self.complete_length(length)
    slots = lambda x: jax.lax.dynamic_slice_in_dim(x, start, self.key_group, axis=2)
    # A cache filled to its last slot has an empty window: the slice is clamped in bounds
    # and every slot is masked.
    v = (unpack_codes(slots(self.v_codes), self.bits) * slots(self.v_scales)[..., None]
         + slots(self.v_offsets)[..., None])
    return self.k_window.astype(jnp.float32), v

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(self))

  def _quantize_tokens(self, x):
    """x [K, B, T, H] -> (packed codes [K, B, T, H'], scales, offsets [K, B, T])."""
    codes, scale, offset = quantize_asymmetric(x, self.bits, axis=-1, clip=self.clip)
    return pack_codes(codes, self.bits), scale[..., 0], offset[..., 0]

  def _quantize_channels(self, x):
    """x [K, B, n * G, H] -> (packed codes, scales / offsets [K, B, n, H]) per channel over
    groups of G tokens."""
    k, b, t, h = x.shape
    g = self.key_group
    codes, scale, offset = quantize_asymmetric(x.reshape(k, b, t // g, g, h), self.bits,
                                               axis=3, clip=self.clip)
    return pack_codes(codes.reshape(k, b, t, h), self.bits), scale[:, :, :, 0], offset[:, :, :, 0]

  def write(self, k_new: jax.Array, v_new: jax.Array, start, prefill: bool = False
            ) -> "QuantizedKVCache":
    """Stores k_new, v_new [B, T, K, H] at slots start .. start+T-1.

    Per-channel keys are written either by a prefill (start 0, any T) or one token at a
    time (T = 1): a group is quantized when its last token arrives.
    """
    t = k_new.shape[1]
    k_new = jnp.transpose(k_new, (2, 0, 1, 3))  # [K, B, T, H]
    v_new = jnp.transpose(v_new, (2, 0, 1, 3))
    update = lambda buf, new, *index: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype),
                                                                   index)
    v_codes, v_scales, v_offsets = self._quantize_tokens(v_new)
    fields = dict(v_codes=update(self.v_codes, v_codes, 0, 0, start, 0),
                  v_scales=update(self.v_scales, v_scales, 0, 0, start),
                  v_offsets=update(self.v_offsets, v_offsets, 0, 0, start),
                  length=jnp.asarray(start + t, jnp.int32))
    if not self.key_group:
      k_codes, k_scales, k_offsets = self._quantize_tokens(k_new)
      fields.update(k_codes=update(self.k_codes, k_codes, 0, 0, start, 0),
                    k_scales=update(self.k_scales, k_scales, 0, 0, start),
                    k_offsets=update(self.k_offsets, k_offsets, 0, 0, start))
    elif prefill:
      fields.update(self._prefill_channel_keys(k_new))
    elif t == 1:
      fields.update(self._append_channel_key(k_new, start))
    else:
      raise ValueError(f"a cache with per-channel keys takes a prefill from position 0 or one "
                       f"token at a time, got {t} tokens outside a prefill")
    return dataclasses.replace(self, **fields)

  def _prefill_channel_keys(self, k_new):
    """Full groups of the prompt quantized at once; the rest into the float window."""
    g = self.key_group
    t = k_new.shape[2]
    full = t // g * g
    out = dict(k_codes=self.k_codes, k_scales=self.k_scales, k_offsets=self.k_offsets,
               k_window=self.k_window)
    if full:
      codes, scales, offsets = self._quantize_channels(k_new[:, :, :full])
      out["k_codes"] = jax.lax.dynamic_update_slice(self.k_codes, codes, (0, 0, 0, 0))
      out["k_scales"] = jax.lax.dynamic_update_slice(self.k_scales, scales, (0, 0, 0, 0))
      out["k_offsets"] = jax.lax.dynamic_update_slice(self.k_offsets, offsets, (0, 0, 0, 0))
    if t > full:
      out["k_window"] = jax.lax.dynamic_update_slice(
          self.k_window, k_new[:, :, full:].astype(self.k_window.dtype), (0, 0, 0, 0))
    return out

  def _append_channel_key(self, k_new, position):
    """One key [K, B, 1, H] at `position`: into the window; the group's codes replace the
    stale ones when the group is complete."""
    g = self.key_group
    slot = position % g
    window = jax.lax.dynamic_update_slice(self.k_window, k_new.astype(self.k_window.dtype),
                                          (0, 0, slot, 0))
    codes, scales, offsets = self._quantize_channels(window)
    complete = slot == g - 1
    first, group = position - slot, position // g

    def keep_unless_complete(buf, new, *index):
      old = jax.lax.dynamic_slice(buf, index, new.shape)
      return jax.lax.dynamic_update_slice(buf, jnp.where(complete, new, old), index)

    return dict(k_window=window,
                k_codes=keep_unless_complete(self.k_codes, codes, 0, 0, first, 0),
                k_scales=keep_unless_complete(self.k_scales, scales, 0, 0, group, 0),
                k_offsets=keep_unless_complete(self.k_offsets, offsets, 0, 0, group, 0))

  def read(self, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """-> dequantized (k, v) [B, S, K, H] in `dtype` (keys before RoPE if
    `keys_before_rope`)."""
    v = (unpack_codes(self.v_codes, self.bits) * self.v_scales[..., None]
         + self.v_offsets[..., None])
    k_codes = unpack_codes(self.k_codes, self.bits).astype(jnp.float32)
    if not self.key_group:
      k = k_codes * self.k_scales[..., None] + self.k_offsets[..., None]
    else:
      kh, b, s, h = k_codes.shape
      g = self.key_group
      grouped = k_codes.reshape(kh, b, s // g, g, h)
      k = (grouped * self.k_scales[:, :, :, None] + self.k_offsets[:, :, :, None]
           ).reshape(kh, b, s, h)
      quantized_slots = self.length // g * g
      window = jnp.tile(self.k_window.astype(jnp.float32), (1, 1, s // g, 1))
      k = jnp.where(jnp.arange(s)[:, None] < quantized_slots, k, window)
    to_bskh = lambda x: jnp.transpose(x, (1, 2, 0, 3)).astype(dtype)
    return to_bskh(k), to_bskh(v)


@dataclasses.dataclass(frozen=True)
class KVFormat:
  """What an attention layer's cache stores; static and hashable (part of the model graph).

  bits: None (dense, the activation dtype), 8, 4 or 2.
  keys: "token" (one grid per token and kv head) or "channel" (one grid per channel over
    `key_group` tokens, with a float window; KIVI).
  keys_before_rope: store pre-RoPE keys (Atom) and rotate them on reading.
  clip: range clip of the quantizers (Atom's KV clip is 1.0).
  """

  bits: int | None = None
  keys: KeyGranularity = "token"
  key_group: int = 32
  keys_before_rope: bool = False
  clip: float = 1.0

  def __post_init__(self):
    if self.bits not in (None, 8, 4, 2):
      raise ValueError(f"KV cache bits={self.bits!r} not supported; use None (dense), 8, 4 or 2")
    if self.keys not in ("token", "channel"):
      raise ValueError(f"KV cache keys={self.keys!r}: expected 'token' or 'channel'")
    if self.key_group < 1:
      raise ValueError(f"KV cache key_group={self.key_group} must be positive")
    if not 0.0 < self.clip <= 1.0:
      raise ValueError(f"KV cache clip={self.clip} must be in (0, 1]")
    if self.bits is None and (self.keys != "token" or self.keys_before_rope):
      raise ValueError("a dense KV cache (bits=None) stores post-RoPE keys per token")

  @property
  def quantized(self) -> bool:
    return self.bits is not None

  def slots(self, max_len: int) -> int:
    """Cache slots for `max_len` tokens (a multiple of the key group for channel keys)."""
    multiple = self.key_group if self.keys == "channel" else PAGE_ALIGN if self.bits else 1
    return -(-max_len // multiple) * multiple

  def empty(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
            dtype=jnp.float32):
    """A cache for `batch` sequences of up to `max_len` tokens."""
    if self.bits is None:
      return DenseKVCache.zeros(batch, max_len, num_kv_heads, head_dim, dtype)
    per_byte = 8 // self.bits
    if head_dim % per_byte:
      raise ValueError(f"head_dim={head_dim} is not a multiple of {per_byte}, the codes per "
                       f"byte of a {self.bits}-bit cache")
    s = self.slots(max_len)
    token_shape = (num_kv_heads, batch, s)
    codes = lambda: jnp.zeros(token_shape + (head_dim // per_byte,), jnp.uint8)
    per_token = lambda: jnp.zeros(token_shape, jnp.float32)
    if self.keys == "channel":
      stats_shape = (num_kv_heads, batch, s // self.key_group, head_dim)
      k_scales, k_offsets = jnp.ones(stats_shape, jnp.float32), jnp.zeros(stats_shape,
                                                                          jnp.float32)
      k_window = jnp.zeros((num_kv_heads, batch, self.key_group, head_dim), dtype)
    else:
      k_scales, k_offsets, k_window = per_token(), per_token(), None
    return QuantizedKVCache(
        k_codes=codes(), k_scales=k_scales, k_offsets=k_offsets, v_codes=codes(),
        v_scales=per_token(), v_offsets=per_token(), k_window=k_window,
        length=jnp.zeros((), jnp.int32), bits=self.bits,
        key_group=self.key_group if self.keys == "channel" else 0,
        keys_before_rope=self.keys_before_rope, clip=self.clip)

  def bytes_per_token(self, num_kv_heads: int, head_dim: int, dtype_bytes: int = 2) -> float:
    """Cache bytes per token and layer (codes and grids; the float window not counted)."""
    if self.bits is None:
      return 2 * num_kv_heads * head_dim * dtype_bytes
    codes = 2 * num_kv_heads * head_dim * self.bits / 8
    value_grid = 2 * 4 * num_kv_heads
    key_grid = (2 * 4 * num_kv_heads * head_dim / self.key_group if self.keys == "channel"
                else 2 * 4 * num_kv_heads)
    return codes + value_grid + key_grid

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "KVFormat":
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown KV format fields {unknown} in {d}")
    return cls(**d)


DENSE = KVFormat()

KV_FORMATS: dict[str, KVFormat] = {
    "dense": DENSE,
    "kv8": KVFormat(bits=8),
    "kv4": KVFormat(bits=4, keys="channel", key_group=32),
    "kv4-token": KVFormat(bits=4),
    "kv4-atom": KVFormat(bits=4, keys_before_rope=True),
    "kv2": KVFormat(bits=2, keys="channel", key_group=32),
}


def kv_format(name_or_format) -> KVFormat:
  """A KVFormat from a name in KV_FORMATS, a dict (manifest) or a KVFormat."""
  if isinstance(name_or_format, KVFormat):
    return name_or_format
  if isinstance(name_or_format, dict):
    return KVFormat.from_dict(name_or_format)
  if name_or_format not in KV_FORMATS:
    raise ValueError(f"unknown KV cache format {name_or_format!r}; known: {sorted(KV_FORMATS)}")
  return KV_FORMATS[name_or_format]
