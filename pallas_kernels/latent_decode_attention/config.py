"""Block sizes for the latent decode attention kernels.

Terminology: *tile* = `block_t` consecutive cache slots that one loop step of a program
loads, rebuilds keys for, scores and folds into its running softmax; *split* = a
contiguous range of tiles of one sequence handled by one GPU program (flash-decoding),
merged by log-sum-exp afterwards.

Layers (STYLE.md 5): no tuned table yet; the default rule is the only layer. Splits follow
decode_attention.config.split_layout (a slot is a page of one token), which fills the
132 SMs of an H100 / H200 even for a single sequence (B * G = 2 programs without splits
at the Llama-3-8B Palu shape).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.decode_attention import config as paged_config
from pallas_kernels.decode_attention.config import MIN_DOT_DIM
from pallas_kernels.triton_params import check_launch, is_pow2


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiling of the Pallas-Triton (GPU) latent decode attention.

  Attributes:
    block_t: slots per loop step; a power of two >= 16 (the M dimension of the key
      rebuild dot [block_t, Rk] x [Rk, H/2]).
    num_splits: programs per (sequence, group) along the sequence; None: the default
      rule (fill the GPU). Clamped to the number of tiles.
    num_warps: warps per program (Triton).
    num_stages: software-pipelining depth of the tile loop (Triton).
  """

  block_t: int = 128
  num_splits: int | None = None
  num_warps: int = 8
  num_stages: int = 2

  def __post_init__(self):
    if not is_pow2(self.block_t) or self.block_t < MIN_DOT_DIM:
      raise ValueError(f"block_t={self.block_t} must be a power of two >= {MIN_DOT_DIM}")
    if self.num_splits is not None and self.num_splits < 1:
      raise ValueError(f"num_splits={self.num_splits} must be >= 1")
    check_launch(self.num_warps, self.num_stages)

  @classmethod
  def get_default(cls) -> "BlockSizes":
    """128-slot tiles, 8 warps, 2 stages: the fastest of a sweep on an H200 (jax 0.11.2,
    Llama-3-8B Palu gh=4, Rk = Rv = 256; bench/latent_decode.py --sweep). At (B=16, 16k)
    in us, bf16 / 4-bit latents: T=128 8 warps 728 / 850; T=64 4 warps 912 / 1186;
    T=32 4 warps 897 / 1339; T=64 8 warps 1189 / 1559; T=128 4 warps 1309 / 1815;
    T=128 8 warps 1 stage 755 / 990; T=64 4 warps 1 stage (two programs per SM) 811 /
    1327; T=256 1 stage 1135 / 1714; 3 stages or T=256 with 2 stages exceed shared
    memory for bf16 latents. Larger tiles amortize the per-tile re-read of k_up (gpu.py)
    until their registers spill."""
    return cls()

  def split_layout(self, batch: int, groups: int, slots: int) -> tuple[int, int]:
    """(num_splits, slots_per_split): slots_per_split is a multiple of block_t and
    num_splits * slots_per_split >= slots."""
    per_token = paged_config.BlockSizes(pages_per_block=self.block_t,
                                        num_splits=self.num_splits)
    return paged_config.split_layout(batch, groups, slots, per_token)


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
  """Tiling of the Pallas-Mosaic (TPU) latent decode attention.

  Attributes:
    block_t: slots per grid step (a multiple of 8, the sublane tiling of f32; 16 for bf16
      latents, 32 for packed codes on a real TPU).
  """

  block_t: int = 128

  def __post_init__(self):
    if self.block_t < 8 or self.block_t % 8:
      raise ValueError(f"block_t={self.block_t} must be a positive multiple of 8")

  @classmethod
  def get_default(cls) -> "TpuBlockSizes":
    return cls()
