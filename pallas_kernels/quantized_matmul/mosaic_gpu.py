"""Quantized matmuls on Hopper through Mosaic GPU: W4A16 (a TMA load ring and wgmma with
the weights in registers), Atom W4A4 (`w4a4_matmul`; up to 16 tokens on the W4A16 kernel)
and W8A8 / FP8 (`scaled_matmul`: a warp-specialized pipeline, two wgmma warpgroups, one
program per SM), the last two at the end of this file.

Why a second GPU backend: every Pallas-Triton W4A16 variant stays at 25-35% of HBM at
decode sizes (bench/results/quantized_matmul.md), because Triton waits for each group's
loads and MMAs. Mosaic GPU lets the kernel keep `max_concurrent_steps` groups of codes in
flight through TMA while the warpgroup unpacks and multiplies the current one.

Per K step (`groups_per_step` quantization groups of g channels) a program:
  1. waits for its TMA copy of the codes [block_n, step_k] (int4), x [mp, step_k] (bf16)
     and the groups' scales [groups_per_step, block_n] (f32);
  2. loads the codes into registers in the 4-bit upcast layout and unpacks them straight
     into the wgmma operand layout (`_unpack_to_wgmma_layout`: a shift, a LOP3 and a
     bf16x2 subtract per two codes, no exchange between threads, x permuted to match);
  3. issues wgmma(partial [block_n, mp], w [block_n, g], x^T [g, mp]) into a fresh
     float32 accumulator, for every group of the step (`groups_per_step`, 2 by default)
     before it waits for any, so one group's unpack overlaps the other's MMA (the TMA
     ring keeps the next steps' loads in flight meanwhile);
  4. adds partial x the group's row scales to a float32 register sum.
The output is computed transposed ([N, mp], tokens minor: wgmma's N is the token count,
padded to a multiple of 8), with split-K partials summed by XLA. `register_unpack=False`
is the first form: Mosaic GPU's int4 -> bf16 conversion after a register relayout, each
weight scaled in bf16, one accumulator over all of K.

Layout contract: the QTensor's symmetric 4-bit codes (int8 bytes, "group_halves": byte j
of a group holds code j low and code j + g/2 high, two's-complement nibbles) are read as
an int4 [N, K] array. XLA's int4 order puts a byte's low nibble first, so element 2j + h
of a group is code j + h * g/2; x is permuted the same way (a transpose of [g/2, 2] inside
each group), which leaves the product unchanged. Asymmetric codes and 8-bit codes are
refused (NotImplementedError: an implementation order falls through to the next).

Measured on an H200 (bench/results/quantized_matmul.md, runs 10-53): in GPU time the
kernel alone reads at 51-68% of the datasheet bandwidth (its TMA ring alone, with no
compute, reads at 71-83%: run 29). Each program waits 1.0-1.6 µs for its first data
before its steps keep up with HBM (run 51's timeline), hence fewer, longer programs by
default (runs 52-53). Its three XLA glue kernels (x permutation, scale transpose, split-K
sum; `direct_scales` drops the transpose) add 4.7-9.2 µs, so the op is 1.79-2.43x XLA bf16
at M = 1-16 on 14336x4096, 4096x14336 and 28672x8192 (run 53; Triton: 1.2-1.4x). It is slower than Triton on
4096x4096, so the dispatcher puts it first on the large projections only
(api.MOSAIC_W4A16_MIN_WEIGHTS).

Compile time: the entry points are jitted, so identical call sites in a model share one
trace and one lowered function (28 W8A8 sites lowered for CUDA on a CPU: 10 s -> 0.4 s);
on an H200 the first forward of a 4-layer W8A8 model went from 22.3 s to 7.4 s, of a
4-layer W4A4 one from 42.5 s to 6.9 s (quantized_model.md).

Rounding: W4A16 multiplies the exact bf16 codes and scales each group's float32 partial,
as the Triton kernel does (relative error 1e-6 to 7e-5 against the reference on the
device); `register_unpack=False` rounds code x scale to bf16 first, as XLA's
dequantize-then-dot does (3e-3).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.experimental.mosaic.gpu as mgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm

from pallas_kernels.quantized_matmul import reference
from pallas_kernels.quantized_matmul.config import NUM_SMS

# wgmma's M is 64 per warpgroup; its N (the tokens here) is a multiple of 8. Up to 64
# tokens: at 256, 4 ring stages of x tiles plus the output tile pass the 227 KB of shared
# memory (measured on an H200: 297 KB asked for).
WGMMA_ROWS = 64
TOKEN_MULTIPLE = 8
MAX_TOKENS = 64
# Groups the kernel serves: wgmma needs the int4 tile's rows [g/2 bytes] swizzled, >= 32 B.
GROUP_SIZES = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class MosaicBlockSizes:
  """Tiling of the Mosaic GPU W4A16 kernel.

  Attributes:
    block_n: output channels per program, a multiple of 64 (one wgmma M per 64 rows).
    split_k: programs that share one output tile along K; must divide the group count.
      Their float32 partials are summed by XLA. None picks enough programs for the GPU.
    max_concurrent_steps: pipeline steps in flight per program (the TMA ring depth).
    groups_per_step: quantization groups per pipeline step: more bytes per TMA copy and
      fewer barrier waits per byte (a step of one g128 group at block_n = 64 moves only 4
      KB of codes). Must divide each program's share of the groups. With the layout-cast
      unpack no gain on an H200 (run 17: noise at M = 1-4, up to 1.4x slower at M = 16
      with 4); with the register unpack 2 is the default (run 21), its two wgmmas in flight
      together.
    register_unpack: unpack the codes straight into the wgmma register layout (a shift,
      a LOP3 and a bf16x2 subtract per two codes, no exchange between threads; x takes
      the kernel's column order instead) and apply the scales to each group's float32
      [block_n, tokens] partial instead of to every weight, which also drops the bf16
      rounding of code x scale (run 19: relative error 1e-6 to 7e-5 against the
      reference, 3e-3 without). The default since run 19; with groups_per_step > 1 every
      group's wgmma of a step is issued before any partial is read.
    direct_scales: each thread loads its rows' scales straight from the [N, G] scales the
      QTensor holds, all of its program's groups into registers before the pipeline starts
      (strided global loads), instead of XLA transposing the scales to [G, N] at every
      call (2 µs of GPU time on the 4096-wide Llama-3-8B projections, 4 µs on 28672x8192;
      run 24) for the pipeline to copy row blocks of. On an H200 (run 28) the op takes
      6-8% less GPU time in eight of nine cases (three large shapes, M = 1-16; 1% in the
      ninth), though the kernel itself takes 0.6-2.0 µs more. Off by default: in a
      compiled decode loop XLA likely hoists the transpose of the loop-invariant weights
      out of the loop, leaving only the kernel's extra cost: a 32-layer decode step took
      3.627 against 3.540 ms (quantized_model.md, model_l). It pays where every call
      transposes: jitted single-step decoding, one-off calls.
  """
  block_n: int = 128
  split_k: int | None = None
  max_concurrent_steps: int = 4
  groups_per_step: int = 1
  register_unpack: bool = False
  direct_scales: bool = False

  def __post_init__(self):
    if self.block_n <= 0 or self.block_n % WGMMA_ROWS:
      raise ValueError(f"block_n={self.block_n} must be a positive multiple of {WGMMA_ROWS}")
    if self.split_k is not None and self.split_k < 1:
      raise ValueError(f"split_k={self.split_k} must be >= 1")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1")
    if self.groups_per_step < 1:
      raise ValueError(f"groups_per_step={self.groups_per_step} must be >= 1")

  @classmethod
  def get_default(cls, n: int, k: int, group_size: int = 128) -> "MosaicBlockSizes":
    """The register unpack with 64-row tiles, two groups per step (the second unpacked
    while the first one's wgmma runs), a 2-deep ring (run 21: the best of seven tilings,
    or within 7%, at M = 1-16 on 14336x4096, 4096x14336 and 28672x8192 on an H200), and
    the smallest split-K of 2, 4, 8 that leaves every program whole steps, at most
    DEFAULT_MAX_GROUPS groups, and gives at least DEFAULT_MIN_PROGRAMS programs; else the
    largest such split. Each program waits for its first loads for about 2100 cycles (run
    51's timeline: 44% of a split-K-8 program's life on 14336x4096), so fewer, longer
    programs pay it less often, and the split-K sum after the kernel adds fewer partials.
    Split-K 8 everywhere (the rule of runs 21-51) took 2-7% longer on 14336x4096 and
    28672x8192 at M = 1-16 (runs 52-53). A group count that no split of 2 or more leaves
    in pairs (e.g. 86, Llama-2's down projection) keeps one group per step and
    `default_split_k`'s programs."""
    n_groups, n_tiles = k // group_size, n // 64
    splits = [split for split in (2, 4, 8) if n_groups % (2 * split) == 0]
    if not splits:
      return cls(block_n=64, max_concurrent_steps=3, register_unpack=True)
    split = next((s for s in splits if n_tiles * s >= DEFAULT_MIN_PROGRAMS
                  and n_groups // s <= DEFAULT_MAX_GROUPS), splits[-1])
    return cls(block_n=64, split_k=split, max_concurrent_steps=2, groups_per_step=2,
               register_unpack=True)


# The default W4A16 split (runs 52-53, H200, M = 1-16, GPU time of the whole op): about 6
# programs per SM, a bit over one wave of the 4 that fit on an SM (98 registers per
# thread), and no more than 16 groups per program. Chosen: split-K 4 on 14336x4096 (896
# programs of 8 groups; split-K 2 within 2%) and on 28672x8192 (1792 of 16; split-K 2, 896
# programs of 32 groups, 1-3% slower); 4096x14336 (64 tiles) keeps split-K 8 (512
# programs), 0-10% ahead of split-K 4.
DEFAULT_MIN_PROGRAMS = 6 * NUM_SMS
DEFAULT_MAX_GROUPS = 16


def default_split_k(n_tiles: int, n_groups: int) -> int:
  """Enough programs for ~2 per SM: the split doubles while it divides the group count."""
  split = 1
  while n_tiles * split < 2 * NUM_SMS and split < 16 and n_groups % (2 * split) == 0:
    split *= 2
  return split


def _split_k(bs: MosaicBlockSizes, n: int, n_groups: int) -> int:
  return bs.split_k or default_split_k(n // bs.block_n, n_groups // bs.groups_per_step)


def require_hopper(interpret) -> None:
  """Raises NotImplementedError on a GPU other than Hopper (sm_90): wgmma exists there
  only, so a dispatcher falls through to the next implementation instead of failing to
  compile. The interpreter, and lowering for CUDA from a CPU host, pass."""
  if interpret or jax.default_backend() != "gpu":
    return
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if capability != "9.0":
    raise NotImplementedError(f"mosaic_gpu kernels need a Hopper GPU (sm_90); the device is "
                              f"{device.device_kind} (compute capability {capability})")


def _swizzle_transforms(minor_bytes: int, bits: int) -> tuple:
  swizzle = next(s for s in (128, 64, 32, 16) if minor_bytes % s == 0)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def interpret_params():
  """The `interpret=` value that runs this kernel on the CPU (Mosaic GPU's interpreter)."""
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams()


def _interpret_mode(interpret):
  """`interpret=True` (as for the Triton kernels) means the interpreter's defaults."""
  return interpret_params() if interpret is True else interpret


# What differs between the GPU and Mosaic GPU's interpreter. The interpreter models neither
# smem tilings and swizzles nor register layouts; none of these changes a value.


def _smem_transforms(interpret, minor_bytes: int, bits: int) -> tuple:
  return () if interpret else _swizzle_transforms(minor_bytes, bits)


def _in_layout(interpret, value, layout):
  return value if interpret else plgpu.layout_cast(value, layout)


def _row_vector(interpret, ref, layout):
  """smem ref [1, n] -> [n] in a wgmma row / column layout."""
  row = ref.at[0]
  return row[...] if interpret else plgpu.load(row, (), layout=layout, optimized=False)


def _rescaled(interpret, product, row_scales_smem, col_scales_smem):
  """float32 [rows, cols] = product x row scales [1, rows] x column scales [1, cols]."""
  shape = product.shape
  rows = _row_vector(interpret, row_scales_smem, plgpu.Layout.WGMMA.reduce(1))
  cols = _row_vector(interpret, col_scales_smem, plgpu.Layout.WGMMA.reduce(0))
  return (product.astype(jnp.float32) * lax.broadcast_in_dim(rows, shape, [0])
          * lax.broadcast_in_dim(cols, shape, [1]))


def int4_view(codes: jax.Array) -> jax.Array:
  """int8 bytes [N, K/2] -> int4 [N, K]: element 2j + h is byte j's low (h=0) / high nibble.

  The optimization barrier keeps XLA from constant-folding the bitcast when the codes are a
  jit constant (closed-over weights): its folder (jax 0.10.2, CPU) gets the nibbles wrong.
  """
  n, half = codes.shape
  codes = lax.optimization_barrier(codes)
  return lax.bitcast_convert_type(codes, jnp.int4).reshape(n, 2 * half)


def permute_x(x: jax.Array, group_size: int) -> jax.Array:
  """x [M, K] in the int4 view's order: within each group, channel j + h * g/2 -> 2j + h."""
  m, k = x.shape
  halves = x.reshape(m, k // group_size, 2, group_size // 2)
  return halves.swapaxes(2, 3).reshape(m, k)


# The register unpack (MosaicBlockSizes.register_unpack). A code c (int4, two's complement)
# in the low 4 bits of bf16 0x4308 gives 0x4300 | (c ^ 8), read as 128 + (c + 8) = CODE_BIAS
# + c: one LOP3 ((word & 0x000F000F) ^ 0x43084308) and one bf16x2 subtract per two codes.
CODE_BIAS = 136


def _biased_pair(word: ir.Value) -> ir.Value:
  """i32 (word & 0x000F000F) ^ 0x43084308, as one LOP3.

  Written as an AND and an XOR, it became two LOP3s in the SASS (Nsight on an H200, run
  31: 1.05 LOP3 per code of the kernel's 3.46 instructions per code), since a LOP3 takes
  one immediate and ptxas did not merge the two constants. As one, the kernel takes 9-14%
  less GPU time, the whole op 7-10% (run 32, the default tiling, three large shapes).
  lop3's table 0x6a is (a & b) ^ c for a = 0xf0, b = 0xcc, c = 0xaa.
  """
  return llvm.inline_asm(ir.IntegerType.get_signless(32), [word],
                         "lop3.b32 $0, $1, 0x000F000F, 0x43084308, 0x6a;", "=r,r")


def permute_x_register_unpack(x: jax.Array, group_size: int) -> jax.Array:
  """x [M, K] in the register unpack's column order (see `_unpack_to_wgmma_layout`).

  Within a group, column 32c + 16 t1 + 8 t0 + 2q + u holds channel
  t0 g/2 + 16c + 4q + 2u + t1: the int4 view's nibble order composed with the unpack's.
  """
  m, k = x.shape
  digits = x.reshape(m, k // group_size, 2, group_size // 32, 4, 2, 2)  # [M, G, t0, c, q, u, t1]
  return digits.transpose(0, 1, 3, 6, 2, 4, 5).reshape(m, k)            # [M, G, c, t1, t0, q, u]


def _unpack_reference(codes: jax.Array) -> jax.Array:
  """What `_unpack_to_wgmma_layout` computes, in jnp (for the interpreter): int4 [rows, g]
  -> bf16, column 32c + 8t + 2q + u taken from column 32c + 8q + 4u + t."""
  rows, g = codes.shape
  digits = codes.astype(jnp.bfloat16).reshape(rows, g // 32, 4, 2, 4)    # [.., c, q, u, t]
  return digits.transpose(0, 1, 4, 2, 3).reshape(rows, g)


def _unpack_to_wgmma_layout(codes: jax.Array) -> jax.Array:
  """int4 [rows, g] in the WGMMA_UPCAST_4X layout -> bf16 in the WGMMA layout.

  Thread q of a row quad holds, per 32 columns, one 32-bit word of columns 32c + 8q + 0..7
  (nibble v = column 32c + 8q + v). Word >> 4t masked by 0x000F000F puts nibbles t and t + 4
  in the two bf16 halves, and the WGMMA layout reads that pair as its register 4c + t:
  columns 32c + 8t + 2q + {0, 1}. So no value moves between threads; the column order
  changes, and `permute_x_register_unpack` gives x the same order.
  """
  def bf16_pairs_unpacker():
    i32 = ir.IntegerType.get_signless(32)
    bf16 = ir.BF16Type.get()
    pair = ir.VectorType.get((2,), bf16)
    bias = arith.constant(pair, ir.DenseElementsAttr.get_splat(
        pair, ir.FloatAttr.get(bf16, float(CODE_BIAS))))

    def pairs(word):                                     # registers 4c + t, t = 0..3
      shifted = [word] + [arith.shrui(word, arith.constant(i32, 4 * t)) for t in (1, 2, 3)]
      return [arith.subf(mgpu.utils.bitcast(_biased_pair(w), pair), bias) for w in shifted]
    return pairs

  return _unpack_words(codes, jnp.bfloat16, plgpu.Layout.WGMMA, mgpu.WGMMA_LAYOUT,
                       bf16_pairs_unpacker, is_signed=None)


def _unpack_words(codes: jax.Array, dtype, layout, mgpu_layout, unpacker,
                  is_signed) -> jax.Array:
  """The register unpacks' common frame: int4 codes [rows, k] in the WGMMA_UPCAST_4X layout,
  each thread's 32-bit word of 8 codes per 32-column chunk c turned by `unpacker()(word)`
  into registers r * c + 0..r-1 of `mgpu_layout`, in the thread that holds the word.
  `unpacker` is called once, inside the kernel, so that its constants are made once."""
  shape = codes.shape

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA_UPCAST_4X,),
                     return_type=plgpu.ShapeDtypeStruct(shape, dtype, layout))
  def unpack(_, words):
    registers_of = unpacker()
    out = np.empty(mgpu_layout.registers_shape(shape), dtype=object)
    for idx, reg in np.ndenumerate(words.registers):   # idx[1]: the 32-column chunk
      registers = registers_of(mgpu.utils.bitcast(reg, ir.IntegerType.get_signless(32)))
      for t, register in enumerate(registers):
        out[(idx[0], len(registers) * idx[1] + t, *idx[2:])] = register
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu_layout, _is_signed=is_signed)

  return unpack(codes)


def check(x, codes, scales, zeros, *, bits: int, group_size: int,
          block_sizes: MosaicBlockSizes) -> None:
  """Raises NotImplementedError for the cases this kernel does not serve."""
  reference.validate_weight_only(x, codes, scales, zeros, bits=bits, group_size=group_size)
  m, k = x.shape
  n = codes.shape[0]
  if bits != 4 or zeros is not None:
    raise NotImplementedError(f"mosaic_gpu W4A16 serves symmetric 4-bit codes only "
                              f"({bits=}, zeros {'given' if zeros is not None else 'None'})")
  if group_size not in GROUP_SIZES:
    raise NotImplementedError(f"mosaic_gpu W4A16: {group_size=} not in {GROUP_SIZES}")
  if n % block_sizes.block_n:
    raise NotImplementedError(f"mosaic_gpu W4A16: N={n} is not a multiple of "
                              f"block_n={block_sizes.block_n}")
  if m > MAX_TOKENS:
    raise NotImplementedError(f"mosaic_gpu W4A16: M={m} > {MAX_TOKENS}")
  n_groups = k // group_size
  split = _split_k(block_sizes, n, n_groups)
  if n_groups % split:
    raise ValueError(f"split_k={split} must divide the {n_groups} groups of K={k}")
  if (n_groups // split) % block_sizes.groups_per_step:
    raise ValueError(f"groups_per_step={block_sizes.groups_per_step} must divide the "
                     f"{n_groups // split} groups of each of the split_k={split} programs")


def kernel_operands(x: jax.Array, codes: jax.Array, scales: jax.Array, *, group_size: int,
                    block_sizes: MosaicBlockSizes,
                    interpret=False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The kernel's inputs from the QTensor arrays: x permuted and padded to mp tokens
  ([mp, K] bf16, or [K, mp] for the interpreter), the codes as int4 [N, K], the scales
  [N, G] as they are (`direct_scales`) or as [G, N], one group's scales one contiguous
  row."""
  m = x.shape[0]
  mp = -(-m // TOKEN_MULTIPLE) * TOKEN_MULTIPLE
  permute = permute_x_register_unpack if block_sizes.register_unpack else permute_x
  x_perm = jnp.pad(permute(x.astype(jnp.bfloat16), group_size), ((0, mp - m), (0, 0)))
  # wgmma wants x K-minor (a transposed smem view; its N = mp is too narrow to swizzle
  # the other way); the interpreter's wgmma reads no transposed views, so it gets x^T.
  x_operand = x_perm.T if interpret else x_perm
  return x_operand, int4_view(codes), scales if block_sizes.direct_scales else scales.T


def partial_products(x_operand: jax.Array, w4: jax.Array, scales: jax.Array, *,
                     group_size: int, block_sizes: MosaicBlockSizes, interpret=False,
                     profile_dir: str | None = None,
                     token_scales: jax.Array | None = None) -> jax.Array:
  """The kernel: float32 partial products [split_k, N, mp] from `kernel_operands`.

  `token_scales` (register unpack; from `token_scale_operand`): each group's partial is
  also scaled per token, for Atom W4A4's activation group scales (`w4a4_matmul` with
  `MosaicW4A4BlockSizes.decode_tiling`).

  `profile_dir` (register unpack, on the GPU): Mosaic GPU's profiler writes a trace of
  each program's phases there, in cycles: "pipeline" (from before the first loads to
  after the last step), within it per step "unpack" and "issue" per group, "wait" and
  "scale", then "store" (`bench/w4a16_timeline.py` reads it).
  """
  interpret = _interpret_mode(interpret)
  bs = block_sizes
  if profile_dir and not bs.register_unpack:
    raise ValueError(f"profile_dir={profile_dir!r} traces the register unpack only; "
                     f"block_sizes={bs} has register_unpack=False")
  if token_scales is not None and not bs.register_unpack:
    raise ValueError(f"token_scales need the register unpack; block_sizes={bs} has "
                     "register_unpack=False")
  g = group_size
  n, k = w4.shape
  mp = x_operand.shape[1] if interpret else x_operand.shape[0]
  n_groups = k // g
  n_tiles = n // bs.block_n
  split = _split_k(bs, n, n_groups)
  per_step = bs.groups_per_step
  steps = n_groups // split // per_step
  step_k = per_step * g                                    # channels of K per step

  swizzled = functools.partial(_smem_transforms, interpret)
  in_layout = functools.partial(_in_layout, interpret)

  def w4a16_mosaic_kernel(w_gmem, x_gmem, s_gmem, *refs):
    t_gmem, o_gmem, *scratch = refs if token_scales is not None else (None, *refs)
    w_staging = scratch[0] if interpret else None
    tile = lax.axis_index("n")
    part = lax.axis_index("k")
    rows = pl.ds(tile * bs.block_n, bs.block_n)

    def weights_operand(w):
      if interpret:  # the interpreter's wgmma takes its left operand from smem only
        w_staging[...] = w
        return w_staging
      return w

    def x_operand_of(x_smem, group_k):                                     # [g, mp]
      return (x_smem.at[group_k] if interpret else
              plgpu.transpose_ref(x_smem.at[:, group_k], (1, 0)))

    def scale_column(group):                                              # f32 [bn]
      column = s_gmem.at[rows, group]
      return column[...] if interpret else plgpu.load(
          column, (), layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)

    # direct_scales: all of the program's scales are loaded into registers up front (2 per
    # thread and group), so their latency overlaps the pipeline's first loads.
    program_scales = ([scale_column(part * steps * per_step + c)
                       for c in range(steps * per_step)] if bs.direct_scales else None)

    def group_scales(indices, j, s_smem=None):                            # f32 [bn]
      """Group j of the step's scales: row j of its [per_step, bn] smem block, or
      (direct_scales) picked from the program's registers by the step index."""
      if not bs.direct_scales:
        return _row_vector(interpret, s_smem.at[pl.ds(j, 1)], plgpu.Layout.WGMMA.reduce(1))
      if steps == 1:
        return program_scales[j]
      # Exactly one term is not zero (a select by a scalar index, in multiplies).
      return sum(program_scales[step_index * per_step + j]
                 * (indices[0] == step_index).astype(jnp.float32)
                 for step_index in range(steps))

    def step(indices, w_smem, x_smem, *s_smem, acc_ref):
      for j in range(per_step):  # the step's groups: codes [bn, step_k], x [mp, step_k]
        group_k = pl.ds(j * g, g)
        w = in_layout(w_smem.at[:, group_k][...], plgpu.Layout.WGMMA_UPCAST_4X)  # [bn, g]
        w = in_layout(w, plgpu.Layout.WGMMA).astype(jnp.bfloat16)        # bf16 [bn, g]
        s = group_scales(indices, j, *s_smem)                            # f32 [bn]
        w = w * lax.broadcast_in_dim(s.astype(jnp.bfloat16), w.shape, [0])
        plgpu.wgmma(acc_ref, weights_operand(w), x_operand_of(x_smem, group_k))
        # Each group waits for its wgmma. Leaving one in flight (wgmma_wait(1), the x
        # slot released a step later) gave non-finite outputs with split-K on an H200
        # (run 13).
        plgpu.wgmma_wait(0)

    def unpacked_step(indices, w_smem, x_smem, *rest):
      *smem_refs, total = rest
      s_smem = smem_refs[:1] if not bs.direct_scales else []   # [per_step, bn] f32
      t_smem = smem_refs[-1] if token_scales is not None else None  # [per_step, mp'] f32
      # Every group's wgmma of the step is issued before any partial is read, so the
      # unpack of group j + 1 runs while group j's wgmma does.
      step_scales = [group_scales(indices, j, *s_smem) for j in range(per_step)]

      # The named phases are what `profile_dir` traces (nothing otherwise).
      def mma_all(*acc_refs):
        for j, acc_ref in enumerate(acc_refs):
          group_k = pl.ds(j * g, g)
          with jax.named_scope("unpack"):
            codes = w_smem.at[:, group_k][...]                           # int4 [bn, g]
            w = (_unpack_reference(codes) if interpret else _unpack_to_wgmma_layout(
                plgpu.layout_cast(codes, plgpu.Layout.WGMMA_UPCAST_4X)))
          with jax.named_scope("issue"):
            plgpu.wgmma(acc_ref, weights_operand(w), x_operand_of(x_smem, group_k))
        with jax.named_scope("wait"):
          return [acc_ref[...] for acc_ref in acc_refs]

      partials = pl.run_scoped(mma_all, *[plgpu.ACC((bs.block_n, mp))] * per_step)
      with jax.named_scope("scale"):
        for j, (partial, row_scales) in enumerate(zip(partials, step_scales)):
          scaled = partial * lax.broadcast_in_dim(row_scales, partial.shape, [0])  # [bn, mp]
          if t_smem is not None:
            cols = _row_vector(interpret, t_smem.at[pl.ds(j, 1), pl.ds(0, mp)],
                               plgpu.Layout.WGMMA.reduce(0))                    # [mp]
            scaled = scaled * lax.broadcast_in_dim(cols, partial.shape, [1])
          total = total + scaled
      return total

    in_specs = [
        plgpu.BlockSpec((bs.block_n, step_k), lambda i: (0, part * steps + i),
                        transforms=swizzled(g // 2, 4)),
        plgpu.BlockSpec((step_k, mp), lambda i: (part * steps + i, 0)) if interpret
        else plgpu.BlockSpec((mp, step_k), lambda i: (0, part * steps + i),
                             transforms=_swizzle_transforms(2 * g, 16)),
    ]
    operand_refs = [w_gmem.at[rows], x_gmem]
    if not bs.direct_scales:
      in_specs.append(plgpu.BlockSpec((per_step, bs.block_n),
                                      lambda i: (part * steps + i, 0)))
      operand_refs.append(s_gmem.at[:, rows])
    if token_scales is not None:
      in_specs.append(plgpu.BlockSpec((per_step, token_scales.shape[1]),
                                      lambda i: (part * steps + i, 0)))
      operand_refs.append(t_gmem)
    if bs.register_unpack:
      with jax.named_scope("pipeline"):
        acc = plgpu.emit_pipeline(
            unpacked_step,
            grid=(steps,),
            in_specs=in_specs,
            max_concurrent_steps=bs.max_concurrent_steps,
            init_carry=in_layout(jnp.zeros((bs.block_n, mp), jnp.float32),
                                 plgpu.Layout.WGMMA),
        )(*operand_refs)
    else:
      def acc_scope(acc_ref):
        plgpu.emit_pipeline(
            functools.partial(step, acc_ref=acc_ref),
            grid=(steps,),
            in_specs=in_specs,
            max_concurrent_steps=bs.max_concurrent_steps,
        )(*operand_refs)
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bs.block_n, mp)))

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bs.block_n, mp), jnp.float32))
    def _store(o_smem):
      with jax.named_scope("store"):
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[part, rows])
        plgpu.wait_smem_to_gmem(0)

  profile = {}
  if profile_dir:  # per step two phases per group and two more, twice over, and slack
    profile = dict(compiler_params=plgpu.CompilerParams(
        profile_space=4 * steps * (per_step + 1) + 64, profile_dir=profile_dir))
  return plgpu.kernel(
      w4a16_mosaic_kernel,
      out_type=jax.ShapeDtypeStruct((split, n, mp), jnp.float32),
      grid=(n_tiles, split),
      grid_names=("n", "k"),
      scratch_types=[plgpu.SMEM((bs.block_n, g), jnp.bfloat16)] if interpret else [],
      interpret=interpret,
      **profile,
  )(w4, x_operand, scales, *(() if token_scales is None else (token_scales,)))


