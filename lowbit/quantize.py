"""Round-to-nearest (RTN) group quantization of weights, and fake quantization of activations.

Grids (SPEC.md 1.1, Atom's RTN path):
  * symmetric: scale = max|x| * (clip / (2**(bits-1) - 1)), codes = clip(round(x / scale),
    -2**(bits-1), 2**(bits-1) - 1), x ~ codes * scale (absmax / 7 at 4 bits; code -8 is
    reached only by clipped values).
  * asymmetric: scale = (max - min) * (clip / (2**bits - 1)), zero = round(-clip * min /
    scale), codes = clip(round(x / scale) + zero, 0, 2**bits - 1), x ~ (codes - zero) *
    scale. The clip shrinks the range [min, max] toward 0 at both ends, as Atom's quantizer
    does (the same as round(-min / scale) when clip = 1). Zero points are integers stored
    as float32.
  * A group whose values are all equal (constant group: max == min, or all zero) would get
    scale 0. Its range is widened to include 0 (then a group of zeros gets scale 1), so the
    constant is represented instead of dividing by zero.
  * The outlier tail (Atom) is symmetric int8 with one scale per row: max|x| / 127.

Shared by GPTQ (`lowbit.gptq`), which rounds one column at a time with `group_params` and
`round_to_grid`, so the two quantizers agree bit for bit where GPTQ has no error to
propagate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lowbit.qtensor import ACT_QUANTS, QTensor, pack_4bit

# Divisors that are multiples of this are preferred by `fit_group_size`: 32 int8 lanes are
# the smallest K tile the int8 tensor-core / MXU kernels use.
_GROUP_ALIGN = 32


def fit_group_size(width: int, requested: int) -> int:
  """The group size to use on `width` channels when `requested` may not divide it.

  Rule: the largest divisor of `width` that is <= `requested` and a multiple of 32; else
  the largest even divisor <= `requested` (4-bit packing needs even groups); else the
  largest divisor <= `requested`. For example (576, 128) -> 96, (4096, 128) -> 128,
  (100, 128) -> 100, (90, 64) -> 30.
  """
  if width <= 0 or requested <= 0:
    raise ValueError(f"fit_group_size needs positive sizes, got {width=} {requested=}")
  divisors = [d for d in range(1, min(width, requested) + 1) if width % d == 0]
  return max(divisors, key=lambda d: (d % _GROUP_ALIGN == 0, d % 2 == 0, d))


def check_quant_args(*, bits: int, group_size: int | None, width: int, clip_ratio: float,
                     packed: bool = True) -> int:
  """Validates the shared arguments; returns the group size (None or -1: `width`).

  `packed`: the codes will be stored (4-bit packing needs even groups).
  """
  if not (isinstance(bits, (int, np.integer)) and 2 <= bits <= 8):
    raise ValueError(f"{bits=} out of range 2..8")
  if not 0.0 < clip_ratio <= 1.0:
    raise ValueError(f"{clip_ratio=} must be in (0, 1]")
  g = width if group_size is None or group_size == -1 else group_size
  if g <= 0:
    raise ValueError(f"{group_size=} must be positive, or None / -1 for one group per row")
  if width % g:
    raise ValueError(f"{group_size=} does not divide the {width} quantized channels "
                     f"(fit_group_size({width}, {g}) = {fit_group_size(width, g)} does)")
  if packed and bits <= 4 and g % 2:
    raise ValueError(f"{group_size=} must be even for {bits}-bit packing")
  return int(g)


def group_params(x: jax.Array, *, bits: int, symmetric: bool,
                 clip_ratio: float) -> tuple[jax.Array, jax.Array | None]:
  """x [..., g] float32 -> (scale [..., 1], zero [..., 1] or None): one grid per group."""
  # One multiply by a float32 constant: the same rounding in any compiler or in numpy.
  if symmetric:
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) * np.float32(
        clip_ratio / (2**(bits - 1) - 1))
    return jnp.where(scale > 0, scale, 1.0), None
  hi, lo = jnp.max(x, axis=-1, keepdims=True), jnp.min(x, axis=-1, keepdims=True)
  constant = hi == lo
  hi = jnp.where(constant, jnp.maximum(hi, 0.0), hi)
  lo = jnp.where(constant, jnp.minimum(lo, 0.0), lo)
  scale = (hi - lo) * np.float32(clip_ratio / (2**bits - 1))
  scale = jnp.where(scale > 0, scale, 1.0)
  return scale, jnp.round(lo * np.float32(-clip_ratio) / scale)


def round_to_grid(x: jax.Array, scale: jax.Array, zero: jax.Array | None, *,
                  bits: int) -> jax.Array:
  """Integer codes (as float32) of x on the grid; scale and zero broadcast against x."""
  if zero is None:
    return jnp.clip(jnp.round(x / scale), -2**(bits - 1), 2**(bits - 1) - 1)
  return jnp.clip(jnp.round(x / scale) + zero, 0, 2**bits - 1)


def from_grid(codes: jax.Array, scale: jax.Array, zero: jax.Array | None) -> jax.Array:
  """The float values the codes stand for: (codes - zero) * scale."""
  return (codes if zero is None else codes - zero) * scale


def _quantize_groups(x, *, bits, group_size, symmetric, clip_ratio):
  """x [..., K] -> (codes [..., K // g, g] float, scale [..., K // g, 1], zero or None)."""
  groups = x.reshape(*x.shape[:-1], -1, group_size)
  scale, zero = group_params(groups, bits=bits, symmetric=symmetric, clip_ratio=clip_ratio)
  return round_to_grid(groups, scale, zero, bits=bits), scale, zero


def assemble_qtensor(codes: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                     tail: jax.Array, perm: jax.Array | None, *, bits: int,
                     group_size: int) -> QTensor:
  """Stores integer-valued float codes [N, K_main], scales and zeros [N, K_main // g] in the
  QTensor layout; the float tail [N, num_outliers] (num_outliers may be 0) is rounded here
  to int8 per row. Shared by RTN and GPTQ (inside their jit; dtype and act_quant are left
  at their defaults for the caller to set).
  """
  n, k_main = codes.shape
  codes = codes.astype(jnp.int8 if zeros is None else jnp.uint8)
  if bits <= 4:
    codes = pack_4bit(codes, group_size)
  outlier_codes = outlier_scales = None
  num_outliers = tail.shape[1]
  if num_outliers:
    tail_codes, tail_scale, _ = _quantize_groups(tail, bits=8, group_size=num_outliers,
                                                 symmetric=True, clip_ratio=1.0)
    outlier_codes, outlier_scales = tail_codes[:, 0].astype(jnp.int8), tail_scale[:, 0]
  return QTensor(
      codes=codes, scales=scales.astype(jnp.float32),
      zeros=None if zeros is None else zeros.astype(jnp.float32),
      outlier_codes=outlier_codes, outlier_scales=outlier_scales,
      perm=perm, shape=(n, k_main + num_outliers), bits=bits, group_size=group_size,
      num_outliers=num_outliers)


def check_weight(w, *, num_outliers: int, perm, act_quant) -> np.ndarray | None:
  """Validates a weight's shape and dtype and the layout arguments; returns perm as int32
  or None. (Quantizers check the values for NaN / Inf inside their jitted computation.)"""
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"weight must be [N, K], got shape {getattr(w, 'shape', None)}")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"weight must be floating point, got {w.dtype}")
  k = w.shape[1]
  if not 0 <= num_outliers < k:
    raise ValueError(f"{num_outliers=} out of range for K={k} input channels")
  if act_quant not in ACT_QUANTS:
    raise ValueError(f"{act_quant=} is not one of {ACT_QUANTS}")
  if perm is None:
    return None
  perm = np.asarray(perm)
  if perm.shape != (k,) or not np.array_equal(np.sort(perm), np.arange(k)):
    raise ValueError(f"perm must be a permutation of the K={k} input channels, got "
                     f"shape {perm.shape}")
  return perm.astype(np.int32)


