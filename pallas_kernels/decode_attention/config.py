"""Block sizes and the split heuristic for the paged decode attention kernels.

Terminology: *page* = `page_size` consecutive tokens of one sequence, the unit of the page
table; *block* = `pages_per_block` pages (block_t = pages_per_block * page_size tokens)
that one loop step of a program loads, scores and folds into its running softmax;
*split* = a contiguous range of a sequence's pages handled by one program
(flash-decoding), whose partial (out, max, sum) a jnp step merges by log-sum-exp.

Layers (STYLE.md 5): no tuned table yet; the default rule below is the only layer. It
fills the GPU: a single long sequence has only K programs per (batch, kv head) pair, far
fewer than the 132 SMs of an H100/H200, so the sequence is split until B * K * splits
reaches PROGRAMS_PER_SM programs per SM (or every split is a single block).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.triton_params import is_pow2

# Triton's tensor-core dot needs every tile dimension >= 16 (mma.m16n8k16): the G query
# heads of a kv head are padded to this many rows.
MIN_DOT_DIM = 16
# An H100/H200 has 132 SMs.
NUM_SMS = 132
# Decode is memory-bound: a few programs per SM keep enough loads in flight to hide
# latency (the quantized matmul's decode sweep found ~8 per SM best; attention programs
# are larger, each streams block_t x H keys and values per step).
PROGRAMS_PER_SM = 4


def next_pow2(x: int) -> int:
  return 1 << max(0, (int(x) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the Pallas-Triton (GPU) paged decode attention.

  Attributes:
    pages_per_block: pages loaded per loop step; pages_per_block * page_size (block_t)
      must be a power of two >= 16 (a Triton block dimension and a dot dimension).
    num_splits: programs per (sequence, kv head) along the sequence; None: the default
      rule (fill the GPU). Clamped to the number of blocks of the page table.
    num_warps: warps per program (Triton).
    num_stages: software-pipelining depth of the page loop (Triton).
  """

  pages_per_block: int = 8
  num_splits: int | None = None
  num_warps: int = 4
  num_stages: int = 2

  def validate(self, page_size: int) -> None:
    bt = self.pages_per_block * page_size
    if self.pages_per_block < 1 or not is_pow2(bt) or bt < MIN_DOT_DIM:
      raise ValueError(f"pages_per_block={self.pages_per_block} x page_size={page_size} "
                       f"= {bt} tokens per block must be a power of two >= {MIN_DOT_DIM}")
    if self.num_splits is not None and self.num_splits < 1:
      raise ValueError(f"num_splits={self.num_splits} must be >= 1")

  @classmethod
  def get_default(cls, batch: int, kv_heads: int, pages_per_seq: int,
                  page_size: int, head_dim: int, *, rope: bool = False,
                  channel_keys: bool = False) -> "BlockSizes":
    """The default rule: 128-token blocks, 4 warps (8 with RoPE or per-channel keys),
    splits to fill; per-channel keys with RoPE: 64-token blocks.

    From the offline sm_90 compile (pallas_kernels/triton_offline.py, Triton 3.6, head
    dim 128, GQA 4/1): without RoPE 168-190 registers, no spills, at 4 warps. With RoPE
    the float32 [block_t, H/2] key halves, cos and sin are live together: 4 warps spill
    (636 B for int8, 388 B for int4); 8 warps: 221-248 registers, no spills.
    Per-channel int4 keys (key_group 32, GQA 32/8, page 32 or 64) dequantize the key
    block in float32 next to its broadcast grids: 4 warps 255 registers and 24-32 B of
    spills, 8 warps 147 registers, none. With RoPE too, 8 warps spill 232 B at 128-token
    blocks and none at 64 (255 registers; 235 since the RoPE path scores one
    rotate-half pair of column parts at a time).
    2-bit codes (four column parts of H/4) take the same rule: per token 166-168
    registers at 4 warps, 242 with RoPE at 8; per-channel keys (key_group 32, page 32 or
    64) 174-183 at 8 warps, 226-237 with RoPE at 64-token blocks; no spills (40-44 B with
    RoPE before the pairwise scoring).
    """
    del batch, kv_heads, pages_per_seq, head_dim  # One tiling serves them all today.
    block_t = 64 if rope and channel_keys else 128
    ppb = max(1, block_t // page_size)
    return cls(pages_per_block=ppb, num_splits=None,
               num_warps=8 if rope or channel_keys else 4, num_stages=2)


def split_layout(batch: int, kv_heads: int, pages_per_seq: int,
                 bs: BlockSizes) -> tuple[int, int]:
  """(num_splits, pages_per_split): pages_per_split is a multiple of pages_per_block and
  num_splits * pages_per_split >= pages_per_seq (the table is padded to that)."""
  ppb = bs.pages_per_block
  blocks = max(1, -(-pages_per_seq // ppb))
  if bs.num_splits is None:
    want = -(-(PROGRAMS_PER_SM * NUM_SMS) // max(1, batch * kv_heads))
  else:
    want = bs.num_splits
  splits = max(1, min(want, blocks))
  blocks_per_split = -(-blocks // splits)
  splits = -(-blocks // blocks_per_split)
  return splits, blocks_per_split * ppb


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  """Tiling of the Pallas-Mosaic (TPU) paged decode attention.

  Attributes:
    pages_per_block: pages DMA'd to VMEM per loop step (one grid step per sequence and
      kv head walks all of its blocks).
  """

  pages_per_block: int = 8

  @classmethod
  def get_default(cls, page_size: int) -> "TpuBlockSizes":
    return cls(pages_per_block=max(1, 128 // page_size))