def token_scale_operand(x_scales: jax.Array, mp: int, groups_per_step: int) -> jax.Array:
  """Per-token group scales [M, G] -> f32 [G, mp'] for `partial_products(token_scales=)`:
  one group's scales a row, the tokens padded with zeros to mp' >= mp so that a step's
  rows are a multiple of 128 bytes, as a TMA copy must be."""
  m = x_scales.shape[0]
  unit = 32 // math.gcd(groups_per_step, 32)               # f32 per 128 B of a step's rows
  padded = -(-mp // unit) * unit
  return jnp.pad(x_scales.astype(jnp.float32).T, ((0, 0), (0, padded - m)))


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_sizes", "interpret"))
def weight_only_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array,
                       zeros: jax.Array | None = None, *, bits: int, group_size: int,
                       block_sizes: MosaicBlockSizes | None = None,
                       interpret=False) -> jax.Array:
  """Symmetric W4A16: x [M, K] @ dequant(codes [N, K/2]).T -> [M, N] in x.dtype.

  `interpret=True` (as for the Triton kernels) or an `InterpretGPUParams` runs the kernel
  in Mosaic GPU's interpreter on the CPU.
  """
  interpret = _interpret_mode(interpret)
  require_hopper(interpret)
  bs = block_sizes or MosaicBlockSizes.get_default(codes.shape[0], x.shape[1], group_size)
  check(x, codes, scales, zeros, bits=bits, group_size=group_size, block_sizes=bs)
  operands = kernel_operands(x, codes, scales, group_size=group_size, block_sizes=bs,
                             interpret=interpret)
  partials = partial_products(*operands, group_size=group_size, block_sizes=bs,
                              interpret=interpret)                  # [split, N, mp] f32
  return partials.sum(axis=0)[:, :x.shape[0]].T.astype(x.dtype)