def weight_dtype_name(w) -> str:
  """The dtype the QTensor dequantizes to: w's, as jax holds it (float64 -> float32 without
  x64)."""
  return jax.dtypes.canonicalize_dtype(w.dtype).name


def quantize_weight(w: jax.Array, *, bits: int, group_size: int | None, symmetric: bool,
                    clip_ratio: float = 1.0, num_outliers: int = 0, perm=None,
                    act_quant: str | None = None) -> QTensor:
  """Round-to-nearest quantization of a weight [N, K] (out, in) into a QTensor.

  Columns are first reordered by `perm` (the QTensor stores W[:, perm]); the last
  `num_outliers` columns of that order become the int8 tail, the rest are quantized in
  groups of `group_size` consecutive columns (None or -1: one group per row). Offline: the
  weight must be concrete (it is checked for NaN/Inf).
  """
  perm = check_weight(w, num_outliers=num_outliers, perm=perm, act_quant=act_quant)
  g = check_quant_args(bits=bits, group_size=group_size, width=w.shape[1] - num_outliers,
                       clip_ratio=clip_ratio)
  q, finite = _rtn(w, perm, bits=bits, group_size=g, symmetric=bool(symmetric),
                   clip_ratio=float(clip_ratio), num_outliers=num_outliers)
  if not finite:
    raise ValueError("weight has NaN or Inf entries")
  return dataclasses.replace(q, dtype=weight_dtype_name(w), act_quant=act_quant)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "clip_ratio",
                                             "num_outliers"))
