"""Pallas (Triton lowering) kernel of the activation quantizer for NVIDIA GPUs.

Same signature as `reference.quantize_activations`, plus `block_sizes=` and `interpret=`.

Motivation: in XLA the quantizer is a chain of passes over the activations (norm, gather,
max, divide, pack) feeding the integer matmul; here one program per block of tokens reads
x once (plus an L2 re-read for per-token grids wider than a chunk) and writes the codes,
packed, in the layout `quantized_matmul.int8_matmul` / `w4a4_matmul` take (Atom's
`rmsnorm_fp16_i4` / `reorder_fp16_i4`, SPEC.md 1.2).

Program structure: optional pass over the row for the RMSNorm's sum of squares; then a
loop over the groups of the main part, `groups_per_step` groups of each token at a time
(a 2-D tile whose rows are (token, group) pairs, so that narrow groups still make wide
loads), and the outlier tail as one more 8-bit group per token. A group is quantized from
one or two *parts* (8 bits: the whole group; 4 bits: its first and second halves, which
become the low and high nibbles of the same bytes, so packing needs no interleave). A
part no wider than `block_k` is loaded once; a wider one (one group per token over a wide
row) is read in chunks twice, for the max and then for the codes. With `perm` the loads
gather x[:, perm[cols]] (and the norm weight alike): 2-byte loads, where the contiguous
case makes 16-byte ones (offline sm_90 compile, Triton 3.6: no spills at the default
tiles for K = 4096 / 14336, M = 1 / 256 / 4096).

Exactness: the codes equal the reference's bit for bit. Two Triton defaults would break
that, so the kernel avoids them: a float32 `/` lowers to the approximate `div.full.f32`
(off by up to 2 ulp, enough to move a quotient across a rounding boundary), so the
quotient is taken by `div.rn.f32` in inline PTX; and jnp.round has no Triton lowering, so
values are clamped to the code range and rounded half to even by adding and subtracting
1.5 * 2**23 (exact for |v| < 2**22; |v| <= 128 here). Under `interpret=True` the kernel
runs through XLA, which has a correctly rounded `/` and jnp.round (and would fold the
add-and-subtract away), so those are used there. The fused norm sums squares in chunks
and uses the GPU's rsqrt, so with a norm the codes match the reference only up to the
rounding of the normalised values.

Edges: rows past M and columns past a part are masked on load (read as 0, which never
raises a max) and on store; nothing past an array is read or written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.activation_quant import reference
from pallas_kernels.activation_quant.config import BlockSizes
from pallas_kernels.activation_quant.reference import QuantizedActivations
from pallas_kernels.triton_params import TritonCompilerParams

# 1.5 * 2**23: adding and subtracting it rounds a float32 |v| < 2**22 to the nearest
# integer, ties to even (the float32 ulp at 2**23 is 1).
_ROUND_MAGIC = np.float32(1.5 * 2 ** 23)


def _round(v: jax.Array, interpret) -> jax.Array:
  """float32 |v| < 2**22 -> the nearest integer, ties to even (jnp.round's rule)."""
  if interpret:
    return jnp.round(v)
  return (v + _ROUND_MAGIC) - _ROUND_MAGIC


def _divide(a: jax.Array, b: jax.Array, interpret) -> jax.Array:
  """a / b correctly rounded (IEEE), float32 of one shape."""
  if interpret:
    return a / b
  return plgpu.elementwise_inline_asm(
      "div.rn.f32 $0, $1, $2;", args=[a, b], constraints="=r,r,r", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)])[0]