# ---------------------------------------------------------------------------------------
# Atom W4A4

# Int4 codes in the high nibble of an int8 are 16 x the code, exactly; the kernel takes
# the 16 out of the weight scales.
W4A4_CODE_FACTOR = 16
# Output channels per compute warpgroup (one wgmma M) and compute warpgroups per program.
W4A4_ROWS_PER_WG = 64
W4A4_COMPUTE_WGS = 2


@dataclasses.dataclass(frozen=True)
class MosaicW4A4BlockSizes:
  """Tiling of the Mosaic GPU W4A4 kernel: one warpgroup per [block_m, block_n] tile.

  Attributes:
    block_m: tokens per program, a multiple of 64 (wgmma's M).
    block_n: output channels per program, a multiple of 8 (wgmma's N), at most 256.
    max_concurrent_steps: groups of codes in flight per program (the TMA ring depth).
    x_int8: XLA unpacks the activation codes to int8 before the kernel, so that TMA lands
      them where wgmma reads them and the kernel unpacks only the weights: per output
      element one unpack instead of three at block_m = 128, block_n = 64. Run 17: 1.10-1.17x
      faster at equal tiles (M = 1024 and 4096); the default.
    register_weights: the other kernel (`_w4a4_register_weights`): the weights unpacked in
      registers as wgmma's left operand, the product transposed, a warp-specialized
      pipeline with two compute warpgroups of 64 output channels each. block_n must then be
      128, block_m (the wgmma's N) a multiple of 32 up to 256; x is always unpacked by XLA.
    groups_per_step: (register_weights only) quantization groups per pipeline step. With
      2, both groups' wgmmas are issued before the first partial is read, so the second
      group's unpack and the first one's rescale overlap a wgmma. Must divide the group
      count.
    decode_tiling: for a few tokens (decode), run the 4-bit product on the W4A16 kernel
      (`weight_only_matmul`'s, register unpack) with this tiling instead: XLA unpacks the
      activation codes to bf16 (exact for 4-bit codes), the kernel takes each group's
      float32 partial (exact: integer products and sums below 2^24) times w_scale x
      act_scale, and XLA adds the int8 tail. The other fields are then unused. The W4A4
      kernels' tiles hold 64 or 128 tokens; this one pads the tokens to 8. The default
      up to W4A4_DECODE_MAX_M tokens (`w4a4_decode_tiling`).
  """
  block_m: int = 64
  block_n: int = 128
  max_concurrent_steps: int = 2
  x_int8: bool = False
  register_weights: bool = False
  groups_per_step: int = 1
  decode_tiling: MosaicBlockSizes | None = None

  def __post_init__(self):
    if self.decode_tiling is not None and not self.decode_tiling.register_unpack:
      raise ValueError(f"decode_tiling={self.decode_tiling} needs register_unpack=True")
    if self.register_weights:
      if self.block_n != W4A4_ROWS_PER_WG * W4A4_COMPUTE_WGS:
        raise ValueError(f"block_n={self.block_n} must be "
                         f"{W4A4_ROWS_PER_WG * W4A4_COMPUTE_WGS} with register_weights")
      if self.groups_per_step < 1:
        raise ValueError(f"groups_per_step={self.groups_per_step} must be >= 1")
      if not 0 < self.block_m <= 256 or self.block_m % 32:
        raise ValueError(f"block_m={self.block_m} must be a multiple of 32 in [32, 256] "
                         "with register_weights (a TMA copy of its f32 scales moves a "
                         "multiple of 128 bytes)")
    elif self.block_m <= 0 or self.block_m % WGMMA_ROWS:
      raise ValueError(f"block_m={self.block_m} must be a positive multiple of {WGMMA_ROWS}")
    if not 0 < self.block_n <= 256 or self.block_n % TOKEN_MULTIPLE:
      raise ValueError(f"block_n={self.block_n} must be a multiple of {TOKEN_MULTIPLE} "
                       "in [8, 256]")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1")

  @classmethod
  def get_default(cls, n: int, m: int, n_groups: int = 1, n_out: int = 0,
                  group_size: int = 128) -> "MosaicW4A4BlockSizes":
    """Up to W4A4_DECODE_MAX_M tokens, where N is a multiple of 64 and the W4A16 kernel
    takes the group size: the product on the W4A16 kernel (`w4a4_decode_tiling`).
    Above 64 tokens and on N a multiple of 128, the register-weights kernel with 128
    tokens per program (runs 34-37: 1.25-1.33x the first kernel's best tiling at M = 1024
    and 4096 on the four Llama-3-8B shapes): two groups per step and a 2-deep ring where
    the group count is even (run 36: 3-5% ahead of one group and 4 steps), else 4 steps
    (runs 34-35: ahead of 2, 3 and 5), 3 where a 256-channel tail leaves no room for 4.
    Otherwise the first kernel: x unpacked by XLA (run 17: 1.10-1.17x faster at equal
    tiles), 128 x 64 tiles above 64 tokens, else 64 x 128 (less padding of few tokens);
    the widest multiple of 8 up to that block_n that divides N."""
    if m <= W4A4_DECODE_MAX_M and n % WGMMA_ROWS == 0 and group_size in GROUP_SIZES:
      return cls(decode_tiling=w4a4_decode_tiling(n, n_groups, group_size))
    if m > 64 and n % (W4A4_ROWS_PER_WG * W4A4_COMPUTE_WGS) == 0:
      for steps, per_step in ((2, 2), (4, 1), (3, 1), (2, 1)):
        bs = cls(block_m=128, block_n=W4A4_ROWS_PER_WG * W4A4_COMPUTE_WGS,
                 max_concurrent_steps=steps, groups_per_step=per_step,
                 register_weights=True)
        if n_groups % per_step == 0 and _register_weights_smem_bytes(
            bs, group_size, n_out) <= SMEM_BYTES:
          return bs
    block_m, widest = (128, 64) if m > 64 else (64, 128)
    block_n = next((bn for bn in range(widest, 0, -TOKEN_MULTIPLE) if n % bn == 0), widest)
    return cls(block_m=block_m, block_n=block_n, x_int8=True)


