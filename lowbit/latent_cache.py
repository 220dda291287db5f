"""LatentKVCache: the KV cache of a Palu layer holds per-token latents, not keys and values.

Motivation: Palu (SPEC.md 2.2) factors K and V projections into a down-projection to a
small latent per token and head group (`lowbit.lowrank.LowRankKV`) and an up-projection back
to the heads; the cache keeps only the latents (optionally quantized per token), and
attention rebuilds keys and values from them: at prefill with jnp, at decode inside
`pallas_kernels.latent_decode_attention` (keys rebuilt and rotated in the kernel, values
kept latent until after the softmax).

Layout (G head groups, B sequences, S slots; slot s holds position s):
  * float latents (latent_bits None): k_latents [G, B, S, Rk] and v_latents [G, B, S, Rv] in
    the activation dtype (bf16 models round them to bf16, as a dense cache rounds K and V;
    the no-cache simulation keeps them in float32); no scales.
  * quantized latents (latent_bits 2, 3 or 4): uint8 [G, B, S, R / 2], two codes per byte
    in the "halves" layout of `lowbit.kv_cache.pack_codes(codes, 4)` (low nibble = element
    j, high nibble = element j + R/2), and k/v_scales, k/v_offsets float32 [G, B, S]:
    latent = code * scale + offset (`lowbit.lowrank.quantize_latents`, the quantizer of the
    simulation, so a cached run reproduces the perplexity run). 2- and 3-bit codes are
    stored in nibbles too, so one decode kernel reads every width: they take 4 bits of
    memory each here (`nbytes` counts what is stored), not bits / 8 bytes as
    `LowRankKV.latent_bytes_per_token` (the ideal packing) counts them.
  * S is a multiple of SLOT_ALIGN (the kernels' tiles).
  * length: int32 [], tokens written (the same for every sequence); slots >= length are
    stale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lowbit.kv_cache import pack_codes, unpack_codes
from lowbit.lowrank import LowRankKV, dequantize_latents, quantize_latents

# Bits per stored code of a quantized latent cache, whatever latent_bits is (docstring).
STORED_CODE_BITS = 4
# Caches have a multiple of this many slots: the default tiles of the latent decode
# kernels (pallas_kernels.latent_decode_attention.config: 128 slots on GPU and TPU),
# which otherwise pad (copy) the whole cache at every decode step.
SLOT_ALIGN = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentKVCache:
  """Palu latents of one layer; see the module docstring for the layout."""

  k_latents: jax.Array  # [G, B, S, Rk] float, or uint8 [G, B, S, Rk / 2]
  v_latents: jax.Array  # [G, B, S, Rv] float, or uint8 [G, B, S, Rv / 2]
  k_scales: jax.Array | None  # f32 [G, B, S] (None for float latents)
  k_offsets: jax.Array | None
  v_scales: jax.Array | None
  v_offsets: jax.Array | None
  length: jax.Array  # int32 []
  latent_bits: int | None = dataclasses.field(metadata=dict(static=True), default=None)

  # Reading back gives the latents as stored (quantized, or in the activation dtype).
  exact = False
  paged = False

  @classmethod
  def zeros(cls, batch: int, max_len: int, num_groups: int, k_rank: int, v_rank: int,
            latent_bits: int | None, dtype=jnp.float32) -> "LatentKVCache":
    """An empty cache for `batch` sequences of up to `max_len` tokens (max_len rounded up
    to a multiple of SLOT_ALIGN slots)."""
    if latent_bits not in (None, 2, 3, 4):
      raise ValueError(f"latent_bits={latent_bits!r} is not one of (None, 2, 3, 4)")
    if min(batch, max_len, num_groups, k_rank, v_rank) < 1:
      raise ValueError(f"LatentKVCache needs positive sizes, got batch={batch} "
                       f"max_len={max_len} num_groups={num_groups} k_rank={k_rank} "
                       f"v_rank={v_rank}")
    slots = (num_groups, batch, -(-max_len // SLOT_ALIGN) * SLOT_ALIGN)
    if latent_bits is None:
      latents = lambda rank: jnp.zeros(slots + (rank,), dtype)
      grid = lambda: None
    else:
      for name, rank in (("k_rank", k_rank), ("v_rank", v_rank)):
        if rank % 2:
          raise ValueError(f"{name}={rank} must be even: quantized latents are stored two "
                           f"codes per byte")
      latents = lambda rank: jnp.zeros(slots + (rank // 2,), jnp.uint8)
      grid = lambda: jnp.zeros(slots, jnp.float32)
    return cls(k_latents=latents(k_rank), v_latents=latents(v_rank), k_scales=grid(),
               k_offsets=grid(), v_scales=grid(), v_offsets=grid(),
               length=jnp.zeros((), jnp.int32), latent_bits=latent_bits)

  @classmethod
  def for_projections(cls, k_weight: LowRankKV, v_weight: LowRankKV, batch: int,
                      max_len: int, dtype=jnp.float32) -> "LatentKVCache":
    """The cache of a layer whose k_proj / v_proj weights are these Palu factors."""
    if k_weight.num_groups != v_weight.num_groups or (
        k_weight.group_heads != v_weight.group_heads):
      raise ValueError(f"k_proj and v_proj must share their head groups for a latent cache: "
                       f"k has {k_weight.num_groups} groups of {k_weight.group_heads} heads, "
                       f"v {v_weight.num_groups} of {v_weight.group_heads}")
    if k_weight.latent_bits != v_weight.latent_bits:
      raise ValueError(f"k_proj latent_bits={k_weight.latent_bits} and v_proj latent_bits="
                       f"{v_weight.latent_bits} must agree for one latent cache")
    return cls.zeros(batch, max_len, k_weight.num_groups, k_weight.rank, v_weight.rank,
                     k_weight.latent_bits, dtype)

  @property
  def num_groups(self) -> int:
    return self.k_latents.shape[0]

  @property
  def batch(self) -> int:
    return self.k_latents.shape[1]

  @property
  def max_len(self) -> int:
    return self.k_latents.shape[2]

  @property
  def ranks(self) -> tuple[int, int]:
    """(Rk, Rv): latent values per token and group."""
    per_byte = 1 if self.latent_bits is None else 8 // STORED_CODE_BITS
    return self.k_latents.shape[3] * per_byte, self.v_latents.shape[3] * per_byte

  @property
  def nbytes(self) -> int:
    """Bytes stored: latents (4 bits per code when quantized), grids and the length."""
    return sum(a.nbytes for a in jax.tree_util.tree_leaves(self))

  def _check_latents(self, k_new: jax.Array, v_new: jax.Array) -> None:
    t = k_new.shape[1] if k_new.ndim == 4 else -1
    for name, new, rank in (("k_new", k_new, self.ranks[0]), ("v_new", v_new, self.ranks[1])):
      if tuple(new.shape) != (self.batch, t, self.num_groups, rank):
        raise ValueError(f"{name}.shape={tuple(new.shape)} must be [B={self.batch}, T, "
                         f"G={self.num_groups}, R={rank}] (T the same for k_new and v_new)")

  def _encode(self, latents: jax.Array) -> dict:
    """latents [G, B, T, R] -> the stored form: latents, scales, offsets."""
    if self.latent_bits is None:
      return dict(latents=latents.astype(self.k_latents.dtype), scales=None, offsets=None)
    codes, scales, offsets = quantize_latents(latents, self.latent_bits)
    return dict(latents=pack_codes(codes, STORED_CODE_BITS), scales=scales, offsets=offsets)

  def write(self, k_new: jax.Array, v_new: jax.Array, start, prefill: bool = False
            ) -> "LatentKVCache":
    """Stores k_new [B, T, G, Rk] and v_new [B, T, G, Rv] (float latents of
    `lowbit.lowrank.lowrank_latents`) at slots start .. start+T-1."""
    del prefill  # every token is stored on its own: a prefill is one write of T tokens
    self._check_latents(k_new, v_new)
    fields = dict(length=jnp.asarray(start + k_new.shape[1], jnp.int32))
    for prefix, new in (("k", k_new), ("v", v_new)):
      for name, value in self._encode(jnp.transpose(new, (2, 0, 1, 3))).items():
        buffer = getattr(self, f"{prefix}_{name}")
        if buffer is not None:
          index = (0, 0, start) + (0,) * (buffer.ndim - 3)
          fields[f"{prefix}_{name}"] = jax.lax.dynamic_update_slice(buffer, value, index)
    return dataclasses.replace(self, **fields)

  def _decode(self, prefix: str, slots: int) -> jax.Array:
    """-> float32 latents [G, B, slots, R] of keys ("k") or values ("v")."""
    stored, scales, offsets = (None if a is None else a[:, :, :slots] for a in (
        getattr(self, f"{prefix}_latents"), getattr(self, f"{prefix}_scales"),
        getattr(self, f"{prefix}_offsets")))
    if self.latent_bits is None:
      return stored.astype(jnp.float32)
    return dequantize_latents(unpack_codes(stored, STORED_CODE_BITS), scales, offsets)

  def read(self, slots: int | None = None) -> tuple[jax.Array, jax.Array]:
    """-> (k, v) float32 latents [B, S, G, Rk], [B, S, G, Rv] as stored (dequantized), of
    every slot or of the first `slots` (a prefill reads back only its own)."""
    slots = self.max_len if slots is None else slots
    to_bsgr = lambda x: jnp.transpose(x, (1, 2, 0, 3))
    return to_bsgr(self._decode("k", slots)), to_bsgr(self._decode("v", slots))

  def kernel_inputs(self) -> dict:
    """The operands of `pallas_kernels.latent_decode_attention` that the cache holds:
    k/v_latents, k/v_scales, k/v_offsets and bits (4 for every quantized width, since the
    codes sit in nibbles; None for float latents)."""
    return dict(k_latents=self.k_latents, v_latents=self.v_latents, k_scales=self.k_scales,
                k_offsets=self.k_offsets, v_scales=self.v_scales, v_offsets=self.v_offsets,
                bits=None if self.latent_bits is None else STORED_CODE_BITS)
