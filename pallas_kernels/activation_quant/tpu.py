"""Pallas (Mosaic TPU) kernel of the activation quantizer.

Same signature as `reference.quantize_activations`, plus `block_sizes=` and `interpret=`
(pass `pltpu.InterpretParams()` to run on a CPU).

Design: one grid step per block of `block_m` tokens holds their whole row in VMEM, viewed
as [block_m, G, g] (G groups of g channels; a free reshape of x in HBM), so a group's max
is a lane reduction and its scale a [block_m, G, 1] column; the tail is a second input
[block_m, n_out]. 4-bit codes are packed on the VPU from the two halves of each group
("group_halves": the halves become the low and high nibbles of the same bytes). Division
and rounding (half to even, Mosaic's roundeven) are those of the reference.

Limits: Mosaic has no lane gather across vregs, so a `perm` gather (and the matching
gather of the norm weight) runs in XLA before the kernel: one extra pass over x, which the
GPU kernel fuses. With a tail or a perm, the split into [M, G, g] and [M, n_out] is an XLA
copy as well. Validated in TPU interpret mode and by lowering to Mosaic on a CPU; not yet
run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.activation_quant import reference
from pallas_kernels.activation_quant.config import TpuBlockSizes
from pallas_kernels.activation_quant.reference import QuantizedActivations


def _codes_and_scale(y, *, bits: int, clip: float):
  """y float32 [..., w] -> (int32 codes [..., w], scale [..., 1]): one grid per row."""
  scale = jnp.max(jnp.abs(y), axis=-1, keepdims=True) * reference.scale_factor(bits, clip)
  scale = jnp.where(scale > 0, scale, 1.0)
  lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
  return jnp.clip(jnp.round(y / scale), lo, hi).astype(jnp.int32), scale


def _kernel(*refs, k: int, bits: int, g: int, n_out: int, clip_ratio: float, eps: float,
            has_norm: bool):
  refs = list(refs)
  main_ref = refs.pop(0)  # [bm, G, g]
  tail_in_ref = refs.pop(0) if n_out else None  # [bm, n_out]
  w_main_ref = refs.pop(0) if has_norm else None  # [1, G, g]
  w_tail_ref = refs.pop(0) if has_norm and n_out else None  # [1, n_out]
  codes_ref, scales_ref = refs[:2]  # i8[bm, G, g (/ 2)], f32[bm, G, 1]
  tail_ref, tail_scales_ref = refs[2:] if n_out else (None, None)  # i8[bm, n_out], f32[bm, 1]
  dtype = main_ref.dtype
  main = main_ref[...].astype(jnp.float32)
  tail = tail_in_ref[...].astype(jnp.float32) if n_out else None
  if has_norm:
    total = jnp.sum(jnp.sum(main * main, axis=2), axis=1, keepdims=True)  # [bm, 1]
    if n_out:
      total = total + jnp.sum(tail * tail, axis=1, keepdims=True)
    inv = jax.lax.rsqrt(total / np.float32(k) + np.float32(eps))
    # Rounded to x.dtype: the norm's output dtype in a model (reference.rms_norm).
    main = (main * inv[:, :, None] * w_main_ref[...].astype(jnp.float32)).astype(dtype)
    main = main.astype(jnp.float32)
    if n_out:
      tail = (tail * inv * w_tail_ref[...].astype(jnp.float32)).astype(dtype)
      tail = tail.astype(jnp.float32)
  codes, scale = _codes_and_scale(main, bits=bits, clip=clip_ratio)
  if bits == 4:  # low nibble: code j, high nibble: code j + g/2 (hi << 4 keeps int8 range)
    codes = (codes[:, :, :g // 2] & 0xF) | (codes[:, :, g // 2:] << 4)
  codes_ref[...] = codes.astype(jnp.int8)
  scales_ref[...] = scale
  if n_out:
    tail_codes, tail_scale = _codes_and_scale(tail, bits=8, clip=1.0)
    tail_ref[...] = tail_codes.astype(jnp.int8)
    tail_scales_ref[...] = tail_scale


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "clip_ratio",
                                             "num_outliers", "eps", "block_sizes",
                                             "interpret"))
def quantize_activations(x: jax.Array, *, bits: int, group_size: int | None = None,
                         clip_ratio: float = 1.0, perm: jax.Array | None = None,
                         num_outliers: int = 0, rms_norm_weight: jax.Array | None = None,
                         eps: float = 1e-6, block_sizes: TpuBlockSizes | None = None,
                         interpret=False) -> QuantizedActivations:
  """The activation quantizer on the TPU; see `reference.quantize_activations`."""
  g = reference.validate_inputs(x, bits=bits, group_size=group_size, clip_ratio=clip_ratio,
                                perm=perm, num_outliers=num_outliers,
                                rms_norm_weight=rms_norm_weight)
  m, k = x.shape
  n_out = num_outliers
  k_main = k - n_out
  n_groups = k_main // g
  bs = block_sizes or TpuBlockSizes.get_default(m, k)
  bm = bs.block_m
  if bm != m and bm % 8:
    raise NotImplementedError(f"pallas_tpu quantize_activations: block_m={bm} must be a "
                              f"multiple of 8 or M={m}")
  w = rms_norm_weight
  if perm is not None:  # see the module docstring: gathered by XLA
    x = x[:, perm]
    w = None if w is None else w[perm]
  args = [x[:, :k_main].reshape(m, n_groups, g)]
  in_specs = [pl.BlockSpec((bm, n_groups, g), lambda i: (i, 0, 0))]
  if n_out:
    args.append(x[:, k_main:])
    in_specs.append(pl.BlockSpec((bm, n_out), lambda i: (i, 0)))
  if w is not None:
    args.append(w[:k_main].reshape(1, n_groups, g))
    in_specs.append(pl.BlockSpec((1, n_groups, g), lambda i: (0, 0, 0)))
    if n_out:
      args.append(w[k_main:].reshape(1, n_out))
      in_specs.append(pl.BlockSpec((1, n_out), lambda i: (0, 0)))
  code_width = g // 2 if bits == 4 else g
  out_shape = [jax.ShapeDtypeStruct((m, n_groups, code_width), jnp.int8),
               jax.ShapeDtypeStruct((m, n_groups, 1), jnp.float32)]
  out_specs = [pl.BlockSpec((bm, n_groups, code_width), lambda i: (i, 0, 0)),
               pl.BlockSpec((bm, n_groups, 1), lambda i: (i, 0, 0))]
  if n_out:
    out_shape += [jax.ShapeDtypeStruct((m, n_out), jnp.int8),
                  jax.ShapeDtypeStruct((m, 1), jnp.float32)]
    out_specs += [pl.BlockSpec((bm, n_out), lambda i: (i, 0)),
                  pl.BlockSpec((bm, 1), lambda i: (i, 0))]
  kernel = functools.partial(_kernel, k=k, bits=bits, g=g, n_out=n_out,
                             clip_ratio=clip_ratio, eps=eps, has_norm=w is not None)
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(pl.cdiv(m, bm),),
      in_specs=in_specs,
      out_specs=out_specs,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name=f"quantize_activations_{bits}bit_g{g}_tail{n_out}",
  )(*args)
  codes = out[0].reshape(m, n_groups * code_width)
  scales = out[1].reshape(m, n_groups)
  if n_out:
    return QuantizedActivations(codes, scales, out[2], out[3])
  return QuantizedActivations(codes, scales, None, None)