# Atom W4A4 with up to this many tokens runs on the W4A16 kernel by default. Run 55 (H100,
# 128 outlier channels, M = 1-16): 1.68-1.85x XLA bf16 on 14336x4096, 1.46-1.63x on
# 4096x14336 and 0.72-0.79x on 4096x4096, against 0.39-1.19x for the W4A4 kernels' tiles
# of 64 tokens; a 4-layer Llama-3-8B decode step 1.93 -> 1.36 ms (model_p, before the
# split-K of `w4a4_decode_tiling`).
W4A4_DECODE_MAX_M = 16


def w4a4_decode_tiling(n: int, n_groups: int, group_size: int) -> MosaicBlockSizes:
  """The W4A16-kernel tiling for Atom W4A4 at a few tokens: the W4A16 default for
  K_main = n_groups x group_size where it pairs groups; else (the odd group counts that
  Atom's 128-channel tail leaves, e.g. 31, 63, 111) one group per step, a 4-deep ring and
  the smallest split-K up to 16 that divides the groups and fills every SM once, else the
  largest (run 55, H100: on 4096x14336 split-K 3 took 28 against 51 µs for none; on
  14336x4096 a 4-deep ring 24.2 against 25.9 µs for 6 and 28.0 for 3)."""
  paired = MosaicBlockSizes.get_default(n, n_groups * group_size, group_size)
  if paired.groups_per_step > 1:
    return paired
  divisors = [d for d in range(1, 17) if n_groups % d == 0]
  split = next((d for d in divisors if n // WGMMA_ROWS * d >= NUM_SMS), divisors[-1])
  return MosaicBlockSizes(block_n=WGMMA_ROWS, split_k=split, max_concurrent_steps=4,
                          register_unpack=True)


# int8 wgmma takes K in steps of 32.
INT8_K_STEP = 32


def check_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales, w_out,
               w_out_scales, *, group_size: int, block_sizes: MosaicW4A4BlockSizes) -> None:
  """Raises NotImplementedError for the cases the W4A4 kernel does not serve."""
  reference.validate_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales, w_out,
                          w_out_scales, group_size=group_size)
  n = w_codes.shape[0]
  if group_size not in GROUP_SIZES:
    raise NotImplementedError(f"mosaic_gpu W4A4: {group_size=} not in {GROUP_SIZES}")
  if n % block_sizes.block_n:
    raise NotImplementedError(f"mosaic_gpu W4A4: N={n} is not a multiple of "
                              f"block_n={block_sizes.block_n}")
  if x_out is not None and (x_out.shape[1] % INT8_K_STEP or x_out.shape[1] > 256):
    raise NotImplementedError(f"mosaic_gpu W4A4: n_out={x_out.shape[1]} is not a multiple "
                              f"of {INT8_K_STEP} up to 256")
  if block_sizes.register_weights:
    if x_scales.shape[1] % block_sizes.groups_per_step:
      raise ValueError(f"groups_per_step={block_sizes.groups_per_step} must divide the "
                       f"{x_scales.shape[1]} groups")
    n_out = 0 if x_out is None else x_out.shape[1]
    smem = _register_weights_smem_bytes(block_sizes, group_size, n_out)
    if smem > SMEM_BYTES:
      raise NotImplementedError(f"mosaic_gpu W4A4: {block_sizes} with {n_out=} needs {smem} "
                                f"bytes of shared memory, more than {SMEM_BYTES}")


