"""Block sizes for the quantized matmul kernels: frozen dataclasses and their default rules.

Terminology: *group* = the `group_size` input channels that share one scale; *block* =
the tile of the output (block_m x block_n) or of the contraction (block_k) that one
program instance works on. Quantized tiles are budgeted by their unpacked size.

Layers (STYLE.md 5): a tuned table keyed by (op, card, bucketed shape) would come first;
today the default rule below is the only layer. Its numbers come from the Hopper
constraints noted on each line and from the sweep in `bench/quantized_matmul.py`
(results in bench/results/quantized_matmul.md).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.triton_params import is_pow2

# Triton's tensor-core dot needs every tile dimension >= 16 (mma.m16n8k16), and Pallas'
# Triton lowering needs every block dimension to be a power of two.
MIN_DOT_DIM = 16
# An H100/H200 has 132 SMs; a memory-bound launch wants a few programs on each.
NUM_SMS = 132


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of one Pallas-Triton (GPU) quantized matmul.

  Attributes:
    block_m: rows of x (tokens) per program; a power of two >= 16.
    block_n: output channels per program; a power of two >= 16.
    block_k: contraction channels per step for int8 / fp8 operands (a power of two >=
      16); the group-wise kernels step one quantization group at a time instead.
    split_k: programs that share one output tile along K (their float32 partials are
      summed with atomics); 1 disables it. Must divide the number of groups.
    group_m: programs along M that run next to each other over one column of weight
      tiles, so the weight tile is read from L2 rather than HBM (Triton's "grouped
      ordering"); 1 is plain row-major order.
    num_warps: warps per program (Triton).
    num_stages: software-pipelining depth of the K loop (Triton).
    code_word: 8 or 16: the width in bits of the loads of packed 4-bit codes. 16 reads
      two bytes (four codes) per element and unpacks them with shifts on 16-bit words,
      fewer instructions per code than byte loads; it needs group_size >= 64.
    join_halves: with byte loads, interleave a group's two nibble halves (in x and in
      the codes alike) into one K=group_size dot instead of two K=group_size/2 dots.
    weights_lhs: the tensor-core kernel takes the unpacked weight tile as the dot's left
      operand ([block_n, K] x [K, block_m]), so that on Hopper it can stay in registers
      (wgmma reads only its right operand from shared memory) instead of being written
      back to shared memory after the unpack.
    cuda_cores: the decode GEMV instead of the tensor-core kernel (4-bit codes only):
      one program multiplies all M rows of x by a block_n x (K / split_k) weight tile on
      the CUDA cores in float32, reading the codes as 32-bit words; block_m, block_k,
      group_m, code_word and join_halves do not apply, and block_n may be any power of
      two.
    groups_per_step: quantization groups per K step of the decode GEMV (a power of two
      that divides the groups of one split); the tile of one step is block_n x
      groups_per_step x group_size / 8 words.
  """

  block_m: int = 16
  block_n: int = 64
  block_k: int = 128
  split_k: int = 1
  group_m: int = 8
  num_warps: int = 4
  num_stages: int = 3
  code_word: int = 8
  join_halves: bool = False
  weights_lhs: bool = False
  cuda_cores: bool = False
  groups_per_step: int = 1

  def validate(self) -> None:
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      least = 1 if self.cuda_cores and name == "block_n" else MIN_DOT_DIM
      if not is_pow2(v) or v < least:
        raise ValueError(f"{name}={v} must be a power of two >= {least}")
    if not is_pow2(self.groups_per_step):
      raise ValueError(f"groups_per_step={self.groups_per_step} must be a power of two")
    if self.code_word not in (8, 16):
      raise ValueError(f"code_word={self.code_word} must be 8 or 16")
    if self.split_k < 1 or self.group_m < 1:
      raise ValueError(f"split_k={self.split_k} and group_m={self.group_m} must be >= 1")

  @classmethod
  def get_default(cls, op: str, m: int, n: int, k: int, *, group_size: int = 128,
                  bits: int = 4) -> "BlockSizes":
    """The default rule. `op` is "weight_only", "int8", "fp8" or "w4a4"."""
    if op == "weight_only":
      return _weight_only_default(m, n, k, group_size, bits)
    return _mma_default(op, m, n, k)


def _largest_divisor_at_most(x: int, cap: int) -> int:
  for d in range(min(x, cap), 0, -1):
    if x % d == 0:
      return d
  return 1


