"""Pallas (Triton lowering) kernels for the quantized matmul family on NVIDIA GPUs.

Same signatures as `reference.py`, plus `block_sizes=` and `interpret=`.

Motivation: XLA's own paths for these products are slow or unfused (PEERS.md 6.3): a
group-wise W4A16 product runs as "dequantize then dot" at 0.39x bf16, and the W8A8
rescale is a separate pass over an int32 [M, N] array. These kernels read the packed
codes once, unpack them in registers and rescale inside the K loop or in the epilogue.

Kernels:
  * `weight_only_matmul` (W4A16 / W8A16, symmetric or asymmetric, groups of any even
    size >= 32): one quantization group per K step. 4-bit codes are unpacked with
    shifts into exact bf16 values by the "magic exponent" trick (the nibble is OR-ed into
    the mantissa of 128.0, so no int->float conversion instruction is needed), each
    group's product is taken on the tensor cores with an fp32 result, and the group's
    scale is applied to that [block_m, block_n] partial rather than to every weight
    (block_m multiplies per weight column instead of group_size). Asymmetric zero points
    fold in as `- zero * sum(x over the group)`. Decode shapes split K over programs and
    sum their fp32 partials with atomics. `BlockSizes.weights_lhs` makes the weight tile
    the dot's left operand (on Hopper it then stays in registers for the wgmma).
  * The decode GEMV (`BlockSizes.cuda_cores`, 4-bit codes): no tensor cores; codes read
    as int32 words, each nibble unpacked to an f32 with a shift and a mask, one FMA per
    code and row of x. Opt-in: on an H200 it is no faster than the tensor-core kernel at
    M = 1 and slower at M = 4 (bench/results/quantized_matmul.md, runs 5-7).
  * `int8_matmul` (W8A8): int8 x int8 -> int32 on the tensor cores, per-token x
    per-channel rescale in the epilogue, bf16 out.
  * `fp8_matmul`: e4m3 x e4m3 -> fp32 on the fp8 tensor cores, rescale in the epilogue.
  * `w4a4_matmul` (Atom): both operands packed 4-bit in groups; nibbles are
    sign-extended to int8 in registers (exact: Hopper has no int4 MMA, SPEC.md 1.5),
    each group's int32 partial is rescaled by act_scale x w_scale inside the K loop, and
    the int8 x int8 outlier tail follows with its own scales.

Edges: M and N need not be multiples of the blocks; loads past the edge are masked (to
zero) and stores are masked, so nothing past an array is ever read or written. K needs
no masking in the group-wise kernels (groups tile K exactly by the format's invariant);
the int8/fp8 kernels mask a ragged last K step with zeros, which add nothing.

Limits (measured on an H200, bench/results/quantized_matmul.md): Pallas lowers
`acc + jnp.dot(...)` as a zero-initialised dot plus an add, which Triton folds into the MMA
accumulator for int32 but not for float32, so the float kernels (W4A16 at large M, FP8)
wait for every wgmma; and the fp8 dot is emitted without `maxNumImpreciseAcc`, so Triton
upcasts it to fp16 mma.sync. api.py routes those cases to XLA.

W4A16 at M <= 16 stays at 25-35% of HBM in every Pallas-Triton variant tried (tiles,
split-K, one launch, weights as the left operand, a CUDA-core GEMV), while XLA reads the
same code layout at 67-99%: the loads in flight per SM, which Pallas-Triton does not let a
kernel control, are the limit (results file, runs 5-7).

`mosaic_gpu.py` holds Mosaic GPU kernels for W4A16 (TMA ring, wgmma with register-level
unpack) and Atom W4A4 (int8 wgmma per group, rescale into a float32 register sum); both
opt-in, see their results. Future work: Marlin-style pre-shuffled 4-bit layouts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.quantized_matmul import reference
from pallas_kernels.quantized_matmul.config import BlockSizes
from pallas_kernels.triton_params import TritonCompilerParams

# bf16 bit patterns of 128.0 (0x4300): OR-ing a nibble u into the low mantissa bits gives
# exactly 128 + u (bf16 has 7 mantissa bits, so its unit in [128, 256) is 1). For a
# two's-complement nibble, XOR with 8 first: 128 + (u ^ 8) - 136 = the signed value.
_MAGIC_UNSIGNED = 0x4300
_MAGIC_SIGNED = 0x4308  # = 0x4300 | 8, applied with XOR
_BIAS_UNSIGNED = 128.0
_BIAS_SIGNED = 136.0


def _compiler_params(bs: BlockSizes):
  return TritonCompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _tile_ids(pid, tiles_m: int, tiles_n: int, group_m: int):
  """(pm, pn) of a 1-D program id, `group_m` row tiles next to each other (L2 reuse)."""
  if tiles_m == 1:
    return jnp.int32(0), pid
  if group_m <= 1:
    return lax.rem(pid, tiles_m), lax.div(pid, tiles_m)
  width = group_m * tiles_n
  first_m = lax.div(pid, width) * group_m
  size_m = jnp.minimum(tiles_m - first_m, group_m)
  local = lax.rem(pid, width)
  return first_m + lax.rem(local, size_m), lax.div(local, size_m)


def _output_tile(m: int, n: int, bs: BlockSizes):
  """(m0, n0, row_mask, col_mask) of this program's [block_m, block_n] output tile; a mask
  is None where the block size divides the dimension, else bool [block] of in-range."""
  bm, bn = bs.block_m, bs.block_n
  pm, pn = _tile_ids(pl.program_id(0), pl.cdiv(m, bm), pl.cdiv(n, bn), bs.group_m)
  m0 = pl.multiple_of(pm * bm, bm)
  n0 = pl.multiple_of(pn * bn, bn)
  rmask = (m0 + lax.broadcasted_iota(jnp.int32, (bm,), 0) < m) if m % bm else None
  cmask = (n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0) < n) if n % bn else None
  return m0, n0, rmask, cmask


def _load(ref, idx, mask):
  """ref[idx], with masked-off elements read as zero (and never touched)."""
  if mask is None:
    return ref[idx]
  # Python ints as traced scalars: the interpreter's masked load wants arrays.
  idx = tuple(jnp.int32(i) if isinstance(i, int) else i for i in idx)
  view = ref.at[idx]
  # A full-shape mask, and a fill of the ref's own dtype (Triton cannot cast an integer
  # fill to fp8).
  return plgpu.load(view, mask=jnp.broadcast_to(mask, view.shape),
                    other=jnp.zeros((), ref.dtype))


def _and_masks(a, b):
  if a is None:
    return b
  if b is None:
    return a
  return a & b


def _nibbles_as_bf16(packed, signed: bool):
  """int8/uint8 [R, C] -> (low, high) bf16 [R, C] holding the exact nibble codes."""
  w = packed.astype(jnp.int16) & 0xFF  # the byte, whatever its signedness, in 0..255
  low, high = w & 0xF, lax.shift_right_logical(w, jnp.int16(4))
  if signed:
    low, high = low ^ _MAGIC_SIGNED, high ^ _MAGIC_SIGNED
    bias = _BIAS_SIGNED
  else:
    low, high = low | _MAGIC_UNSIGNED, high | _MAGIC_UNSIGNED
    bias = _BIAS_UNSIGNED
  to_bf16 = lambda v: lax.bitcast_convert_type(v, jnp.bfloat16) - jnp.bfloat16(bias)
  return to_bf16(low), to_bf16(high)


def _word_nibble_as_bf16(words, shift: int, signed: bool):
  """int16 words -> bf16 of the nibble at bit `shift` of each word, exact."""
  nib = lax.shift_right_logical(words, jnp.int16(shift)) & 0xF if shift else words & 0xF
  if signed:
    bits, bias = nib ^ _MAGIC_SIGNED, _BIAS_SIGNED
  else:
    bits, bias = nib | _MAGIC_UNSIGNED, _BIAS_UNSIGNED
  return lax.bitcast_convert_type(bits, jnp.bfloat16) - jnp.bfloat16(bias)


def _nibbles_as_int8(packed):
  """Packed signed nibbles int8 [R, C] -> (low, high) int8 [R, C], sign-extended."""
  low = lax.shift_right_arithmetic(lax.shift_left(packed, jnp.int8(4)), jnp.int8(4))
  high = lax.shift_right_arithmetic(packed, jnp.int8(4))
  return low, high


def _dot_nt(a, b, acc_dtype, precision=None):
  """a [R, C] . b [S, C] -> [R, S] (contract the minor axes)."""
  return jnp.dot(a, b.T, preferred_element_type=acc_dtype, precision=precision)


# ---------------------------------------------------------------------------------------
# W4A16 / W8A16


def _weight_only_kernel(*refs, bits: int, g: int, m: int, n: int, bs: BlockSizes,
                        groups_per_split: int, symmetric: bool, f32_math: bool):
  if symmetric:
    x_ref, c_ref, s_ref, o_ref = refs
    z_ref = None
  else:
    x_ref, c_ref, s_ref, z_ref, o_ref = refs
  bm, bn = bs.block_m, bs.block_n
  m0, n0, rmask, cmask = _output_tile(m, n, bs)
  pk = pl.program_id(1)
  xmask = None if rmask is None else rmask[:, None]
  wmask = None if cmask is None else cmask[:, None]
  cdt = jnp.float32 if f32_math else jnp.bfloat16
  precision = lax.Precision.HIGHEST if f32_math else None
  # With weights_lhs every tile is held transposed ([bn, bm]: weights as the dot's
  # left operand) until the store.
  if bs.weights_lhs:
    dot = lambda a, w: _dot_nt(w, a, jnp.float32, precision)  # -> [bn, bm]
    per_m = lambda v: v[None, :]
    per_n = lambda v: v[:, None]
  else:
    dot = lambda a, w: _dot_nt(a, w, jnp.float32, precision)  # -> [bm, bn]
    per_m = lambda v: v[:, None]
    per_n = lambda v: v[None, :]

  def body(i, acc):
    gi = pk * groups_per_split + i
    k0 = pl.multiple_of(gi * g, g)
    if bits == 4 and bs.code_word == 16:
      # Codes read as int16 words: word p of a group holds bytes 2p and 2p+1, i.e. the
      # codes 2p (bits 0-3), g/2+2p (4-7), 2p+1 (8-11) and g/2+2p+1 (12-15). Each shift
      # gives one exact bf16 operand of g/4 codes, matched by every other x channel.
      q = g // 4
      words = _load(c_ref, (pl.ds(n0, bn), pl.ds(pl.multiple_of(gi * q, q), q)), wmask)
      xa = gi * (g // 2)  # x viewed as [M, K/2, 2]: x[:, 2j + e] = x2[:, j, e]
      xb = xa + g // 4
      part = None
      xsum = None
      for shift, start, parity in ((0, xa, 0), (4, xb, 0), (8, xa, 1), (12, xb, 1)):
        w = _word_nibble_as_bf16(words, shift, symmetric)
        xs = _load(x_ref, (pl.ds(m0, bm), pl.ds(start, q), parity), xmask)
        d = dot(xs.astype(cdt), w.astype(cdt))
        part = d if part is None else part + d
        if not symmetric:
          s_ = jnp.sum(xs.astype(jnp.float32), axis=1)
          xsum = s_ if xsum is None else xsum + s_
    elif bits == 4:
      half = g // 2
      x_lo = _load(x_ref, (pl.ds(m0, bm), pl.ds(k0, half)), xmask)
      x_hi = _load(x_ref, (pl.ds(m0, bm), pl.ds(k0 + half, half)), xmask)
      packed = _load(c_ref, (pl.ds(n0, bn), pl.ds(pl.multiple_of(gi * half, half), half)),
                     wmask)
      w_lo, w_hi = _nibbles_as_bf16(packed, symmetric)
      if bs.join_halves:
        # One K=g dot: both operands interleave their halves the same way (tt.join),
        # and a contraction does not care about the order of its channels.
        xj = jnp.stack([x_lo.astype(cdt), x_hi.astype(cdt)], axis=-1).reshape(bm, g)
        wj = jnp.stack([w_lo.astype(cdt), w_hi.astype(cdt)], axis=-1).reshape(bn, g)
        part = dot(xj, wj)
      else:
        part = (dot(x_lo.astype(cdt), w_lo.astype(cdt))
                + dot(x_hi.astype(cdt), w_hi.astype(cdt)))
      xsum = None if symmetric else (
          jnp.sum(x_lo.astype(jnp.float32), axis=1)
          + jnp.sum(x_hi.astype(jnp.float32), axis=1))
    else:
      xg = _load(x_ref, (pl.ds(m0, bm), pl.ds(k0, g)), xmask)
      codes = _load(c_ref, (pl.ds(n0, bn), pl.ds(k0, g)), wmask)
      part = dot(xg.astype(cdt), codes.astype(cdt))
      xsum = None if symmetric else jnp.sum(xg.astype(jnp.float32), axis=1)
    scale = _load(s_ref, (pl.ds(n0, bn), gi), cmask)
    if not symmetric:
      zero = _load(z_ref, (pl.ds(n0, bn), gi), cmask)
      part = part - per_m(xsum) * per_n(zero)
    return acc + part * per_n(scale)

  tile = (bn, bm) if bs.weights_lhs else (bm, bn)
  acc = lax.fori_loop(0, groups_per_split, body, jnp.zeros(tile, jnp.float32))
  if bs.weights_lhs:
    acc = acc.T
  omask = _and_masks(xmask, None if cmask is None else cmask[None, :])
  _store_tile(o_ref, (pl.ds(m0, bm), pl.ds(n0, bn)), acc, omask, bs.split_k)


def _store_tile(o_ref, idx, tile, mask, split_k: int) -> None:
  """Writes a float32 output tile: added with atomics into the fp32 output when K is split
  (padded to whole blocks, so no mask), else stored in o_ref's dtype under `mask`."""
  if split_k > 1:
    plgpu.atomic_add(o_ref, idx, tile)
  elif mask is None:
    o_ref[idx] = tile.astype(o_ref.dtype)
  else:
    plgpu.store(o_ref.at[idx], tile.astype(o_ref.dtype),
                mask=jnp.broadcast_to(mask, tile.shape))


