"""Plain-jnp reference of the dynamic activation quantizer: the oracle and the fallback.

What it computes, per token (row of x [M, K]):
  1. optionally RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w in float32, rounded to x.dtype
     (the dtype a model's norm hands to the next linear);
  2. optionally the gather by a static channel permutation: y[:, perm];
  3. the last `num_outliers` channels (Atom's outlier tail) in symmetric int8 with one
     scale per token, max|y| / 127, never clipped;
  4. the remaining K_main channels in symmetric `bits`-bit codes, one scale per group of
     `group_size` channels (None: one group per token), clipped at `clip_ratio`.

Grid (the same as `lowbit.quantize.fake_quantize`, restated here because this package
depends on JAX alone; tests check the two agree bit for bit): scale = max|y| *
float32(clip_ratio / (2**(bits-1) - 1)), 1.0 where that is 0; code = clip(round(y / scale),
-2**(bits-1), 2**(bits-1) - 1), rounded half to even; y ~ code * scale.

Output layout: exactly what `quantized_matmul.int8_matmul` (bits 8, one group) and
`quantized_matmul.w4a4_matmul` (bits 4, "group_halves" packing: within each group of g
codes, byte j holds code j in its low nibble and code j + g/2 in its high nibble) take.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul.reference import pack_4bit, unpack_4bit


class QuantizedActivations(NamedTuple):
  """The quantizer's output (a pytree).

  codes: int8 [M, K_main] (bits 8) or packed 4-bit int8 [M, K_main // 2] (bits 4).
  scales: float32 [M, K_main // group_size] ([M, 1] for one group per token).
  outlier_codes: int8 [M, num_outliers], or None without a tail.
  outlier_scales: float32 [M, 1], or None without a tail.
  """

  codes: jax.Array
  scales: jax.Array
  outlier_codes: jax.Array | None
  outlier_scales: jax.Array | None


def scale_factor(bits: int, clip_ratio: float) -> np.float32:
  """clip_ratio / (2**(bits-1) - 1) as one float32 constant: scale = max|y| * this (one
  multiply, so numpy, XLA and the kernels round it alike)."""
  return np.float32(clip_ratio / (2 ** (bits - 1) - 1))


def validate_inputs(x, *, bits: int, group_size: int | None, clip_ratio: float,
                    perm, num_outliers: int, rms_norm_weight) -> int:
  """Shape, dtype and setting checks (shared by every implementation); returns the group
  size (K_main for one group per token). Raises ValueError naming the argument."""
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"x must be [M, K], got shape {getattr(x, 'shape', None)}")
  if x.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"x.dtype={x.dtype} must be bfloat16, float16 or float32")
  if bits not in (4, 8):
    raise ValueError(f"{bits=} must be 4 or 8")
  if not 0.0 < clip_ratio <= 1.0:
    raise ValueError(f"{clip_ratio=} must be in (0, 1]")
  k = x.shape[1]
  if not 0 <= num_outliers < k:
    raise ValueError(f"{num_outliers=} out of range for K={k} channels")
  k_main = k - num_outliers
  g = k_main if group_size is None else group_size
  if g <= 0 or k_main % g:
    raise ValueError(f"{group_size=} does not divide the {k_main} quantized channels "
                     f"(K={k} minus num_outliers={num_outliers})")
  if bits == 4 and g % 2:
    raise ValueError(f"{group_size=} must be even for 4-bit packing (group of {g})")
  if perm is not None and (perm.shape != (k,) or perm.dtype != jnp.int32):
    raise ValueError(f"perm must be int32 [{k}], got {perm.dtype}{list(perm.shape)}")
  if rms_norm_weight is not None and rms_norm_weight.shape != (k,):
    raise ValueError(f"rms_norm_weight must be [{k}], got {list(rms_norm_weight.shape)}")
  return g


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """x [M, K] -> x * rsqrt(mean(x^2) + eps) * weight, computed in float32, in x.dtype."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(eps))
  return (x32 * inv * weight.astype(jnp.float32)).astype(x.dtype)


def _quantize_groups(y, *, bits: int, group_size: int, clip_ratio: float):
  """y float32 [M, W] -> (codes int8 [M, W], scales float32 [M, W // group_size])."""
  m, w = y.shape
  groups = y.reshape(m, w // group_size, group_size)
  scale = jnp.max(jnp.abs(groups), axis=-1, keepdims=True) * scale_factor(bits, clip_ratio)
  scale = jnp.where(scale > 0, scale, 1.0)
  lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  codes = jnp.clip(jnp.round(groups / scale), lo, hi).astype(jnp.int8)
  return codes.reshape(m, w), scale[..., 0]


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "clip_ratio",
                                             "num_outliers", "eps"))
def quantize_activations(x: jax.Array, *, bits: int, group_size: int | None = None,
                         clip_ratio: float = 1.0, perm: jax.Array | None = None,
                         num_outliers: int = 0, rms_norm_weight: jax.Array | None = None,
                         eps: float = 1e-6) -> QuantizedActivations:
  """See the module docstring; x [M, K] -> QuantizedActivations."""
  g = validate_inputs(x, bits=bits, group_size=group_size, clip_ratio=clip_ratio,
                      perm=perm, num_outliers=num_outliers, rms_norm_weight=rms_norm_weight)
  if rms_norm_weight is not None:
    x = rms_norm(x, rms_norm_weight, eps)
  y = x.astype(jnp.float32)
  if perm is not None:
    y = y[:, perm]
  k_main = y.shape[1] - num_outliers
  codes, scales = _quantize_groups(y[:, :k_main], bits=bits, group_size=g,
                                   clip_ratio=clip_ratio)
  if bits == 4:
    codes = pack_4bit(codes, g)
  if not num_outliers:
    return QuantizedActivations(codes, scales, None, None)
  tail, tail_scales = _quantize_groups(y[:, k_main:], bits=8, group_size=num_outliers,
                                       clip_ratio=1.0)
  return QuantizedActivations(codes, scales, tail, tail_scales)


def dequantize(q: QuantizedActivations, *, bits: int, group_size: int) -> jax.Array:
  """The float32 values [M, K_main + num_outliers] the codes stand for (tests, debugging);
  `group_size` is the group the codes were made with (K_main for one per token)."""
  codes = unpack_4bit(q.codes, group_size) if bits == 4 else q.codes
  m, k_main = codes.shape
  main = (codes.astype(jnp.float32).reshape(m, -1, group_size) * q.scales[..., None])
  out = main.reshape(m, k_main)
  if q.outlier_codes is not None:
    out = jnp.concatenate([out, q.outlier_codes.astype(jnp.float32) * q.outlier_scales],
                          axis=1)
  return out