def _rtn(w, perm, *, bits, group_size, symmetric, clip_ratio, num_outliers):
  w = w.astype(jnp.float32)
  if perm is not None:
    w = w[:, perm]
  n, k = w.shape
  k_main = k - num_outliers
  codes, scale, zero = _quantize_groups(w[:, :k_main], bits=bits, group_size=group_size,
                                        symmetric=symmetric, clip_ratio=clip_ratio)
  q = assemble_qtensor(codes.reshape(n, k_main), scale[..., 0],
                       None if zero is None else zero[..., 0], w[:, k_main:], perm,
                       bits=bits, group_size=group_size)
  return q, jnp.isfinite(w).all()


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "symmetric", "clip_ratio",
                                             "num_outliers"))
def fake_quantize(x: jax.Array, *, bits: int, group_size: int | None = None,
                  symmetric: bool = True, clip_ratio: float = 1.0,
                  num_outliers: int = 0) -> jax.Array:
  """Quantize-dequantize along the last axis: simulates a dynamic activation / KV quantizer.

  Each row (token) gets its own grid per group of `group_size` channels (None or -1: the
  whole row); the last `num_outliers` channels are kept in symmetric int8 with one scale
  per row (Atom's activation quantizer, SPEC.md 1.1 step 4). Traceable (runs inside jit).
  Returns x's shape and dtype.
  """
  if not 0 <= num_outliers < x.shape[-1]:
    raise ValueError(f"{num_outliers=} out of range for {x.shape[-1]} channels")
  k_main = x.shape[-1] - num_outliers
  g = check_quant_args(bits=bits, group_size=group_size, width=k_main, clip_ratio=clip_ratio,
                       packed=False)
  x32 = x.astype(jnp.float32)
  out = _fake_groups(x32[..., :k_main], bits=bits, group_size=g, symmetric=symmetric,
                     clip_ratio=clip_ratio)
  if num_outliers:
    tail = _fake_groups(x32[..., k_main:], bits=8, group_size=num_outliers, symmetric=True,
                        clip_ratio=1.0)
    out = jnp.concatenate([out, tail], axis=-1)
  return out.astype(x.dtype)


def _fake_groups(x, **quant_args):
  return from_grid(*_quantize_groups(x, **quant_args)).reshape(x.shape)