def _kernel(*refs, m: int, k: int, bits: int, g: int, n_out: int, clip_ratio: float,
            eps: float, x_dtype, has_perm: bool, has_norm: bool, bs: BlockSizes,
            interpret):
  refs = list(refs)
  x_ref = refs.pop(0)  # [M, K]
  perm_ref = refs.pop(0) if has_perm else None  # i32[K]
  w_ref = refs.pop(0) if has_norm else None  # [K]
  codes_ref, scales_ref = refs[:2]  # i8[M, K_main (/ 2)], f32[M, G]
  tail_ref, tail_scales_ref = refs[2:] if n_out else (None, None)  # i8[M, n_out], f32[M, 1]
  bm, bk = bs.block_m, bs.block_k
  m0 = pl.program_id(0) * bm
  tokens = m0 + lax.broadcasted_iota(jnp.int32, (bm,), 0)

  inv_rms = None
  if has_norm:
    def sum_squares(i, acc):
      cols = i * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
      v = plgpu.load(x_ref.at[pl.ds(m0, bm), pl.ds(i * bk, bk)],
                     mask=(tokens < m)[:, None] & (cols < k)[None, :],
                     other=jnp.zeros((), x_ref.dtype)).astype(jnp.float32)
      return acc + jnp.sum(v * v, axis=1)
    total = lax.fori_loop(0, pl.cdiv(k, bk), sum_squares, jnp.zeros((bm,), jnp.float32))
    inv_rms = lax.rsqrt(total / np.float32(k) + np.float32(eps))  # [bm]

  # A tile row is one (token, span) pair: `lanes` tile rows hold `per_token` spans of each
  # of the block's bm tokens (per_token > 1: several groups of a token in one step).
  def tile_rows(per_token: int):
    """(token [R], token's inv_rms [R] or None), R = bm * per_token, token-major."""
    token = jnp.broadcast_to(tokens[:, None], (bm, per_token)).reshape(bm * per_token)
    if inv_rms is None:
      return token, None
    inv = jnp.broadcast_to(inv_rms[:, None], (bm, per_token)).reshape(bm * per_token)
    return token, inv

  def load(token, inv, rvalid, cols, cvalid):
    """y float32 [R, C] at x's (normed) logical columns cols [R, C] (after the gather) of
    the tokens [R]; entries where rvalid [R] & cvalid [C] is False read as 0."""
    shape = cols.shape
    mask = rvalid[:, None] & cvalid[None, :]
    src = cols
    if has_perm:
      src = plgpu.load(perm_ref.at[cols], mask=mask, other=jnp.zeros((), jnp.int32))
    y = plgpu.load(x_ref.at[jnp.broadcast_to(token[:, None], shape), src], mask=mask,
                   other=jnp.zeros((), x_ref.dtype)).astype(jnp.float32)
    if has_norm:
      w = plgpu.load(w_ref.at[src], mask=mask, other=jnp.zeros((), w_ref.dtype))
      # Rounded to x.dtype: the norm's output dtype in a model (reference.rms_norm).
      y = (y * inv[:, None] * w.astype(jnp.float32)).astype(x_dtype).astype(jnp.float32)
    return y

  def spans(token, inv, rvalid, base, width: int, parts: int, part_bits: int,
            clip: float, store_codes):
    """Quantizes, for every tile row r, `parts` parts of `width` logical columns, the
    p-th starting at base[r] + p * width, on one grid per row; store_codes(offset, chunk,
    codes) gets the int32 codes [parts][R, chunk] of columns offset + [0, chunk) of each
    part. Returns the scales [R]."""
    chunk = min(bk, 1 << (width - 1).bit_length())
    steps = pl.cdiv(width, chunk)
    lo, hi = -2 ** (part_bits - 1), 2 ** (part_bits - 1) - 1
    iota = lax.broadcasted_iota(jnp.int32, (chunk,), 0)

    def load_parts(offset):
      cvalid = iota < width - offset
      return [load(token, inv, rvalid, base[:, None] + (p * width + offset) + iota[None, :],
                   cvalid) for p in range(parts)]

    def quantize(ys, scale):
      out = []
      for y in ys:
        v = _divide(y, jnp.broadcast_to(scale[:, None], y.shape), interpret)
        out.append(_round(jnp.clip(v, lo, hi), interpret).astype(jnp.int32))
      return out

    def to_scale(amax):
      scale = amax * reference.scale_factor(part_bits, clip)
      return jnp.where(scale > 0, scale, 1.0)

    def part_max(ys):
      return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(y), axis=1) for y in ys])

    if steps == 1:  # one load serves the max and the codes
      ys = load_parts(0)
      scale = to_scale(part_max(ys))
      store_codes(0, chunk, quantize(ys, scale))
      return scale
    amax = lax.fori_loop(
        0, steps, lambda i, a: jnp.maximum(a, part_max(load_parts(i * chunk))),
        jnp.zeros(token.shape, jnp.float32))
    scale = to_scale(amax)

    def emit(i, carry):
      store_codes(i * chunk, chunk, quantize(load_parts(i * chunk), scale))
      return carry
    lax.fori_loop(0, steps, emit, 0)
    return scale

  def store(ref, token, col, values, rvalid, cvalid):
    """ref[token[r], col[r, c]] = values[r, c] where rvalid [R] & cvalid [C]."""
    plgpu.store(ref.at[jnp.broadcast_to(token[:, None], col.shape), col], values,
                mask=rvalid[:, None] & cvalid[None, :])

  k_main = k - n_out
  n_groups = k_main // g
  packed = bits == 4
  part_width = g // 2 if packed else g
  gps = bs.groups_per_step
  token, inv = tile_rows(gps)
  slot = jnp.broadcast_to(lax.broadcasted_iota(jnp.int32, (1, gps), 1),
                          (bm, gps)).reshape(bm * gps)  # the group's index in its step

  def group_step(step, carry):
    group = step * gps + slot  # [R]
    rvalid = (token < m) & (group < n_groups)

    def store_codes(offset, chunk, codes):
      if packed:  # low nibble: code j, high nibble: code j + g/2 (hi << 4 keeps int8 range)
        codes = [(codes[0] & 0xF) | (codes[1] << 4)]
      iota = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
      store(codes_ref, token, group[:, None] * part_width + offset + iota[None, :],
            codes[0].astype(jnp.int8), rvalid, iota < part_width - offset)
    scale = spans(token, inv, rvalid, group * g, part_width, 2 if packed else 1, bits,
                  clip_ratio, store_codes)
    plgpu.store(scales_ref.at[token, group], scale, mask=rvalid)
    return carry
  lax.fori_loop(0, pl.cdiv(n_groups, gps), group_step, 0)

  if n_out:
    token, inv = tile_rows(1)
    rvalid = token < m

    def store_tail(offset, chunk, codes):
      iota = lax.broadcasted_iota(jnp.int32, (chunk,), 0)
      store(tail_ref, token, jnp.broadcast_to(offset + iota[None, :], (bm, chunk)),
            codes[0].astype(jnp.int8), rvalid, iota < n_out - offset)
    scale = spans(token, inv, rvalid, jnp.full((bm,), k_main, jnp.int32), n_out, 1, 8, 1.0,
                  store_tail)
    plgpu.store(tail_scales_ref.at[token, jnp.zeros((bm,), jnp.int32)], scale, mask=rvalid)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "clip_ratio",
                                             "num_outliers", "eps", "block_sizes",
                                             "interpret"))
