"""Pallas (Mosaic TPU) kernels for the quantized matmul family.

Same signatures as `reference.py`, plus `block_sizes=`, `interpret=` (pass
`pltpu.InterpretParams()` to run on a CPU) and `pad_value=`.

Design (SPEC.md 1.5): the packed codes are DMA'd to VMEM as they are stored, unpacked on
the VPU with shifts, and multiplied on the MXU one quantization group at a time with a
float32 (or int32) result; each group's partial is rescaled on the VPU and accumulated in
a VMEM scratch across the K grid axis, which is "arbitrary" (sequential) while M and N are
"parallel".

Edges: TPU blocks must tile the arrays, so M and N are padded to whole blocks and the
result is sliced back. The padding is filled with `pad_value` (0 by default; the tests
use NaN: padded rows and columns only ever reach padded outputs, so a NaN that shows up
in the result proves a read of padding). K is never padded: the K block always divides K
(the contraction would carry any padding into every output).

Limits: validated in TPU interpret mode and by lowering to Mosaic on a CPU; not yet run
on a TPU. Scales are transposed to [K/g, N] per call so that a group's scales are one
row (a sublane slice); a weight format that stores them that way would save that pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quantized_matmul import reference
from pallas_kernels.quantized_matmul.config import TpuBlockSizes

_NT = (((1,), (1,)), ((), ()))


def _params(n_grid: int):
  semantics = ("parallel",) * (n_grid - 1) + ("arbitrary",)
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _tiled_call(kernel, args, in_specs, *, shape, padded, block, k_blocks: int, out_dtype,
                acc_dtype, name: str, interpret):
  """pallas_call over (M tiles, N tiles, K blocks) writing the padded [mp, np_] output in
  `block` (bm, bn) tiles from a VMEM accumulator of acc_dtype; sliced back to [m, n]."""
  (m, n), (mp, np_), (bm, bn) = shape, padded, block
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
      grid=(mp // bm, np_ // bn, k_blocks),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
      compiler_params=_params(3),
      interpret=interpret,
      name=name,
  )(*args)
  return out[:m, :n]


def _pad_to(a, shape, value):
  pads = [(0, t - s) for s, t in zip(a.shape, shape)]
  if not any(p for _, p in pads):
    return a
  return jnp.pad(a, pads, constant_values=jnp.asarray(value, a.dtype)
                 if jnp.issubdtype(a.dtype, jnp.floating) else 0)


def _unpack_nibbles(packed, signed: bool):
  """int8/uint8 [R, C] -> (low, high) int32 [R, C] codes (VPU work in 32-bit lanes)."""
  p = packed.astype(jnp.int32)  # sign- or zero-extends with the storage dtype
  if signed:
    return lax.shift_right_arithmetic(lax.shift_left(p, 28), 28), p >> 4
  return p & 0xF, lax.shift_right_logical(p, 4)


def _check_tiling(name, k, bk, unit):
  if k % bk or (bk != k and bk % unit):
    raise NotImplementedError(f"pallas_tpu {name}: block_k={bk} must divide {k=} and be a "
                              f"multiple of {unit} (or equal K)")


# ---------------------------------------------------------------------------------------
# W4A16 / W8A16


def _weight_only_kernel(*refs, bits: int, g: int, bk: int, symmetric: bool, f32_math):
  if symmetric:
    x_ref, c_ref, s_ref, o_ref, acc_ref = refs
    z_ref = None
  else:
    x_ref, c_ref, s_ref, z_ref, o_ref, acc_ref = refs
  kstep = pl.program_id(2)

  @pl.when(kstep == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  cdt = jnp.float32 if f32_math else jnp.bfloat16
  precision = lax.Precision.HIGHEST if f32_math else None
  dot = lambda a, b: lax.dot_general(a.astype(cdt), b.astype(cdt), _NT,
                                     precision=precision,
                                     preferred_element_type=jnp.float32)
  groups = bk // g
  acc = acc_ref[...]
  for gi in range(groups):  # static: a few groups per K block
    if bits == 4:
      half = g // 2
      w_lo, w_hi = _unpack_nibbles(c_ref[:, gi * half:(gi + 1) * half], symmetric)
      x_lo = x_ref[:, gi * g:gi * g + half]
      x_hi = x_ref[:, gi * g + half:(gi + 1) * g]
      part = dot(x_lo, w_lo) + dot(x_hi, w_hi)
      xsum = None if symmetric else (jnp.sum(x_lo.astype(jnp.float32), axis=1) +
                                     jnp.sum(x_hi.astype(jnp.float32), axis=1))
    else:
      xg = x_ref[:, gi * g:(gi + 1) * g]
      part = dot(xg, c_ref[:, gi * g:(gi + 1) * g].astype(jnp.int32))
      xsum = None if symmetric else jnp.sum(xg.astype(jnp.float32), axis=1)
    if not symmetric:
      part = part - xsum[:, None] * z_ref[gi]
    acc = acc + part * s_ref[gi]
  acc_ref[...] = acc

  @pl.when(kstep == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_sizes",
                                             "interpret", "pad_value"))
def weight_only_matmul(x, codes, scales, zeros=None, *, bits: int, group_size: int,
                       block_sizes: TpuBlockSizes | None = None, interpret=False,
                       pad_value: float = 0.0):
  """W4A16 / W8A16 on the TPU; see `reference.weight_only_matmul`."""
  reference.validate_weight_only(x, codes, scales, zeros, bits=bits,
                                 group_size=group_size)
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    raise NotImplementedError(f"pallas_tpu weight_only_matmul: {x.dtype=} not bf16/f32")
  m, k = x.shape
  n = codes.shape[0]
  bs = block_sizes or TpuBlockSizes.get_default(m, n, k, group_size=group_size, bits=bits)
  bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
  lane_unit = 256 if bits == 4 else 128
  _check_tiling("weight_only_matmul", k, bk, lane_unit)
  if bk % group_size:
    raise NotImplementedError(f"pallas_tpu weight_only_matmul: {bk=} is not a multiple "
                              f"of {group_size=}")
  mp, np_ = pl.cdiv(m, bm) * bm, pl.cdiv(n, bn) * bn
  symmetric = zeros is None
  cw = bk // 2 if bits == 4 else bk
  xp = _pad_to(x, (mp, k), pad_value)
  cp = _pad_to(codes, (np_, codes.shape[1]), 0)
  # Scales as [K/g, 1, N]: the K step's groups arrive as a (groups, 1, bn) block, and a
  # group's scales are one (1, bn) row, broadcast over the block's rows.
  n_groups, groups = k // group_size, bk // group_size
  as_rows = lambda a: _pad_to(a.T, (n_groups, np_), pad_value).reshape(n_groups, 1, np_)
  row_spec = pl.BlockSpec((groups, 1, bn), lambda i, j, kk: (kk, 0, j))
  args = [xp, cp, as_rows(scales)]
  in_specs = [
      pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
      pl.BlockSpec((bn, cw), lambda i, j, kk: (j, kk)),
      row_spec,
  ]
  if not symmetric:
    args.append(as_rows(zeros))
    in_specs.append(row_spec)
  kernel = functools.partial(_weight_only_kernel, bits=bits, g=group_size, bk=bk,
                             symmetric=symmetric, f32_math=x.dtype == jnp.float32)
  return _tiled_call(kernel, args, in_specs, shape=(m, n), padded=(mp, np_), block=(bm, bn),
                     k_blocks=k // bk, out_dtype=x.dtype, acc_dtype=jnp.float32,
                     name=f"w{bits}a16_g{group_size}_tpu", interpret=interpret)


# ---------------------------------------------------------------------------------------
# W8A8


def _int8_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref):
  kstep = pl.program_id(2)

  @pl.when(kstep == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc_ref[...] += lax.dot_general(x_ref[...], w_ref[...], _NT,
                                  preferred_element_type=jnp.int32)

  @pl.when(kstep == pl.num_programs(2) - 1)
  def _():
    out = acc_ref[...].astype(jnp.float32) * xs_ref[...] * ws_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret",
                                             "pad_value"))
def int8_matmul(x_codes, x_scales, w_codes, w_scales, *, out_dtype=jnp.bfloat16,
                block_sizes: TpuBlockSizes | None = None, interpret=False,
                pad_value: float = 0.0):
  """W8A8 on the TPU; see `reference.int8_matmul`."""
  reference.validate_scaled(x_codes, x_scales, w_codes, w_scales, jnp.int8)
  m, k = x_codes.shape
  n = w_codes.shape[0]
  bs = block_sizes or TpuBlockSizes.get_default(m, n, k, group_size=128, bits=8)
  bm, bn, bk = max(32, bs.block_m), bs.block_n, bs.block_k  # int8 tiles are 32 x 128
  if k % bk:
    bk = k  # one K block: legal for any K
  _check_tiling("int8_matmul", k, bk, 128)
  mp, np_ = pl.cdiv(m, bm) * bm, pl.cdiv(n, bn) * bn
  args = (_pad_to(x_codes, (mp, k), 0), _pad_to(x_scales, (mp, 1), pad_value),
          _pad_to(w_codes, (np_, k), 0), _pad_to(w_scales.T, (1, np_), pad_value))
  in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
              pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
              pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
              pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))]
  return _tiled_call(_int8_kernel, args, in_specs, shape=(m, n), padded=(mp, np_),
                     block=(bm, bn), k_blocks=k // bk, out_dtype=out_dtype,
                     acc_dtype=jnp.int32, name="int8_matmul_tpu", interpret=interpret)


# ---------------------------------------------------------------------------------------
# Atom W4A4 (+ int8 tail)


def _w4a4_kernel(*refs, g: int, bk: int, n_out: int):
  if n_out:
    xc_ref, xs_ref, wc_ref, ws_ref, xo_ref, xos_ref, wo_ref, wos_ref, o_ref, acc_ref = refs
  else:
    xc_ref, xs_ref, wc_ref, ws_ref, o_ref, acc_ref = refs
  kstep = pl.program_id(2)

  @pl.when(kstep == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  half = g // 2
  groups = bk // g
  acc = acc_ref[...]
  for gi in range(groups):
    x_lo, x_hi = _unpack_nibbles(xc_ref[:, gi * half:(gi + 1) * half], True)
    w_lo, w_hi = _unpack_nibbles(wc_ref[:, gi * half:(gi + 1) * half], True)
    # The MXU takes int8 (exact: the codes are in -8..7).
    dot = lambda a, b: lax.dot_general(a.astype(jnp.int8), b.astype(jnp.int8), _NT,
                                       preferred_element_type=jnp.int32)
    part = (dot(x_lo, w_lo) + dot(x_hi, w_hi)).astype(jnp.float32)
    acc = acc + part * xs_ref[gi] * ws_ref[gi]  # (bm, 1) * (1, bn): Atom's rescale
  acc_ref[...] = acc

  @pl.when(kstep == pl.num_programs(2) - 1)
  def _():
    out = acc_ref[...]
    if n_out:
      tail = lax.dot_general(xo_ref[...], wo_ref[...], _NT,
                             preferred_element_type=jnp.int32)
      out = out + tail.astype(jnp.float32) * xos_ref[...] * wos_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "block_sizes",
                                             "interpret", "pad_value"))
def w4a4_matmul(x_codes, x_scales, w_codes, w_scales, x_out=None, x_out_scales=None,
                w_out=None, w_out_scales=None, *, group_size: int = 128,
                out_dtype=jnp.bfloat16, block_sizes: TpuBlockSizes | None = None,
                interpret=False, pad_value: float = 0.0):
  """Atom W4A4 (+ int8 tail) on the TPU; see `reference.w4a4_matmul`."""
  reference.validate_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales,
                          w_out, w_out_scales, group_size=group_size)
  m, n = x_codes.shape[0], w_codes.shape[0]
  k_main = 2 * x_codes.shape[1]
  n_out = 0 if x_out is None else x_out.shape[1]
  bs = block_sizes or TpuBlockSizes.get_default(m, n, k_main, group_size=group_size,
                                                bits=4)
  bm, bn, bk = max(32, bs.block_m), bs.block_n, bs.block_k
  _check_tiling("w4a4_matmul", k_main, bk, 256)
  if bk % group_size:
    raise NotImplementedError(f"pallas_tpu w4a4_matmul: {bk=} is not a multiple of "
                              f"{group_size=}")
  mp, np_ = pl.cdiv(m, bm) * bm, pl.cdiv(n, bn) * bn
  n_groups = k_main // group_size
  groups = bk // group_size
  # Group scales as [G, M, 1] and [G, 1, N]: a K step's groups arrive as one block each,
  # and a group's scales are a column (per token) and a row (per output channel).
  xs3 = _pad_to(x_scales.T, (n_groups, mp), pad_value).reshape(n_groups, mp, 1)
  ws3 = _pad_to(w_scales.T, (n_groups, np_), pad_value).reshape(n_groups, 1, np_)
  args = [_pad_to(x_codes, (mp, k_main // 2), 0), xs3,
          _pad_to(w_codes, (np_, k_main // 2), 0), ws3]
  in_specs = [pl.BlockSpec((bm, bk // 2), lambda i, j, kk: (i, kk)),
              pl.BlockSpec((groups, bm, 1), lambda i, j, kk: (kk, i, 0)),
              pl.BlockSpec((bn, bk // 2), lambda i, j, kk: (j, kk)),
              pl.BlockSpec((groups, 1, bn), lambda i, j, kk: (kk, 0, j))]
  if n_out:
    args += [_pad_to(x_out, (mp, n_out), 0), _pad_to(x_out_scales, (mp, 1), pad_value),
             _pad_to(w_out, (np_, n_out), 0), _pad_to(w_out_scales.T, (1, np_), pad_value)]
    in_specs += [pl.BlockSpec((bm, n_out), lambda i, j, kk: (i, 0)),
                 pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
                 pl.BlockSpec((bn, n_out), lambda i, j, kk: (j, 0)),
                 pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))]
  kernel = functools.partial(_w4a4_kernel, g=group_size, bk=bk, n_out=n_out)
  return _tiled_call(kernel, args, in_specs, shape=(m, n), padded=(mp, np_), block=(bm, bn),
                     k_blocks=k_main // bk, out_dtype=out_dtype, acc_dtype=jnp.float32,
                     name=f"w4a4_g{group_size}_tpu", interpret=interpret)