def _split_k_call(kernel, args: list, bs, tiles: int, shape, padded, dtype, *, name: str,
                  interpret) -> jax.Array:
  """pallas_call of `kernel` over the grid (tiles, bs.split_k): the output [shape] in dtype.

  With split_k > 1 the K splits sum their fp32 partials in place with atomics: a zero
  buffer padded to whole blocks is appended to `args` and aliased to the output (rows and
  columns past the edge only ever receive masked zero codes and are sliced off after).
  """
  out_shape, aliases = jax.ShapeDtypeStruct(shape, dtype), {}
  if bs.split_k > 1:
    args = [*args, jnp.zeros(padded, jnp.float32)]
    split_kernel = kernel
    kernel = lambda *refs: split_kernel(*refs[:-2], refs[-1])  # the zeros are the output
    out_shape, aliases = jax.ShapeDtypeStruct(padded, jnp.float32), {len(args) - 1: 0}
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(tiles, bs.split_k),
      input_output_aliases=aliases,
      compiler_params=_compiler_params(bs),
      interpret=interpret,
      name=name,
  )(*args)
  return out[:shape[0], :shape[1]].astype(dtype)


# Decode GEMV (M <= 16): the CUDA cores, 32-bit code words, f32 math.
#
# A little-endian int32 word p of a group holds bytes 4p..4p+3, i.e. (group_halves
# packing) the codes 4p + b in its low nibbles (bit 8b) and g/2 + 4p + b in its high
# nibbles (bit 8b + 4), b = 0..3. x viewed as [M, K/g, 2, g/8, 4] (a free reshape) puts
# the matching activations at [m, group, h, p, b] for the nibble at bit 8b + 4h.
#
# Unpack without an int->float conversion: the nibble moved to bits 19-22 (the top of the
# f32 mantissa) and OR-ed into 1.0 is exactly v = 1 + u/16 (one shift and one LOP3 per
# code). A signed nibble is XOR-ed with 8 on the way (u ^ 8 = code + 8), so
#   code = 16 v - 24 (signed),   code - zero = 16 v - (16 + zero) (unsigned),
# and a group's dot is 16 * sum(x * v) - c * sum(x): one FMA per code and row of x, the
# constant and the scale applied once per group.
_F32_ONE = 0x3F800000
_F32_NIBBLE_BIT = 19
_F32_NIBBLE_MASK = 0xF << _F32_NIBBLE_BIT
_F32_SIGN_FLIP = 8 << _F32_NIBBLE_BIT


