"""LowRankKV: a head-grouped low-rank factorization of a K or V projection weight (Palu).

Motivation: Palu (SPEC.md 2) replaces each K/V projection W [out, in] by a down-projection
to a small latent per token (what the KV cache holds) and an up-projection back to the
heads. The leaf replaces the dense weight at the same path, so `lowbit.nn.Linear` runs it
through `lowrank_linear` and model code does not change (DESIGN.md).

Terminology: *head group* = `group_heads` consecutive KV heads factored together (Palu's
G-LRD; 1 head = M-LRD, all heads = J-LRD); G = out // (group_heads * head_dim) groups;
*latent* = the group's x @ down[g]^T, `rank` values per token per group; R = rank.

Layout: the logical weight is W [out, in] = [G * group_heads * head_dim, in] and
  W ~ blockdiag(up[0], .., up[G-1]) @ concat(down[0], .., down[G-1]),
with down float32 [G, R, in] and up float32 [G, group_heads * head_dim, R]. One rank for
every group of a leaf (Palu's `fisher_uniform` and `uniform` rank searches split a module's
rank evenly over its groups).

Optional, for the quantized-latent cache:
  * latent_bits in {2, 3, 4}: each group's latent is fake-quantized per token, asymmetric,
    one scale and zero point per (token, group) (Palu's lt_group_size 0, clip 1.0); this is
    exactly what a cache of quantized latents returns, so the simulation measures accuracy.
  * hadamard: an orthonormal Hadamard M [R, R] is already folded into the factors
    (down <- M^T down, up <- up M), so the latent the quantizer sees is rotated (outliers
    spread over its channels) and the product is unchanged. The flag only records it.

Invariants (checked by `validate`):
  * shape = (out, in); out = G * group_heads * head_dim with G >= 1;
  * 1 <= rank <= min(group_heads * head_dim, in);
  * down float32 [G, rank, in]; up float32 [G, group_heads * head_dim, rank];
  * latent_bits is None or one of 2, 3, 4; with hadamard, a Hadamard matrix of order rank
    exists (`lowbit.hadamard.has_hadamard`).

Runtime: `lowrank_latents` and `lowrank_expand` are the two halves of `lowrank_linear`;
`lowbit.latent_cache.LatentKVCache` stores the latents (quantized by `quantize_latents`, the
simulation's quantizer) and attention rebuilds K and V from them (models/transformer.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.hadamard import has_hadamard
from lowbit.nn import register_linear_impl
from lowbit.quantize import group_params, round_to_grid

LATENT_BITS = (None, 2, 3, 4)


@dataclasses.dataclass(frozen=True)
class LowRankKV:
  """See the module docstring for the layout and its invariants."""

  down: jax.Array  # [G, R, in]
  up: jax.Array  # [G, group_heads * head_dim, R]
  # Static metadata (not pytree leaves).
  shape: tuple[int, int] = (0, 0)
  group_heads: int = 1
  head_dim: int = 1
  rank: int = 1
  latent_bits: int | None = None
  hadamard: bool = False
  dtype: str = "float32"

  @property
  def ndim(self) -> int:
    return 2

  @property
  def num_groups(self) -> int:
    return self.shape[0] // (self.group_heads * self.head_dim)

  @property
  def nbytes(self) -> int:
    """Bytes of the stored factors."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(self))

  @property
  def latent_size(self) -> int:
    """Latent values per token (all groups): what the cache holds instead of `out`."""
    return self.num_groups * self.rank

  def latent_bytes_per_token(self, float_bytes: int = 2, scale_bytes: int = 2) -> float:
    """Cache bytes per token: latents at `float_bytes` each, or at latent_bits / 8 plus one
    scale and one zero point (`scale_bytes` each) per group when quantized."""
    if self.latent_bits is None:
      return float(self.latent_size * float_bytes)
    return self.latent_size * self.latent_bits / 8 + self.num_groups * 2 * scale_bytes

  def dequantize(self) -> jax.Array:
    return dense_weight(self)


DATA_FIELDS = ("down", "up")
META_FIELDS = ("shape", "group_heads", "head_dim", "rank", "latent_bits", "hadamard", "dtype")
jax.tree_util.register_dataclass(LowRankKV, data_fields=list(DATA_FIELDS),
                                 meta_fields=list(META_FIELDS))