# Shared memory per program on an H100 / H200 (227 KB), less 1 KB for barriers.
SMEM_BYTES = 227 * 1024 - 1024


def _register_weights_smem_bytes(bs: MosaicW4A4BlockSizes, group_size: int,
                                 n_out: int) -> int:
  """The register-weights kernel's shared memory: the TMA ring (int8 x, int4 w and both
  scales per group), each compute warpgroup's tail tiles and bf16 output tile."""
  bm, bn, rows = bs.block_m, bs.block_n, W4A4_ROWS_PER_WG
  ring = bs.max_concurrent_steps * bs.groups_per_step * (
      bm * group_size + bn * group_size // 2 + 4 * (bm + bn))
  tail = (bm * n_out + rows * n_out + 4 * (bm + rows)) if n_out else 0
  return ring + W4A4_COMPUTE_WGS * (tail + 2 * bm * rows)


@functools.partial(jax.jit, static_argnames=("group_size", "out_dtype", "block_sizes",
                                             "interpret", "profile_dir"))
def w4a4_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, x_out: jax.Array | None = None,
                x_out_scales: jax.Array | None = None, w_out: jax.Array | None = None,
                w_out_scales: jax.Array | None = None, *, group_size: int = 128,
                out_dtype=jnp.bfloat16, block_sizes: MosaicW4A4BlockSizes | None = None,
                interpret=False, profile_dir: str | None = None) -> jax.Array:
  """Atom W4A4 (see `reference.w4a4_matmul`) on the int8 tensor cores, through Mosaic GPU.

  Two kernels; `block_sizes.register_weights` picks one (`get_default`: the second above
  64 tokens where N is a multiple of 128).

  The first: per group of g channels a program TMA-loads both int4 tiles, upcasts them to
  int8 in registers (exact) into shared memory, takes the group's int32 product with one
  wgmma, and adds it to a float32 register sum rescaled by act_scale x w_scale, as Atom
  does. The int8 outlier tail follows as one more wgmma with its own scales. Both operands
  share the QTensor's "group_halves" nibble order, so the int4 views need no permutation.
  With `x_int8` XLA unpacks the activation codes and only the weights are unpacked here. On
  an H200 0.63-0.87x XLA bf16 at M = 1024-4096 (runs 17, 22, 37).

  The second (`_w4a4_register_weights`): the weights are wgmma's left operand, unpacked in
  registers, in a warp-specialized pipeline with two compute warpgroups. On an H200
  0.80-1.13x XLA bf16 at M = 1024-4096 on the four Llama-3-8B shapes, 1.25-1.33x the first
  (bench/results/quantized_matmul.md, runs 34-37).

  `profile_dir` (second kernel, on the GPU): Mosaic GPU's profiler writes a trace of each
  warpgroup's phases (unpack, issue, wait, rescale per group) there, in cycles
  (`bench/w4a4_timeline.py` reads it).

  With `block_sizes.decode_tiling` the product runs on the W4A16 kernel instead
  (`_w4a4_on_weight_only_kernel`), for a few tokens.
  """
  interpret = _interpret_mode(interpret)
  require_hopper(interpret)
  bs = block_sizes or MosaicW4A4BlockSizes.get_default(
      w_codes.shape[0], x_codes.shape[0], x_scales.shape[1],
      0 if x_out is None else x_out.shape[1], group_size)
  if profile_dir and not bs.register_weights:
    raise ValueError(f"profile_dir={profile_dir!r} traces the register-weights kernel only; "
                     f"block_sizes={bs} picks another one")
  if bs.decode_tiling is not None:
    return _w4a4_on_weight_only_kernel(x_codes, x_scales, w_codes, w_scales, x_out,
                                       x_out_scales, w_out, w_out_scales,
                                       group_size=group_size, out_dtype=out_dtype,
                                       tiling=bs.decode_tiling, interpret=interpret)
  check_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales, w_out, w_out_scales,
             group_size=group_size, block_sizes=bs)
  if bs.register_weights:
    return _w4a4_register_weights(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales,
                                  w_out, w_out_scales, group_size=group_size,
                                  out_dtype=out_dtype, bs=bs, interpret=interpret,
                                  profile_dir=profile_dir)
  g, bm, bn = group_size, bs.block_m, bs.block_n
  m, n = x_codes.shape[0], w_codes.shape[0]
  n_groups = x_scales.shape[1]
  mp = -(-m // bm) * bm
  pad = lambda a: jnp.pad(a, ((0, mp - m), (0, 0)))        # zero tokens add nothing
  tail = x_out is not None
  n_out = x_out.shape[1] if tail else 0
  x4 = int4_view(pad(x_codes))                             # [mp, K_main] int4
  operands = [x4.astype(jnp.int8) if bs.x_int8 else x4, int4_view(w_codes),
              pad(x_scales).T, w_scales.T]
  if tail:  # [M, n_out], [N, n_out] int8 and their scales as [1, M], [1, N]
    operands += [pad(x_out), w_out, pad(x_out_scales).T, w_out_scales.T]
  # The interpreter's wgmma reads no transposed smem view: it gets its right operand
  # stored as [K, bn].
  swizzled = functools.partial(_smem_transforms, interpret)

  def weights_operand(w8_smem):
    return w8_smem if interpret else plgpu.transpose_ref(w8_smem, (1, 0))

  def store_int8(dst_smem, codes4, right_operand=False):
    """int4 [rows, g] -> int8 into dst_smem ([rows, g]; the interpreter's right operand
    [g, rows])."""
    codes8 = _in_layout(interpret, codes4, plgpu.Layout.WGMMA_UPCAST_4X).astype(jnp.int8)
    dst_smem[...] = codes8.T if interpret and right_operand else codes8

  def int8_product(x8_smem, w8_smem):
    def mma(acc_ref):
      plgpu.wgmma(acc_ref, x8_smem, weights_operand(w8_smem))
      return acc_ref[...]
    return pl.run_scoped(mma, plgpu.ACC((bm, bn), jnp.int32))

  def w4a4_mosaic_kernel(*refs):
    n_in = len(operands)
    x_gmem, w_gmem, xs_gmem, ws_gmem = refs[:4]
    o_gmem = refs[n_in]
    w8_smem = refs[n_in + 1]
    x8_smem = None if bs.x_int8 else refs[n_in + 2]
    tail_refs = refs[n_in + 2 + (x8_smem is not None):]
    rows_m = pl.ds(lax.axis_index("m") * bm, bm)
    rows_n = pl.ds(lax.axis_index("n") * bn, bn)

    def group(_, x_smem, w_smem, xs_smem, ws_smem, total):
      if x8_smem is not None:
        store_int8(x8_smem, x_smem[...])                           # [bm, g]
      store_int8(w8_smem, w_smem[...], right_operand=True)         # [bn, g]
      plgpu.commit_smem()
      product = int8_product(x_smem if x8_smem is None else x8_smem, w8_smem)
      return total + _rescaled(interpret, product, xs_smem, ws_smem)

    total = plgpu.emit_pipeline(
        group,
        grid=(n_groups,),
        in_specs=[
            plgpu.BlockSpec((bm, g), lambda i: (0, i),
                            transforms=swizzled(g, 8) if bs.x_int8 else swizzled(g // 2, 4)),
            plgpu.BlockSpec((bn, g), lambda i: (0, i), transforms=swizzled(g // 2, 4)),
            plgpu.BlockSpec((1, bm), lambda i: (i, 0)),
            plgpu.BlockSpec((1, bn), lambda i: (i, 0)),
        ],
        max_concurrent_steps=bs.max_concurrent_steps,
        init_carry=_in_layout(interpret, jnp.zeros((bm, bn), jnp.float32),
                              plgpu.Layout.WGMMA),
    )(x_gmem.at[rows_m], w_gmem.at[rows_n], xs_gmem.at[:, rows_m], ws_gmem.at[:, rows_n])

    if tail:
      xo_gmem, wo_gmem, xos_gmem, wos_gmem = refs[4:8]
      xo_smem, wo_smem, xos_smem, wos_smem, arrived = tail_refs[:5]
      copies = ((xo_gmem.at[rows_m], xo_smem), (wo_gmem.at[rows_n], wo_smem),
                (xos_gmem.at[:, rows_m], xos_smem), (wos_gmem.at[:, rows_n], wos_smem))
      for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, arrived)
      plgpu.barrier_wait(arrived)
      if interpret:  # the right operand as [n_out, bn]
        w8_smem_t = tail_refs[5]
        w8_smem_t[...] = wo_smem[...].T
        wo_smem = w8_smem_t
      total = total + _rescaled(interpret, int8_product(xo_smem, wo_smem), xos_smem,
                                 wos_smem)

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), out_dtype))
    def _store(o_smem):
      o_smem[...] = total.astype(out_dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows_m, rows_n])
      plgpu.wait_smem_to_gmem(0)

  int8_tile = lambda rows, cols: plgpu.SMEM((cols, rows) if interpret else (rows, cols),
                                            jnp.int8, transforms=swizzled(cols, 8))
  scratch = [int8_tile(bn, g)]
  if not bs.x_int8:
    scratch.append(plgpu.SMEM((bm, g), jnp.int8, transforms=swizzled(g, 8)))
  if tail:
    scratch += [plgpu.SMEM((bm, n_out), jnp.int8, transforms=swizzled(n_out, 8)),
                plgpu.SMEM((bn, n_out), jnp.int8, transforms=swizzled(n_out, 8)),
                plgpu.SMEM((1, bm), jnp.float32), plgpu.SMEM((1, bn), jnp.float32),
                plgpu.Barrier(num_arrivals=4)]
    if interpret:
      scratch.append(plgpu.SMEM((n_out, bn), jnp.int8))
  out = plgpu.kernel(
      w4a4_mosaic_kernel,
      out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(mp // bm, n // bn),
      grid_names=("m", "n"),
      scratch_types=scratch,
      interpret=interpret,
  )(*operands)
  return out[:m]


def _w4a4_on_weight_only_kernel(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales,
                                w_out, w_out_scales, *, group_size: int, out_dtype,
                                tiling: MosaicBlockSizes, interpret) -> jax.Array:
  """Atom W4A4 for a few tokens on the W4A16 kernel (`MosaicW4A4BlockSizes.decode_tiling`):
  the activation codes as exact bf16 integers, each group's partial scaled by the weight
  and activation group scales in the kernel; the int8 tail by XLA."""
  reference.validate_w4a4(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales,
                          w_out, w_out_scales, group_size=group_size)
  x = reference.unpack_4bit(x_codes, group_size).astype(jnp.bfloat16)   # [M, K_main]
  check(x, w_codes, w_scales, None, bits=4, group_size=group_size, block_sizes=tiling)
  m = x.shape[0]
  x_operand, w4, scales = kernel_operands(x, w_codes, w_scales, group_size=group_size,
                                          block_sizes=tiling, interpret=interpret)
  mp = x_operand.shape[1] if interpret else x_operand.shape[0]
  partials = partial_products(
      x_operand, w4, scales, group_size=group_size, block_sizes=tiling, interpret=interpret,
      token_scales=token_scale_operand(x_scales, mp, tiling.groups_per_step))
  out = partials.sum(axis=0)[:, :m].T                                   # f32 [M, N]
  if x_out is not None:
    tail = lax.dot_general(x_out, w_out, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.int32)
    out = out + tail.astype(jnp.float32) * x_out_scales * w_out_scales.T
  return out.astype(out_dtype)


# The register-weights W4A4 kernel (MosaicW4A4BlockSizes.register_weights): the weights are
# wgmma's left operand, unpacked in registers; the product is computed transposed.


def permute_x_register_weights(x8: jax.Array) -> jax.Array:
  """int8 x [M, K] in the int4 view's order -> the order `_unpack_int4_to_int8` leaves the
  weights in: within each 32 columns, column 16h + 4q + j holds view column 8q + 2j + h."""
  m, k = x8.shape
  digits = x8.reshape(m, k // 32, 4, 4, 2)                  # [M, c, q, j, h]
  return digits.transpose(0, 1, 4, 2, 3).reshape(m, k)      # [M, c, h, q, j]


def _unpack_int4_reference(codes: jax.Array) -> jax.Array:
  """What `_unpack_int4_to_int8` computes, in jnp (for the interpreter)."""
  return permute_x_register_weights(codes.astype(jnp.int8) * W4A4_CODE_FACTOR)


def _unpack_int4_to_int8(codes: jax.Array) -> jax.Array:
  """int4 [rows, k] in the WGMMA_UPCAST_4X layout -> int8 16 x code in WGMMA_LAYOUT_8BIT.

  Thread q of a row quad holds, per 32 columns, one 32-bit word of columns 8q + 0..7
  (nibble v = column 8q + v). (word << 4) & 0xF0F0F0F0 puts the even nibbles in the high
  halves of four bytes, word & 0xF0F0F0F0 the odd ones: 16 x the codes as int8, in the
  thread's two registers of the 8-bit wgmma layout (columns 4q + j and 16 + 4q + j). No
  value moves between threads; x takes the same column order
  (`permute_x_register_weights`).
  """
  def int8_quads_unpacker():
    i32 = ir.IntegerType.get_signless(32)
    quad = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))
    high_nibbles = arith.constant(i32, 0xF0F0F0F0 - (1 << 32))

    def quads(word):                                     # registers 2c (even), 2c + 1 (odd)
      even = arith.andi(arith.shli(word, arith.constant(i32, 4)), high_nibbles)
      odd = arith.andi(word, high_nibbles)
      return [mgpu.utils.bitcast(even, quad), mgpu.utils.bitcast(odd, quad)]
    return quads

  return _unpack_words(codes, jnp.int8, plgpu.Layout.WGMMA_8BIT,
                       mgpu.fragmented_array.WGMMA_LAYOUT_8BIT, int8_quads_unpacker,
                       is_signed=True)