def _word_nibble_as_unit_f32(words, shift: int, signed: bool):
  """int32 words -> f32 1 + u/16 for the nibble u at bit `shift` (u ^ 8 if signed)."""
  move = _F32_NIBBLE_BIT - shift
  if move > 0:
    words = lax.shift_left(words, jnp.int32(move))
  elif move < 0:
    words = lax.shift_right_logical(words, jnp.int32(-move))
  bits = words & _F32_NIBBLE_MASK
  bits = bits ^ (_F32_ONE | _F32_SIGN_FLIP) if signed else bits | _F32_ONE
  return lax.bitcast_convert_type(bits, jnp.float32)


def _weight_only_gemv_kernel(*refs, m: int, n: int, bs: BlockSizes,
                             groups_per_split: int, symmetric: bool):
  # x_ref: [M, K/g, 2, g/8, 4]; c_ref: i32[N, K/g, g/8]; s_ref, z_ref: f32[N, K/g];
  # o_ref: [M, N] (x.dtype), or f32[M, N] summed by atomics when split_k > 1.
  if symmetric:
    x_ref, c_ref, s_ref, o_ref = refs
    z_ref = None
  else:
    x_ref, c_ref, s_ref, z_ref, o_ref = refs
  bn, gs = bs.block_n, bs.groups_per_step
  n0 = pl.multiple_of(pl.program_id(0) * bn, bn)
  pk = pl.program_id(1)
  nmask = (n0 + lax.broadcasted_iota(jnp.int32, (bn,), 0) < n) if n % bn else None
  gmask = None if nmask is None else nmask[:, None]  # [bn, 1]
  wmask = None if nmask is None else nmask[:, None, None]  # [bn, 1, 1]

  def step(i, accs):
    g0 = pl.multiple_of(pk * groups_per_split + i * gs, gs)
    words = _load(c_ref, (pl.ds(n0, bn), pl.ds(g0, gs), slice(None)), wmask)  # [bn,gs,w]
    dots = [None] * m  # per row of x: sum over the 8 nibbles of x * v, [bn, gs, w]
    xsums = [None] * m  # per row of x: the same x summed, [gs, w]
    for h in range(2):
      for b in range(4):
        v = _word_nibble_as_unit_f32(words, 8 * b + 4 * h, symmetric)
        for r in range(m):
          xv = x_ref[r, pl.ds(g0, gs), h, :, b].astype(jnp.float32)  # [gs, w]
          prod = xv[None] * v
          dots[r] = prod if dots[r] is None else dots[r] + prod
          xsums[r] = xv if xsums[r] is None else xsums[r] + xv
    scale = _load(s_ref, (pl.ds(n0, bn), pl.ds(g0, gs)), gmask)  # [bn, gs]
    if symmetric:
      bias = 24.0
    else:
      bias = 16.0 + _load(z_ref, (pl.ds(n0, bn), pl.ds(g0, gs)), gmask)
    new = []
    for r in range(m):
      group_dot = 16.0 * jnp.sum(dots[r], axis=2) - bias * jnp.sum(xsums[r], axis=1)[None]
      new.append(accs[r] + jnp.sum(group_dot * scale, axis=1))
    return tuple(new)

  accs = lax.fori_loop(0, groups_per_split // gs, step,
                       tuple(jnp.zeros((bn,), jnp.float32) for _ in range(m)))
  for r in range(m):
    idx = (jnp.int32(r), pl.ds(n0, bn))  # a traced row index (the interpreter wants one)
    _store_tile(o_ref, idx, accs[r], nmask, bs.split_k)