def dense_weight(w: LowRankKV) -> jax.Array:
  """The product blockdiag(up) @ stack(down) [out, in] in w.dtype (latents unquantized)."""
  blocks = jnp.einsum("gor,gri->goi", w.up, w.down, precision=jax.lax.Precision.HIGHEST)
  return blocks.reshape(w.shape).astype(w.dtype)


def validate(w: LowRankKV) -> None:
  """Raises ValueError naming the first broken invariant of the module docstring."""
  out, k = w.shape
  if w.group_heads <= 0 or w.head_dim <= 0:
    raise ValueError(f"LowRankKV group_heads={w.group_heads} and head_dim={w.head_dim} must "
                     f"be positive")
  rows = w.group_heads * w.head_dim
  if out % rows or out == 0:
    raise ValueError(f"LowRankKV out={out} is not a multiple of group_heads * head_dim = "
                     f"{w.group_heads} * {w.head_dim}")
  if not 1 <= w.rank <= min(rows, k):
    raise ValueError(f"LowRankKV rank={w.rank} out of range 1..{min(rows, k)}")
  if w.latent_bits not in LATENT_BITS:
    raise ValueError(f"LowRankKV latent_bits={w.latent_bits!r} is not one of {LATENT_BITS}")
  if w.hadamard and not has_hadamard(w.rank):
    raise ValueError(f"LowRankKV hadamard=True but no Hadamard matrix of order rank={w.rank} "
                     f"is built (lowbit.hadamard)")
  g = out // rows
  for name, array, shape in (("down", w.down, (g, w.rank, k)), ("up", w.up, (g, rows, w.rank))):
    if array is None:
      raise ValueError(f"LowRankKV.{name} is missing")
    if tuple(array.shape) != shape or array.dtype != np.float32:
      raise ValueError(f"LowRankKV.{name} is {array.dtype}{list(array.shape)}, expected "
                       f"float32{list(shape)}")


def lowrank_latents(x: jax.Array, w: LowRankKV) -> jax.Array:
  """x [..., in] -> float32 latents [..., G, R] (x @ down[g]^T per group): what a latent
  cache stores for each token."""
  return jnp.einsum("...i,gri->...gr", x.astype(jnp.float32), w.down,
                    precision=jax.lax.Precision.HIGHEST)


def lowrank_expand(latents: jax.Array, w: LowRankKV) -> jax.Array:
  """latents [..., G, R] -> float32 [..., out]: each group's up-projection back to its heads."""
  y = jnp.einsum("...gr,gor->...go", latents.astype(jnp.float32), w.up,
                 precision=jax.lax.Precision.HIGHEST)
  return y.reshape(*latents.shape[:-2], w.shape[0])


def quantize_latents(latents: jax.Array, bits: int):
  """latents [..., R] -> (uint8 codes [..., R], scales [...], offsets [...]) float32, one
  asymmetric grid per token and group: latent ~ code * scale + offset.

  The grid is `lowbit.quantize`'s asymmetric one (`fake_quantize(..., symmetric=False)`:
  integer zero point, a constant group widened to include 0), so the codes are those of
  that simulation; offset = -zero * scale is the form the latent decode kernel reads. The
  one quantizer of both the simulation (`lowrank_linear`) and the latent cache
  (`lowbit.latent_cache`), so the two agree bit for bit.
  """
  scale, zero = group_params(latents.astype(jnp.float32), bits=bits, symmetric=False,
                             clip_ratio=1.0)
  codes = round_to_grid(latents.astype(jnp.float32), scale, zero, bits=bits)
  return codes.astype(jnp.uint8), scale[..., 0], (-zero * scale)[..., 0]


def dequantize_latents(codes: jax.Array, scales: jax.Array, offsets: jax.Array) -> jax.Array:
  """codes [..., R], scales / offsets [...] -> float32 latents code * scale + offset."""
  return codes.astype(jnp.float32) * scales[..., None] + offsets[..., None]


def lowrank_linear(x: jax.Array, w: LowRankKV) -> jax.Array:
  """x [..., in] -> latents [..., G, R] -> (quantized per token and group) -> [..., out].

  The float32 product, as a latent cache would give it, returned in x's dtype.
  """
  latents = lowrank_latents(x, w)
  if w.latent_bits is not None:
    latents = dequantize_latents(*quantize_latents(latents, w.latent_bits))
  return lowrank_expand(latents, w).astype(x.dtype)


register_linear_impl(LowRankKV, lowrank_linear)