def _weight_only_default(m: int, n: int, k: int, g: int, bits: int) -> BlockSizes:
  del bits  # The same tiling serves 4- and 8-bit codes.
  n_groups = k // g
  if m <= 16:
    # Decode: memory-bound. 64-wide tiles, 3 stages and split-K to ~8 programs per SM.
    # Measured on an H200 (bench/results/quantized_matmul.md): within noise of the best
    # of 16 tilings on every shape; 16-wide tiles were 3x slower and neither more
    # programs nor fewer warps helped. Runs 5-6 there timed the decode alternatives
    # (weights_lhs, the cuda_cores GEMV, one launch without split-K) at M = 1, 4, 16 on
    # four shapes: none beat this tiling beyond noise, so it stays the default.
    tiles = -(-n // 64)
    split = _largest_divisor_at_most(n_groups, max(1, (8 * NUM_SMS) // tiles))
    return BlockSizes(block_m=16, block_n=64, split_k=split, group_m=1, num_warps=4,
                      num_stages=3)
  if m <= 64:
    block_m = max(16, next_pow2(m))
    tiles = -(-n // 64)
    split = _largest_divisor_at_most(n_groups, max(1, (2 * NUM_SMS) // tiles))
    return BlockSizes(block_m=block_m, block_n=64, split_k=split, group_m=1,
                      num_warps=4, num_stages=4)
  # Larger M: 64 x 128 tiles with 4 warps; 128 x 128 with 8 warps spills registers (two
  # fp32 accumulators: the running sum and the group's partial), seen in ptxas -v. The
  # dispatcher sends M > 256 to XLA's dequantize-then-dot, which is faster there.
  return BlockSizes(block_m=64, block_n=128, split_k=1, group_m=8, num_warps=4,
                    num_stages=4)


def _mma_default(op: str, m: int, n: int, k: int) -> BlockSizes:
  if m <= 16 and op == "int8" and k % 128 == 0:
    # Decode: memory-bound, and N / 64 tiles alone leave most SMs idle on 4096-wide
    # layers (64 programs for 132 SMs): split K to ~8 programs per SM, as W4A16 does.
    # Measured on an H200 (quantized_matmul.md, run 9): 1.13-1.75x the unsplit kernel at
    # M = 4 and 16 and on the 14336-deep layer at M = 1, 0.86-0.91x on the 4096-deep ones
    # at M = 1. FP8 was slower split (0.86-0.99x) and stays unsplit.
    tiles = -(-n // 64)
    split = _largest_divisor_at_most(k // 128, max(1, (8 * NUM_SMS) // tiles))
    return BlockSizes(block_m=16, block_n=64, block_k=128, split_k=split, group_m=1,
                      num_warps=4, num_stages=4)
  if m <= 64:  # any K: the K loop masks a ragged end
    return BlockSizes(block_m=max(16, next_pow2(m)), block_n=64, block_k=128,
                      group_m=1, num_warps=4, num_stages=4)
  if m <= 256:
    return BlockSizes(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=4,
                      num_stages=4)
  # Large M: 128 x 128 output tiles, 128-deep K steps, 8 warps (two warpgroups of wgmma),
  # 3 stages of 32 KiB shared memory. 128 x 256 spills registers under Triton 3.6.
  return BlockSizes(block_m=128, block_n=128, block_k=128, group_m=8, num_warps=8,
                    num_stages=3)


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  """Tiling of one Pallas-Mosaic (TPU) quantized matmul.

  Attributes:
    block_m: rows of x per grid step; a multiple of 8 (the sublane count), or all of M.
    block_n: output channels per grid step; a multiple of 128 (the lane count).
    block_k: contraction channels per grid step; a multiple of the group size whose
      packed width (block_k / 2 for 4-bit codes) is a multiple of 128 lanes, or all of K.
  """

  block_m: int = 128
  block_n: int = 256
  block_k: int = 512

  @classmethod
  def get_default(cls, m: int, n: int, k: int, *, group_size: int = 128,
                  bits: int = 4) -> "TpuBlockSizes":
    block_m = min(256, -(-m // 8) * 8)
    block_n = min(256, -(-n // 128) * 128)
    # The K block must divide K exactly (never pad the contraction: padding there would
    # be read into every result) and keep the packed codes lane-aligned.
    lane_unit = 256 if bits == 4 else 128  # input channels per 128 packed lanes
    unit = max(lane_unit, group_size)
    unit = unit if unit % group_size == 0 else unit * group_size
    block_k = k
    for cand in (2048, 1024, 512, 256, 128):
      if cand % unit == 0 and k % cand == 0:
        block_k = cand
        break
    return cls(block_m=block_m, block_n=block_n, block_k=block_k)