def _weight_only_gemv(x, codes, scales, zeros, *, group_size: int, bs: BlockSizes,
                      interpret: bool):
  """The decode GEMV (`BlockSizes.cuda_cores`); one launch unless split_k > 1."""
  m, k = x.shape
  n = codes.shape[0]
  g = group_size
  symmetric = zeros is None
  kernel = functools.partial(_weight_only_gemv_kernel, m=m, n=n, bs=bs,
                             groups_per_split=k // g // bs.split_k, symmetric=symmetric)
  # Free reinterpretations: bytes as little-endian int32 words, grouped; x split so that
  # the activations of one nibble position are a plain slice.
  words = lax.bitcast_convert_type(codes.reshape(n, k // 8, 4), jnp.int32)
  args = [x.reshape(m, k // g, 2, g // 8, 4), words.reshape(n, k // g, g // 8), scales]
  args += [] if symmetric else [zeros]
  return _split_k_call(kernel, args, bs, pl.cdiv(n, bs.block_n), (m, n),
                       (m, pl.cdiv(n, bs.block_n) * bs.block_n), x.dtype,
                       name=f"w4a16_gemv_g{g}_{'sym' if symmetric else 'asym'}",
                       interpret=interpret)


def check_weight_only(x, codes, scales, zeros, *, bits: int, group_size: int,
                      block_sizes: BlockSizes) -> None:
  """Raises NotImplementedError for cases this kernel does not serve (STYLE.md 3)."""
  if x.dtype not in (jnp.bfloat16, jnp.float32):
    raise NotImplementedError(f"pallas_gpu weight_only_matmul: {x.dtype=} not bf16/f32")
  n_groups = x.shape[1] // group_size
  if block_sizes.cuda_cores:
    words = group_size // 8
    if bits != 4 or group_size % 8 or words & (words - 1):
      raise NotImplementedError(
          f"pallas_gpu weight_only_matmul (cuda_cores): needs bits=4 and group_size / 8 "
          f"a power of two, got {bits=} {group_size=}")
    if n_groups % (block_sizes.split_k * block_sizes.groups_per_step):
      raise NotImplementedError(
          f"pallas_gpu weight_only_matmul (cuda_cores): split_k={block_sizes.split_k} x "
          f"groups_per_step={block_sizes.groups_per_step} does not divide the "
          f"{n_groups} groups")
    return
  step = group_size // 2 if bits == 4 else group_size
  if bits == 4 and block_sizes.code_word == 16:
    step = group_size // 4
  if step < 16 or step & (step - 1):
    raise NotImplementedError(
        f"pallas_gpu weight_only_matmul: {group_size=} with {bits=} gives a K step of "
        f"{step}; Triton needs a power of two >= 16")
  if n_groups % block_sizes.split_k:
    raise NotImplementedError(
        f"pallas_gpu weight_only_matmul: split_k={block_sizes.split_k} does not divide "
        f"the {n_groups} groups")


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_sizes",
                                             "interpret"))
def weight_only_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array,
                       zeros: jax.Array | None = None, *, bits: int, group_size: int,
                       block_sizes: BlockSizes | None = None,
                       interpret: bool = False) -> jax.Array:
  """W4A16 / W8A16 on the GPU; see `reference.weight_only_matmul`."""
  reference.validate_weight_only(x, codes, scales, zeros, bits=bits,
                                 group_size=group_size)
  m, k = x.shape
  n = codes.shape[0]
  bs = block_sizes or BlockSizes.get_default("weight_only", m, n, k,
                                             group_size=group_size, bits=bits)
  bs.validate()
  check_weight_only(x, codes, scales, zeros, bits=bits, group_size=group_size,
                    block_sizes=bs)
  if bs.cuda_cores:
    return _weight_only_gemv(x, codes, scales, zeros, group_size=group_size, bs=bs,
                             interpret=interpret)
  symmetric = zeros is None
  n_groups = k // group_size
  tiles = pl.cdiv(m, bs.block_m) * pl.cdiv(n, bs.block_n)
  kernel = functools.partial(
      _weight_only_kernel, bits=bits, g=group_size, m=m, n=n, bs=bs,
      groups_per_split=n_groups // bs.split_k, symmetric=symmetric,
      f32_math=x.dtype == jnp.float32)
  if bits == 4 and bs.code_word == 16:
    # Free reinterpretations (no data movement): byte pairs as int16 words, and x as
    # [M, K/2, 2] so that even and odd channels can be read separately.
    codes = lax.bitcast_convert_type(codes.reshape(n, -1, 2), jnp.int16)
    x = x.reshape(m, k // 2, 2)
  args = [x, codes, scales] + ([] if symmetric else [zeros])
  padded = (pl.cdiv(m, bs.block_m) * bs.block_m, pl.cdiv(n, bs.block_n) * bs.block_n)
  return _split_k_call(kernel, args, bs, tiles, (m, n), padded, x.dtype,
                       name=f"w{bits}a16_g{group_size}_{'sym' if symmetric else 'asym'}",
                       interpret=interpret)


# ---------------------------------------------------------------------------------------
# W8A8 (int8) and FP8: one scaled NT product


def _scaled_mm_kernel(x_ref, xs_ref, w_ref, ws_ref, o_ref, *, m: int, n: int, k: int,
                      bs: BlockSizes, acc_dtype):
  bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
  m0, n0, rmask, cmask = _output_tile(m, n, bs)

  def step(k0, acc, kmask):
    xm = _and_masks(None if rmask is None else rmask[:, None], kmask)
    wm = _and_masks(None if cmask is None else cmask[:, None], kmask)
    a = _load(x_ref, (pl.ds(m0, bm), pl.ds(k0, bk)), xm)
    b = _load(w_ref, (pl.ds(n0, bn), pl.ds(k0, bk)), wm)
    return acc + _dot_nt(a, b, acc_dtype)

  # Split-K (decode sizes): split pk takes the K steps [pk * steps, (pk + 1) * steps);
  # the caller guarantees whole steps (no ragged end) when split_k > 1.
  steps = k // bk // bs.split_k
  first = pl.program_id(1) * steps
  acc = lax.fori_loop(
      0, steps,
      lambda i, acc: step(pl.multiple_of((first + i) * bk, bk), acc, None),
      jnp.zeros((bm, bn), acc_dtype))
  if k % bk:  # the ragged last step: channels past K read as zero and add nothing
    # A traced start (program_id * 0 + c): the block runs past K, which is masked.
    k0 = pl.program_id(0) * 0 + steps * bk
    kmask = (k0 + lax.broadcasted_iota(jnp.int32, (bk,), 0) < k)[None, :]
    acc = step(k0, acc, kmask)
  xs = _load(xs_ref, (pl.ds(m0, bm), 0), rmask)
  ws = _load(ws_ref, (pl.ds(n0, bn), 0), cmask)
  # The rescale is linear: with split-K each split adds its rescaled partial.
  out = acc.astype(jnp.float32) * xs[:, None] * ws[None, :]
  omask = _and_masks(None if rmask is None else rmask[:, None],
                     None if cmask is None else cmask[None, :])
  _store_tile(o_ref, (pl.ds(m0, bm), pl.ds(n0, bn)), out, omask, bs.split_k)


def _scaled_mm(x, xs, w, ws, *, op: str, acc_dtype, out_dtype, block_sizes, interpret):
  m, k = x.shape
  n = w.shape[0]
  bs = block_sizes or BlockSizes.get_default(op, m, n, k)
  bs.validate()
  if bs.split_k > 1 and (k % bs.block_k or (k // bs.block_k) % bs.split_k):
    raise NotImplementedError(
        f"pallas_gpu {op}_matmul: split_k={bs.split_k} needs K={k} to be whole "
        f"block_k={bs.block_k} steps that the splits divide")
  tiles = pl.cdiv(m, bs.block_m) * pl.cdiv(n, bs.block_n)
  kernel = functools.partial(_scaled_mm_kernel, m=m, n=n, k=k, bs=bs,
                             acc_dtype=acc_dtype)
  args = [x, xs, w, ws]
  padded = (pl.cdiv(m, bs.block_m) * bs.block_m, pl.cdiv(n, bs.block_n) * bs.block_n)
  return _split_k_call(kernel, args, bs, tiles, (m, n), padded, out_dtype,
                       name=f"{op}_matmul", interpret=interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def int8_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, *, out_dtype=jnp.bfloat16,
                block_sizes: BlockSizes | None = None, interpret: bool = False):
  """W8A8 on the GPU; see `reference.int8_matmul`."""
  reference.validate_scaled(x_codes, x_scales, w_codes, w_scales, jnp.int8)
  return _scaled_mm(x_codes, x_scales, w_codes, w_scales, op="int8", acc_dtype=jnp.int32,
                    out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def fp8_matmul(x: jax.Array, x_scales: jax.Array, w: jax.Array, w_scales: jax.Array, *,
               out_dtype=jnp.bfloat16, block_sizes: BlockSizes | None = None,
               interpret: bool = False):
  """FP8 (e4m3) W8A8 on the GPU; see `reference.fp8_matmul`."""
  reference.validate_scaled(x, x_scales, w, w_scales, jnp.float8_e4m3fn)
  return _scaled_mm(x, x_scales, w, w_scales, op="fp8", acc_dtype=jnp.float32,
                    out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret)


# ---------------------------------------------------------------------------------------
# Atom W4A4 with the int8 outlier tail


def _w4a4_kernel(*refs, m: int, n: int, g: int, n_groups: int, n_out: int,
                 bk_out: int, bs: BlockSizes):
  if n_out:
    xc_ref, xs_ref, wc_ref, ws_ref, xo_ref, xos_ref, wo_ref, wos_ref, o_ref = refs
  else:
    xc_ref, xs_ref, wc_ref, ws_ref, o_ref = refs
  bm, bn = bs.block_m, bs.block_n
  m0, n0, rmask, cmask = _output_tile(m, n, bs)
  xmask = None if rmask is None else rmask[:, None]
  wmask = None if cmask is None else cmask[:, None]
  half = g // 2

  def body(gi, acc):
    kc = pl.multiple_of(gi * half, half)
    x_lo, x_hi = _nibbles_as_int8(_load(xc_ref, (pl.ds(m0, bm), pl.ds(kc, half)), xmask))
    w_lo, w_hi = _nibbles_as_int8(_load(wc_ref, (pl.ds(n0, bn), pl.ds(kc, half)), wmask))
    part = _dot_nt(x_lo, w_lo, jnp.int32) + _dot_nt(x_hi, w_hi, jnp.int32)
    xs = _load(xs_ref, (pl.ds(m0, bm), gi), rmask)
    ws = _load(ws_ref, (pl.ds(n0, bn), gi), cmask)
    # Atom's per-group dequantization inside the K loop (SPEC.md 1.2).
    return acc + part.astype(jnp.float32) * (xs[:, None] * ws[None, :])

  acc = lax.fori_loop(0, n_groups, body, jnp.zeros((bm, bn), jnp.float32))
  if n_out:
    tail = jnp.zeros((bm, bn), jnp.int32)
    for j in range(pl.cdiv(n_out, bk_out)):  # static: the tail is a few K steps
      k0 = j * bk_out
      kmask = None
      if (j + 1) * bk_out > n_out:
        k0 = pl.program_id(0) * 0 + k0  # traced start: the block runs past n_out (masked)
        kmask = (k0 + lax.broadcasted_iota(jnp.int32, (bk_out,), 0) < n_out)[None, :]
      a = _load(xo_ref, (pl.ds(m0, bm), pl.ds(k0, bk_out)), _and_masks(xmask, kmask))
      b = _load(wo_ref, (pl.ds(n0, bn), pl.ds(k0, bk_out)), _and_masks(wmask, kmask))
      tail = tail + _dot_nt(a, b, jnp.int32)
    xos = _load(xos_ref, (pl.ds(m0, bm), 0), rmask)
    wos = _load(wos_ref, (pl.ds(n0, bn), 0), cmask)
    acc = acc + tail.astype(jnp.float32) * (xos[:, None] * wos[None, :])
  idx = (pl.ds(m0, bm), pl.ds(n0, bn))
  omask = _and_masks(xmask, None if cmask is None else cmask[None, :])
  out = acc.astype(o_ref.dtype)
  if omask is None:
    o_ref[idx] = out
  else:
    plgpu.store(o_ref.at[idx], out, mask=jnp.broadcast_to(omask, out.shape))


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "block_sizes",
                                             "interpret"))
def w4a4_matmul(x_codes, x_scales, w_codes, w_scales, x_out=None, x_out_scales=None,
                w_out=None, w_out_scales=None, *, group_size: int = 128,
                out_dtype=jnp.bfloat16, block_sizes: BlockSizes | None = None,
                interpret: bool = False):
  """Atom W4A4 (+ int8 tail) on the GPU; see `reference.w4a4_matmul`."""
  reference.validate_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales,
                          w_out, w_out_scales, group_size=group_size)
  half = group_size // 2
  if half < 16 or half & (half - 1):
    raise NotImplementedError(
        f"pallas_gpu w4a4_matmul: {group_size=} gives a K step of {half}; Triton needs a "
        "power of two >= 16")
  m, n = x_codes.shape[0], w_codes.shape[0]
  k_main = 2 * x_codes.shape[1]
  n_out = 0 if x_out is None else x_out.shape[1]
  bs = block_sizes or BlockSizes.get_default("w4a4", m, n, k_main + n_out)
  bs.validate()
  bk_out = min(128, max(16, 1 << (max(n_out, 1) - 1).bit_length()))
  tiles = pl.cdiv(m, bs.block_m) * pl.cdiv(n, bs.block_n)
  kernel = functools.partial(_w4a4_kernel, m=m, n=n, g=group_size,
                             n_groups=k_main // group_size, n_out=n_out, bk_out=bk_out,
                             bs=bs)
  args = [x_codes, x_scales, w_codes, w_scales]
  if n_out:
    args += [x_out, x_out_scales, w_out, w_out_scales]
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(tiles,),
      compiler_params=_compiler_params(bs),
      interpret=interpret,
      name=f"w4a4_g{group_size}_tail{n_out}",
  )(*args)