def quantize_activations(x: jax.Array, *, bits: int, group_size: int | None = None,
                         clip_ratio: float = 1.0, perm: jax.Array | None = None,
                         num_outliers: int = 0, rms_norm_weight: jax.Array | None = None,
                         eps: float = 1e-6, block_sizes: BlockSizes | None = None,
                         interpret: bool = False) -> QuantizedActivations:
  """The activation quantizer on the GPU; see `reference.quantize_activations`."""
  g = reference.validate_inputs(x, bits=bits, group_size=group_size, clip_ratio=clip_ratio,
                                perm=perm, num_outliers=num_outliers,
                                rms_norm_weight=rms_norm_weight)
  m, k = x.shape
  k_main = k - num_outliers
  bs = block_sizes or BlockSizes.get_default(m, k_main, g, bits)
  kernel = functools.partial(
      _kernel, m=m, k=k, bits=bits, g=g, n_out=num_outliers, clip_ratio=clip_ratio,
      eps=eps, x_dtype=x.dtype, has_perm=perm is not None,
      has_norm=rms_norm_weight is not None, bs=bs, interpret=interpret)
  out_shape = [jax.ShapeDtypeStruct((m, k_main // 2 if bits == 4 else k_main), jnp.int8),
               jax.ShapeDtypeStruct((m, k_main // g), jnp.float32)]
  if num_outliers:
    out_shape += [jax.ShapeDtypeStruct((m, num_outliers), jnp.int8),
                  jax.ShapeDtypeStruct((m, 1), jnp.float32)]
  args = [a for a in (x, perm, rms_norm_weight) if a is not None]
  out = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(pl.cdiv(m, bs.block_m),),
      compiler_params=TritonCompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
      interpret=interpret,
      name=f"quantize_activations_{bits}bit_g{g}_tail{num_outliers}",
  )(*args)
  if num_outliers:
    return QuantizedActivations(*out)
  return QuantizedActivations(*out, None, None)