def _w4a4_register_weights(x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales,
                           w_out, w_out_scales, *, group_size: int, out_dtype,
                           bs: "MosaicW4A4BlockSizes", interpret, profile_dir=None):
  """Atom W4A4 with the weights in registers: a warp-specialized pipeline (one warpgroup
  issues the TMA loads of int8 x [block_m, g] and int4 w [block_n, g] per group; two
  compute warpgroups each own 64 of the block_n output channels). Each compute warpgroup
  unpacks its codes to int8 in registers (three instructions per 8 codes, no shared-memory
  round trip), takes wgmma(int32 [64, block_m] = w [64, g] @ x^T [g, block_m]) and adds it
  to a float32 sum rescaled by w_scale x act_scale. The tile is stored transposed."""
  g, bm, bn = group_size, bs.block_m, bs.block_n
  rows = W4A4_ROWS_PER_WG
  m, n = x_codes.shape[0], w_codes.shape[0]
  n_groups = x_scales.shape[1]
  mp = -(-m // bm) * bm
  pad = lambda a: jnp.pad(a, ((0, mp - m), (0, 0)))        # zero tokens add nothing
  tail = x_out is not None and x_out.shape[1] > 0
  n_out = x_out.shape[1] if tail else 0
  x8 = permute_x_register_weights(int4_view(pad(x_codes)).astype(jnp.int8))  # [mp, K]
  operands = [x8.T if interpret else x8, int4_view(w_codes), pad(x_scales).T,
              w_scales.T / W4A4_CODE_FACTOR]
  if tail:  # [M, n_out], [N, n_out] int8 and their scales as [1, M], [1, N]
    operands += [pad(x_out).T if interpret else pad(x_out), w_out, pad(x_out_scales).T,
                 w_out_scales.T]
  swizzled = functools.partial(_smem_transforms, interpret)
  # The interpreter's wgmma reads its left operand from smem and no transposed views.
  right_operand = lambda ref: ref if interpret else plgpu.transpose_ref(ref, (1, 0))

  per_step = bs.groups_per_step
  step_k = per_step * g                                    # channels of K per step

  def pipeline(step, compute_context):
    x_spec = (plgpu.BlockSpec((step_k, bm), lambda i: (i, 0)) if interpret else
              plgpu.BlockSpec((bm, step_k), lambda i: (0, i), transforms=swizzled(step_k, 8)))
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(n_groups // per_step,),
        memory_registers=40,
        in_specs=[x_spec,
                  plgpu.BlockSpec((bn, step_k), lambda i: (0, i),
                                  transforms=swizzled(g // 2, 4)),
                  plgpu.BlockSpec((per_step, bm), lambda i: (i, 0)),
                  plgpu.BlockSpec((per_step, bn), lambda i: (i, 0))],
        wg_axis="wg",
        num_compute_wgs=W4A4_COMPUTE_WGS,
        max_concurrent_steps=bs.max_concurrent_steps,
        compute_context=compute_context,
    )

  def w4a4_register_weights_kernel(*refs):
    n_in = len(operands)
    x_gmem, w_gmem, xs_gmem, ws_gmem = refs[:4]
    o_gmem = refs[n_in]
    o_smem, *tail_smem = refs[n_in + 1:]
    w8_staging = tail_smem.pop(0) if interpret else None  # [wgs, per_step, rows, g]
    wg = lax.axis_index("wg")
    tokens = pl.ds(lax.axis_index("m") * bm, bm)
    cols = pl.ds(lax.axis_index("n") * bn, bn)
    wg_rows = pl.ds(wg * rows, rows)                      # within the program's block_n
    wg_cols = pl.ds(lax.axis_index("n") * bn + wg * rows, rows)

    def product(a, b_smem):                               # int32 [rows, bm]
      def mma(acc_ref):
        plgpu.wgmma(acc_ref, a, right_operand(b_smem))
        return acc_ref[...]
      return pl.run_scoped(mma, plgpu.ACC((rows, bm), jnp.int32))

    def weights(w_smem, j):                               # int8 [rows, g], 16 x codes
      codes = w_smem.at[wg_rows, pl.ds(j * g, g)][...]                   # int4 [rows, g]
      if interpret:
        w8_staging.at[wg, j][...] = _unpack_int4_reference(codes)
        return w8_staging.at[wg, j]
      return _unpack_int4_to_int8(plgpu.layout_cast(codes, plgpu.Layout.WGMMA_UPCAST_4X))

    # The named phases are what `profile_dir` traces (nothing otherwise).
    def step(_, x_smem, w_smem, xs_smem, ws_smem, total):
      def mma_all(*acc_refs):
        for j, acc_ref in enumerate(acc_refs):
          x_group = x_smem.at[pl.ds(j * g, g)] if interpret else x_smem.at[:, pl.ds(j * g, g)]
          with jax.named_scope("unpack"):
            w = weights(w_smem, j)
          with jax.named_scope("issue"):
            plgpu.wgmma(acc_ref, w, right_operand(x_group))
        new_total = total
        for j, acc_ref in enumerate(acc_refs):  # group j's partial while later ones run
          with jax.named_scope("wait"):
            partial = (acc_ref[...] if interpret else
                       plgpu.wgmma_accumulator_load(acc_ref, wait_n=per_step - 1 - j))
          with jax.named_scope("rescale"):
            new_total = new_total + _rescaled(interpret, partial,
                                              ws_smem.at[pl.ds(j, 1), wg_rows],
                                              xs_smem.at[pl.ds(j, 1)])
        return new_total
      return pl.run_scoped(mma_all, *[plgpu.ACC((rows, bm), jnp.int32)] * per_step)

    def compute_context(run_pipeline):
      total = run_pipeline(_in_layout(interpret, jnp.zeros((rows, bm), jnp.float32),
                                      plgpu.Layout.WGMMA))
      if tail:
        xo_gmem, wo_gmem, xos_gmem, wos_gmem = refs[4:8]
        xo_smem, wo_smem, xos_smem, wos_smem, arrived = tail_smem
        copies = ((xo_gmem.at[:, tokens] if interpret else xo_gmem.at[tokens],
                   xo_smem.at[wg]),
                  (wo_gmem.at[wg_cols], wo_smem.at[wg]),
                  (xos_gmem.at[:, tokens], xos_smem.at[wg]),
                  (wos_gmem.at[:, wg_cols], wos_smem.at[wg]))
        for src, dst in copies:
          plgpu.copy_gmem_to_smem(src, dst, arrived.at[wg])
        plgpu.barrier_wait(arrived.at[wg])
        total = total + _rescaled(interpret, product(wo_smem.at[wg], xo_smem.at[wg]),
                                  wos_smem.at[wg], xos_smem.at[wg])
      out = total.astype(out_dtype)
      if interpret:
        o_smem.at[wg][...] = out.T
      else:
        # A shuffle and a byte permute per register give the transposed layout, which
        # stores into the transposed view of the swizzled tile.
        plgpu.transpose_ref(o_smem.at[wg], (1, 0))[...] = plgpu.layout_cast(
            out, plgpu.Layout.WGMMA_TRANSPOSED)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[tokens, wg_cols])
      plgpu.wait_smem_to_gmem(0)

    pipeline(step, compute_context)(
        x_gmem.at[:, tokens] if interpret else x_gmem.at[tokens], w_gmem.at[cols],
        xs_gmem.at[:, tokens], ws_gmem.at[:, cols])

  out_bytes = jnp.dtype(out_dtype).itemsize
  scratch = [plgpu.SMEM((W4A4_COMPUTE_WGS, bm, rows), out_dtype,
                        transforms=swizzled(rows * out_bytes, 8 * out_bytes))]
  if interpret:
    scratch.append(plgpu.SMEM((W4A4_COMPUTE_WGS, per_step, rows, g), jnp.int8))
  if tail:
    wgs = W4A4_COMPUTE_WGS
    scratch += [plgpu.SMEM((wgs, n_out, bm) if interpret else (wgs, bm, n_out), jnp.int8,
                           transforms=swizzled(n_out, 8)),
                plgpu.SMEM((wgs, rows, n_out), jnp.int8, transforms=swizzled(n_out, 8)),
                plgpu.SMEM((wgs, 1, bm), jnp.float32), plgpu.SMEM((wgs, 1, rows), jnp.float32),
                plgpu.Barrier(num_arrivals=4, num_barriers=wgs)]
  profile = {}
  if profile_dir:  # room for four phases per group, twice over (the pipeline may add its own)
    profile = dict(compiler_params=plgpu.CompilerParams(profile_space=8 * n_groups + 64,
                                                        profile_dir=profile_dir))
  out = plgpu.kernel(
      w4a4_register_weights_kernel,
      out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(mp // bm, n // bn),
      grid_names=("m", "n"),
      num_threads=W4A4_COMPUTE_WGS + 1,
      thread_name="wg",
      scratch_types=scratch,
      interpret=interpret,
      **profile,
  )(*operands)
  return out[:m]


# ---------------------------------------------------------------------------------------
# W8A8 (int8) and FP8 (e4m3): per-token x per-channel scaled products


@dataclasses.dataclass(frozen=True)
class MosaicScaledBlockSizes:
  """Tiling of the Mosaic GPU int8 / fp8 kernel: two compute warpgroups per program, each
  taking block_m / 2 of its tokens, and a third that only issues the TMA loads.

  Attributes:
    block_m: tokens per program, a multiple of 128 (two wgmma M of 64).
    block_n: output channels per program, a multiple of 64 (the output tile's TMA swizzle),
      at most 256 (wgmma's N).
    block_k: channels of K per pipeline step, a multiple of 128 (one 128-byte swizzle row
      of 8-bit codes).
    max_concurrent_steps: K steps in flight per program (the TMA ring depth).
    programs: that many programs loop over the output tiles (NUM_SMS: one per SM), so
      that a tile's epilogue overlaps the next tile's loads; None: one program per tile.
  """
  block_m: int = 256
  block_n: int = 128
  block_k: int = 128
  max_concurrent_steps: int = 3
  programs: int | None = NUM_SMS

  def __post_init__(self):
    if self.block_m <= 0 or self.block_m % (2 * WGMMA_ROWS):
      raise ValueError(f"block_m={self.block_m} must be a positive multiple of "
                       f"{2 * WGMMA_ROWS}")
    if not 0 < self.block_n <= 256 or self.block_n % 64:
      raise ValueError(f"block_n={self.block_n} must be a multiple of 64 in [64, 256]")
    if self.block_k <= 0 or self.block_k % 128:
      raise ValueError(f"block_k={self.block_k} must be a positive multiple of 128")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 1")
    if self.programs is not None and self.programs < 1:
      raise ValueError(f"programs={self.programs} must be >= 1 or None")

  @classmethod
  def get_default(cls, n: int, out_dtype=jnp.bfloat16) -> "MosaicScaledBlockSizes":
    """256 x 128 tiles, one program per SM: within 0-8% of the best of the tilings timed
    on an H200 (runs 15-16) for int8 and fp8 at M = 1024-4096 on the Llama-3-8B shapes
    (bf16 out). 64 output channels where N is not a multiple of 128, or for float32 out
    (whose [256, 128] staging tile would not fit beside the ring; not timed)."""
    narrow = n % 128 or jnp.dtype(out_dtype).itemsize > 2
    return cls(block_n=64 if narrow else 128)


def check_scaled(x, x_scales, w, w_scales, operand_dtype,
                 block_sizes: MosaicScaledBlockSizes) -> None:
  """Raises ValueError for bad inputs, NotImplementedError for shapes the kernel does not
  serve (N or K not whole tiles)."""
  reference.validate_scaled(x, x_scales, w, w_scales, operand_dtype)
  n, k = w.shape
  if n % block_sizes.block_n:
    raise NotImplementedError(f"mosaic_gpu scaled matmul: N={n} is not a multiple of "
                              f"block_n={block_sizes.block_n}")
  if k % block_sizes.block_k:
    raise NotImplementedError(f"mosaic_gpu scaled matmul: K={k} is not a multiple of "
                              f"block_k={block_sizes.block_k}")


@functools.partial(jax.jit, static_argnames=("operand_dtype", "out_dtype", "block_sizes",
                                             "interpret"))
def scaled_matmul(x: jax.Array, x_scales: jax.Array, w: jax.Array, w_scales: jax.Array, *,
                  operand_dtype=None, out_dtype=jnp.bfloat16,
                  block_sizes: MosaicScaledBlockSizes | None = None,
                  interpret=False) -> jax.Array:
  """x [M, K] x w [N, K] (both int8, or both float8_e4m3fn; `operand_dtype`, where
  given, is the one required, else x's) -> [M, N] out_dtype, the int32 (int8) or float32
  (fp8) product rescaled by x_scales [M, 1] x w_scales [N, 1].

  Each program owns a [block_m, block_n] output tile at a time. A memory warpgroup streams
  K through a TMA ring; two compute warpgroups each issue wgmma on their half of the tokens
  into register accumulators that live across the whole of K (no per-step rescale: the
  scales are per token and per channel), so the tensor cores see back-to-back MMAs while
  one warpgroup waits. The rescale and the cast are the epilogue. On an H200 (runs 15-16)
  int8 runs at 1.9-2.35x XLA bf16 at M = 2048-4096 (66-72% of the int8 peak on the large
  shapes), fp8 at 1.01-1.24x XLA's own fp8 dot; tokens are padded to block_m, which costs
  more than it gains below ~1024 of them.
  """
  interpret = _interpret_mode(interpret)
  require_hopper(interpret)
  operand_dtype = jnp.dtype(operand_dtype or x.dtype)
  if operand_dtype not in (jnp.int8, jnp.float8_e4m3fn):
    raise ValueError(f"x.dtype={operand_dtype.name} must be int8 or float8_e4m3fn")
  bs = block_sizes or MosaicScaledBlockSizes.get_default(w.shape[0], out_dtype)
  check_scaled(x, x_scales, w, w_scales, operand_dtype, bs)
  acc_dtype = jnp.int32 if operand_dtype == jnp.int8 else jnp.float32
  m, k = x.shape
  n = w.shape[0]
  bm, bn, bk = bs.block_m, bs.block_n, bs.block_k
  half_m = bm // 2                                         # tokens per compute warpgroup
  out_bytes = jnp.dtype(out_dtype).itemsize
  mp = -(-m // bm) * bm
  pad = lambda a: jnp.pad(a, ((0, mp - m), (0, 0)))        # zero tokens add nothing
  # The interpreter's wgmma reads no transposed smem view: it gets the weights as [K, N].
  w_operand = w.T if interpret else w
  swizzled = functools.partial(_smem_transforms, interpret)

  m_tiles, n_tiles = mp // bm, n // bn
  programs = min(bs.programs or m_tiles * n_tiles, m_tiles * n_tiles)

  def pipeline(step, compute_context):
    w_spec = (plgpu.BlockSpec((bk, bn), lambda i: (i, 0)) if interpret else
              plgpu.BlockSpec((bn, bk), lambda i: (0, i), transforms=swizzled(bk, 8)))
    return plgpu.emit_pipeline_warp_specialized(
        step,
        grid=(k // bk,),
        memory_registers=40,
        in_specs=[plgpu.BlockSpec((bm, bk), lambda i: (0, i), transforms=swizzled(bk, 8)),
                  w_spec],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=bs.max_concurrent_steps,
        compute_context=compute_context,
    )

  def scaled_mosaic_kernel(x_gmem, w_gmem, xs_gmem, ws_gmem, o_gmem,
                           xs_smem, ws_smem, scales_arrived, o_smem):
    wg = lax.axis_index("wg")
    unused = lambda *args, **kwargs: None  # the allocations depend on the specs only
    pipeline_allocs = pipeline(unused, unused).get_allocations(x_gmem, w_gmem)

    @functools.partial(pl.run_scoped, allocs=pipeline_allocs, collective_axes="wg")
    def _tiles(allocs):
      # Tile t goes to program t mod programs; the token tiles vary fastest, so programs
      # running together share a weight tile through L2.
      @plgpu.nd_loop((n_tiles, m_tiles), collective_axes="program")
      def _tile(loop_info):
        n_idx, m_idx = loop_info.index
        first_token = m_idx * bm
        cols = pl.ds(n_idx * bn, bn)
        wg_tokens = pl.ds(first_token + wg * half_m, half_m)

        def compute_context(run_pipeline):
          # Each compute warpgroup fetches its scales while its MMAs run.
          plgpu.copy_gmem_to_smem(xs_gmem.at[:, wg_tokens], xs_smem.at[wg],
                                  scales_arrived.at[wg])
          plgpu.copy_gmem_to_smem(ws_gmem.at[:, cols], ws_smem.at[wg], scales_arrived.at[wg])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((half_m, bn), acc_dtype))
          def _epilogue(acc_ref):
            run_pipeline(acc_ref)
            plgpu.barrier_wait(scales_arrived.at[wg])
            out = _rescaled(interpret, acc_ref[...], xs_smem.at[wg], ws_smem.at[wg])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's store
            o_smem.at[wg][...] = out.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[wg_tokens, cols])

        def step(_, x_smem, w_smem, acc_ref):
          w_t = w_smem if interpret else plgpu.transpose_ref(w_smem, (1, 0))   # [bk, bn]
          plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * half_m, half_m)], w_t)
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(step, compute_context)(
            x_gmem.at[pl.ds(first_token, bm)],
            w_gmem.at[:, cols] if interpret else w_gmem.at[cols],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0)

  out = plgpu.kernel(
      scaled_mosaic_kernel,
      out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(programs,),
      grid_names=("program",),
      num_threads=3,
      thread_name="wg",
      scratch_types=[
          plgpu.SMEM((2, 1, half_m), jnp.float32),
          plgpu.SMEM((2, 1, bn), jnp.float32),
          plgpu.Barrier(num_arrivals=2, num_barriers=2),
          plgpu.SMEM((2, half_m, bn), out_dtype,
                     transforms=swizzled(bn * out_bytes, 8 * out_bytes)),
      ],
      interpret=interpret,
  )(pad(x), w_operand, pad(x_scales).T, w_scales.T)
  return out[:m]


def int8_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, *, out_dtype=jnp.bfloat16,
                block_sizes: MosaicScaledBlockSizes | None = None, interpret=False):
  """W8A8 (see `reference.int8_matmul`) through `scaled_matmul`."""
  return scaled_matmul(x_codes, x_scales, w_codes, w_scales, operand_dtype=jnp.int8,
                       out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret)


def fp8_matmul(x: jax.Array, x_scales: jax.Array, w: jax.Array, w_scales: jax.Array, *,
               out_dtype=jnp.bfloat16, block_sizes: MosaicScaledBlockSizes | None = None,
               interpret=False):
  """FP8 e4m3 W8A8 (see `reference.fp8_matmul`) through `scaled_matmul`."""
  return scaled_matmul(x, x_scales, w, w_scales, operand_dtype=jnp.float8_e4m3fn,
                       out_dtype=out_dtype, block_sizes=block_sizes, interpret=interpret)
