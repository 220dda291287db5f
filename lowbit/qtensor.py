"""QTensor: a quantized weight that replaces a dense weight leaf at the same path.

Terminology: *group* = the run of `group_size` consecutive input channels that share one
scale (and zero point); *main part* = the input channels that are quantized to `bits`;
*outlier tail* = the last `num_outliers` input channels (after `perm`), kept in int8 with
their own per-row scales (Atom).

Layout (chosen for the kernels, DESIGN.md): the logical weight is [N, K] = [out, in] with
the contraction axis K minor, as for dense weights. Symmetric codes are signed
(-2**(bits-1) .. 2**(bits-1)-1) and dequantize as `code * scale`, so int8 codes feed int8
tensor cores as they are; asymmetric codes are unsigned (0 .. 2**bits-1) and dequantize as
`(code - zero) * scale`.

4-bit packing ("group_halves"): two codes per byte (int8 two's-complement nibbles when
symmetric, uint8 when asymmetric). Within each group of g codes, byte j holds code j in
its low nibble and code j + g/2 in its high nibble, so a kernel unpacks a group with
shifts and no interleave: the low nibbles are the group's first half, the high nibbles
its second half.

Invariants (checked by `validate`):
  * shape = (N, K); K_main = K - num_outliers; K_main % group_size == 0; group_size even
    when bits <= 4.
  * codes int8 (symmetric) or uint8 (asymmetric): [N, K_main // 2] packed when bits <= 4,
    [N, K_main] otherwise.
  * scales float32 [N, K_main // group_size]; zeros (asymmetric only) float32, same shape.
  * num_outliers > 0: outlier_codes int8 [N, num_outliers] (symmetric, -127..127) and
    outlier_scales float32 [N, 1].
  * perm: int32 [K], a permutation; the QTensor represents W[:, perm] (the kernel gathers
    x[..., perm] before the product), so y = x @ W.T is unchanged.
  * act_quant, the activation quantizer the weight expects, is one of ACT_QUANTS:
    None (float activations); "int8_token" (symmetric int8, one scale per token: W8A8);
    "int4_group" (Atom W4A4: the gathered input in groups of `group_size`, symmetric 4-bit
    per token, and the tail in symmetric int8 per token; no clipping, as Atom's runtime
    kernels, SPEC.md 1.2); "int4_token" (symmetric 4-bit, one scale per token over the whole
    main part, the tail, if any, in int8 per token: QuaRot's activation quantizer).
  * act_clip in (0, 1]: the activation quantizer's scale is act_clip * max|x| / (2**(b-1) - 1)
    on the main part (Atom's simulation clips at 0.9; its CUDA kernels and the default, 1.0,
    do not clip); the int8 tail is never clipped.
  * input_transform, an orthonormal transform M [K, K] of the input that the stored weight is
    expressed in: None, or "hadamard" (M = `lowbit.hadamard.hadamard_matrix(K,
    seed=input_seed)`, plain when input_seed is None, randomized by seeded signs otherwise;
    K must be a buildable Hadamard order). The codes (and perm, groups, tail) are those of
    W M^T, and the product runs (x M^T) (W M^T)^T = x W^T: the input is rotated, then gathered
    by perm and quantized by act_quant, so the activation quantizer sees x M^T (QuaRot's
    online rotation; outliers spread over all channels). `dequantize` returns W (M^T undone);
    `dequantize(q, transformed=True)` returns W M^T. input_seed is None unless
    input_transform is set.

Sharding: codes, scales and zeros split along the weight's axes (`qtensor_sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lowbit.hadamard import apply_hadamard, has_hadamard

PACKING_4BIT = "group_halves"
ACT_QUANTS = (None, "int8_token", "int4_group", "int4_token")
INPUT_TRANSFORMS = (None, "hadamard")


@dataclasses.dataclass(frozen=True)
class QTensor:
  """See the module docstring for the layout and its invariants."""

  codes: jax.Array
  scales: jax.Array
  zeros: jax.Array | None = None
  outlier_codes: jax.Array | None = None
  outlier_scales: jax.Array | None = None
  perm: jax.Array | None = None
  # Static metadata (not pytree leaves).
  shape: tuple[int, int] = (0, 0)
  bits: int = 4
  group_size: int = 128
  num_outliers: int = 0
  dtype: str = "float32"
  # The activation quantizer this weight expects (None: activations stay in float).
  act_quant: Literal[None, "int8_token", "int4_group", "int4_token"] = None
  act_clip: float = 1.0
  # The orthonormal transform of the input the weight is stored in (None: the identity).
  input_transform: Literal[None, "hadamard"] = None
  input_seed: int | None = None

  @property
  def symmetric(self) -> bool:
    return self.zeros is None

  @property
  def packed(self) -> bool:
    return self.bits <= 4

  @property
  def ndim(self) -> int:
    return 2

  @property
  def main_width(self) -> int:
    return self.shape[1] - self.num_outliers

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (packed 4-bit codes count half a byte per value)."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(self))

  def dequantize(self, *, transformed: bool = False) -> jax.Array:
    return dequantize(self, transformed=transformed)


DATA_FIELDS = ("codes", "scales", "zeros", "outlier_codes", "outlier_scales", "perm")
META_FIELDS = ("shape", "bits", "group_size", "num_outliers", "dtype", "act_quant",
               "act_clip", "input_transform", "input_seed")
jax.tree_util.register_dataclass(QTensor, data_fields=list(DATA_FIELDS),
                                 meta_fields=list(META_FIELDS))


def pack_4bit(codes: jax.Array, group_size: int) -> jax.Array:
  """codes [N, K] (int8 in -8..7, or uint8 in 0..15) -> packed [N, K // 2], same dtype."""
  n, k = codes.shape
  nibbles = codes.astype(jnp.uint8).reshape(n, k // group_size, 2, group_size // 2)
  packed = (nibbles[:, :, 0] & 0xF) | (nibbles[:, :, 1] << 4)
  return packed.reshape(n, k // 2).astype(codes.dtype)


def unpack_4bit(packed: jax.Array, group_size: int) -> jax.Array:
  """packed [N, K // 2] -> codes [N, K]; the inverse of `pack_4bit`.

  For int8 input the shifts are arithmetic, so the nibbles come back sign-extended.
  """
  n, half_k = packed.shape
  groups = packed.reshape(n, half_k * 2 // group_size, 1, group_size // 2)
  if packed.dtype == jnp.int8:
    low = jnp.left_shift(groups, 4) >> 4
  else:
    low = groups & 0xF
  both = jnp.concatenate([low, groups >> 4], axis=2)
  return both.reshape(n, half_k * 2)


def codes_of(q: QTensor) -> jax.Array:
  """Unpacked codes of the main part: [N, K_main], int8 or uint8."""
  return unpack_4bit(q.codes, q.group_size) if q.packed else q.codes


@functools.partial(jax.jit, static_argnames=("transformed",))
def dequantize(q: QTensor, *, transformed: bool = False) -> jax.Array:
  """The float weight W [N, K] in the original input-channel order, in q.dtype; with
  `transformed`, W M^T in the basis of q.input_transform (what the simulated matmul
  multiplies the transformed input by; the same as W when input_transform is None)."""
  n, k = q.shape
  groups = codes_of(q).astype(jnp.float32).reshape(n, -1, q.group_size)
  if q.zeros is not None:
    groups = groups - q.zeros[..., None]
  main = (groups * q.scales[..., None]).reshape(n, q.main_width)
  if q.num_outliers:
    tail = q.outlier_codes.astype(jnp.float32) * q.outlier_scales
    main = jnp.concatenate([main, tail], axis=1)
  if q.perm is not None:
    # Stored column j is original column perm[j]: scatter back to the original order.
    main = jnp.zeros_like(main).at[:, q.perm].set(main)
  if q.input_transform is not None and not transformed:
    # Rows are M w: M^T undoes it.
    main = apply_input_transform(main, q, inverse=True)
  return main.astype(q.dtype)


def apply_input_transform(x: jax.Array, q: QTensor, *, inverse: bool = False) -> jax.Array:
  """x [..., K] -> x M^T (M = q's input transform; `inverse`: x M), in x's dtype.
  Traceable. The identity when q.input_transform is None."""
  if q.input_transform is None:
    return x
  # apply_hadamard computes M v for every vector v along the axis: for a row x, x M^T.
  return apply_hadamard(x, -1, seed=q.input_seed, transpose=inverse)


def validate(q: QTensor) -> None:
  """Raises ValueError naming the first broken invariant of the module docstring."""
  n, k = q.shape
  if not 2 <= q.bits <= 8:
    raise ValueError(f"QTensor bits={q.bits} out of range 2..8")
  if not 0 <= q.num_outliers < k:
    raise ValueError(f"QTensor num_outliers={q.num_outliers} out of range for K={k}")
  k_main = k - q.num_outliers
  if q.group_size <= 0 or k_main % q.group_size:
    raise ValueError(f"group_size={q.group_size} does not divide the {k_main} quantized "
                     f"input channels")
  if q.packed and q.group_size % 2:
    raise ValueError(f"4-bit packing needs an even group_size, got {q.group_size}")
  if q.act_quant not in ACT_QUANTS:
    raise ValueError(f"QTensor act_quant={q.act_quant!r} is not one of {ACT_QUANTS}")
  if not 0.0 < q.act_clip <= 1.0:
    raise ValueError(f"QTensor act_clip={q.act_clip} must be in (0, 1]")
  if q.input_transform not in INPUT_TRANSFORMS:
    raise ValueError(f"QTensor input_transform={q.input_transform!r} is not one of "
                     f"{INPUT_TRANSFORMS}")
  if q.input_transform is None and q.input_seed is not None:
    raise ValueError(f"QTensor input_seed={q.input_seed} without an input_transform")
  if q.input_seed is not None and not isinstance(q.input_seed, (int, np.integer)):
    raise ValueError(f"QTensor input_seed={q.input_seed!r} is not an integer")
  if q.input_transform == "hadamard" and not has_hadamard(k):
    raise ValueError(f"QTensor input_transform='hadamard' has no Hadamard matrix of order "
                     f"K={k}")

  def expect(name, array, shape, dtype):
    if array is None:
      raise ValueError(f"QTensor.{name} is missing")
    if tuple(array.shape) != shape or array.dtype != np.dtype(dtype):
      raise ValueError(f"QTensor.{name} is {array.dtype}{list(array.shape)}, "
                       f"expected {np.dtype(dtype)}{list(shape)}")

  code_dtype = np.int8 if q.zeros is None else np.uint8
  expect("codes", q.codes, (n, k_main // 2 if q.packed else k_main), code_dtype)
  expect("scales", q.scales, (n, k_main // q.group_size), np.float32)
  if q.zeros is not None:
    expect("zeros", q.zeros, (n, k_main // q.group_size), np.float32)
  if q.num_outliers:
    expect("outlier_codes", q.outlier_codes, (n, q.num_outliers), np.int8)
    expect("outlier_scales", q.outlier_scales, (n, 1), np.float32)
  elif q.outlier_codes is not None or q.outlier_scales is not None:
    raise ValueError("QTensor has outlier arrays but num_outliers=0")
  if q.perm is not None:
    expect("perm", q.perm, (k,), np.int32)
    if not np.array_equal(np.sort(np.asarray(q.perm)), np.arange(k)):
      raise ValueError("QTensor.perm is not a permutation of the input channels")


def qtensor_sharding(q: QTensor, weight_spec: PartitionSpec, mesh: Mesh) -> QTensor:
  """The shardings of q's arrays (a QTensor of NamedShardings, for `jax.device_put`) when
  the dense weight [N, K] would be sharded by `weight_spec`.

  Codes, scales and zeros split N and K like the weight (K in whole groups, so each shard
  dequantizes alone); the outlier tail and its scales split N only (the tail is one block
  of columns, kept whole); perm is replicated (each shard gathers its input from all of x).
  """
  spec = tuple(weight_spec) + (None,) * (2 - len(weight_spec))
  if len(spec) != 2:
    raise ValueError(f"{weight_spec=} has more than 2 axes for a [N, K] weight")
  n_axes, k_axes = spec

  def size(axes):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[a] for a in names]))

  n, _ = q.shape
  num_groups = q.main_width // q.group_size
  if n % size(n_axes):
    raise ValueError(f"N={n} output channels do not split over {n_axes=} of size "
                     f"{size(n_axes)}")
  if num_groups % size(k_axes):
    raise ValueError(f"{num_groups} groups of {q.group_size} input channels do not split "
                     f"over {k_axes=} of size {size(k_axes)}")

  def named(*axes):
    return NamedSharding(mesh, PartitionSpec(*axes))

  def present(array, sharding):
    return None if array is None else sharding

  return dataclasses.replace(
      q, codes=named(n_axes, k_axes), scales=named(n_axes, k_axes),
      zeros=present(q.zeros, named(n_axes, k_axes)),
      outlier_codes=present(q.outlier_codes, named(n_axes, None)),
      outlier_scales=present(q.outlier_scales, named(n_axes, None)),
      perm=present(q.perm, named(None)))
