"""Block sizes for the activation quantizer kernels.

Terminology: *group* = the `group_size` channels that share one scale; *chunk* = the
columns one loop step of a GPU program loads (`block_k`, a power of two); *row block* =
the `block_m` tokens one program (GPU) or grid step (TPU) quantizes.

Layers (STYLE.md 5): no tuned table yet; the default rule below is the only layer (the
op is memory-bound: it reads x once, writes a half or a quarter of it).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.triton_params import check_launch, is_pow2

# An H100/H200 has 132 SMs; a memory-bound launch wants at least two programs on each.
NUM_SMS = 132
# The most float32 values one program holds per loaded part ([block_m, block_k]): 64 per
# thread at 4 warps, within the register budget in the offline sm_90 compile.
MAX_TILE = 8192


def _pow2_at_most(x: int) -> int:
  return 1 << (max(1, int(x)).bit_length() - 1)


def _next_pow2(x: int) -> int:
  return 1 << (max(1, int(x)) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the Pallas-Triton (GPU) activation quantizer.

  Attributes:
    block_m: tokens per program; a power of two (Triton block shapes are).
    block_k: the widest chunk of columns loaded per loop step; a power of two >= 16. A
      group (or half group, for 4-bit codes) no wider than this is loaded in one step
      and quantized in one pass; wider ones (one group per token) take two passes over
      their chunks (max, then quantize), the second mostly from L2.
    groups_per_step: groups of each token quantized side by side in one loop step (a
      power of two): the tile holds block_m x groups_per_step (token, group) rows, so
      narrow groups still make wide loads. Groups past the last are masked.
    num_warps: warps per program (Triton).
    num_stages: software-pipelining depth of the chunk loops (Triton).
  """

  block_m: int = 8
  block_k: int = 1024
  groups_per_step: int = 1
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    if not is_pow2(self.block_m):
      raise ValueError(f"block_m={self.block_m} must be a power of two")
    if not is_pow2(self.block_k) or self.block_k < 16:
      raise ValueError(f"block_k={self.block_k} must be a power of two >= 16")
    if not is_pow2(self.groups_per_step):
      raise ValueError(f"groups_per_step={self.groups_per_step} must be a power of two")
    check_launch(self.num_warps, self.num_stages)

  @classmethod
  def get_default(cls, m: int, k_main: int, group_size: int, bits: int) -> "BlockSizes":
    """Up to 8 tokens per program, fewer while that leaves under 2 programs per SM (so
    M = 256 runs 256 one-token programs and M = 4096 runs 512 of 8); chunks of up to
    MAX_TILE / block_m columns (at least 1024), so that a one-token program quantizes a
    4096-wide row in one pass; as many groups per step as keep a loaded part within
    MAX_TILE / 2 values (Atom's 31 groups of 128 at M = 1: all in one step)."""
    block_m = min(8, _pow2_at_most(m // (2 * NUM_SMS)))
    block_k = min(_next_pow2(k_main), max(1024, MAX_TILE // block_m))
    part = min(block_k, _next_pow2(group_size // 2 if bits == 4 else group_size))
    groups = min(_next_pow2(k_main // group_size),
                 _pow2_at_most(max(1, MAX_TILE // 2 // (block_m * part))))
    return cls(block_m=block_m, block_k=block_k, groups_per_step=groups)


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  """Tiling of the Pallas-Mosaic (TPU) activation quantizer.

  Attributes:
    block_m: tokens per grid step: a multiple of 8 (the sublane count), or all of M.
  """

  block_m: int = 32

  def __post_init__(self):
    if self.block_m < 1:
      raise ValueError(f"block_m={self.block_m} must be positive")

  @classmethod
  def get_default(cls, m: int, k: int) -> "TpuBlockSizes":
    """All of M when it is small; else 32 rows, 8 when a row block of float32 [rows, K]
    would pass 2 MiB of VMEM (K > 16384)."""
    rows = 32 if k <= 16384 else 8
    return cls(block_m=m if m <= rows else rows)
