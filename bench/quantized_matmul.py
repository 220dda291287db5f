"""Quantized matmul kernels on the GPU: correctness against the reference, then speed.

In one process on one GPU (METHOD.md):
  1. ceilings: HBM bandwidth (device copy) and the bf16 matmul rate at 8192^3, measured;
  2. correctness of every Pallas-GPU kernel against `reference.py` on fresh random inputs,
     shapes that are not multiples of the blocks included (rel. error, NaN check);
  3. speed, baseline and candidate timed the same way: each sample is one jitted call that
     runs the op over R rotating buffer sets (weights and activations together exceed L2
     several times), its time divided by R; median of many samples after warm-up:
       W4A16 g128 (symmetric) vs XLA bf16 dot with [N, K] weights, and vs XLA
         dequantize-then-dot; M in {1, 16, 64, 256, 1024, 4096}; a block-size sweep at
         M <= 16 and M >= 1024;
       W8A8 vs XLA bf16 dot, and vs XLA's own int8 dot (NT layout) with its rescale;
       FP8 (Pallas) vs XLA's own fp8 dot; Atom W4A4 (+128 int8 outliers) vs bf16.
  4. one DESIGN.md line per measurement in <out>/quantized_matmul.jsonl (the fraction of
     ceiling is roofline time / measured time, the roofline being the larger of bytes /
     bandwidth and FLOPs / rate, with int8 and fp8 at twice the measured bf16 rate).

Usage (GPU):  PYTHONUNBUFFERED=1 python3 -m bench.quantized_matmul --out $OUT
  --only check,w4a16,w8a8,fp8,w4a4   sections to run; --ms 1,16 to restrict M;
  --only check,mosaic,mosaic_w4a4    the Mosaic GPU kernels (W4A16 decode, Atom W4A4,
        ,mosaic_scaled               W8A8 and FP8 at M = 2048, 4096) beside the Triton
                                     ones, with their checks;
  --only check,decode                the decode path (M in 1, 4, 16; four shapes): its
                                     checks, then XLA bf16, the default tiling and the
                                     alternatives of runs 5-6, one process;
  --sweep occupancy                  the decode sweep of run 4 (more programs per SM);
  --shapes 14336x4096,...            N x K in place of every section's shapes;
  --mosaic-configs 1,5 --w4a4-configs 1,3    time only these Mosaic GPU tilings;
  --only check,mosaic_device         the W4A16 decode candidates as GPU kernel time per
                                     call from a profiler trace, with each op's kernels;
  --only check,mosaic_w4a4_decode    Atom W4A4 at M = 1, 4, 16 the same way: XLA bf16,
                                     Triton, the Mosaic default (the product on the
                                     W4A16 kernel) and `w4a4_decode_tilings`;
  --only profile, profile_mosaic     a few plain calls for Nsight Compute (run with
                                     XLA_PYTHON_CLIENT_PREALLOCATE=false under ncu).
CPU smoke test on tiny shapes (interpret mode):  python3 -m bench.quantized_matmul --tiny
Results and their reading: bench/results/quantized_matmul.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench import common
from pallas_kernels.quantized_matmul import gpu, mosaic_gpu, reference
from pallas_kernels.quantized_matmul.config import NUM_SMS, BlockSizes

BENCH = "quantized_matmul"
NT = (((1,), (1,)), ((), ()))
L2_BYTES = 50 << 20


# ---------------------------------------------------------------------------------------
# Inputs (random on the device, never zeros)


def _key(*ids):
  return jax.random.fold_in(jax.random.key(20261117), hash(ids) % (1 << 30))


def rand_x(m, k, i=0, dtype=jnp.bfloat16):
  return jax.random.normal(_key("x", m, k, i), (m, k), jnp.float32).astype(dtype)


def rand_w4(n, k, g, i=0, symmetric=True):
  kc, ks, kz = jax.random.split(_key("w4", n, k, g, i, symmetric), 3)
  lo, hi, dt = (-8, 8, jnp.int8) if symmetric else (0, 16, jnp.uint8)
  codes = reference.pack_4bit(jax.random.randint(kc, (n, k), lo, hi).astype(dt), g)
  scales = jax.random.uniform(ks, (n, k // g), jnp.float32, 0.002, 0.004)
  zeros = None if symmetric else jax.random.uniform(kz, (n, k // g), jnp.float32, 6, 9)
  return codes, scales, zeros


def rand_w8(n, k, g, i=0, symmetric=True):
  kc, ks, kz = jax.random.split(_key("w8", n, k, g, i, symmetric), 3)
  lo, hi, dt = (-127, 128, jnp.int8) if symmetric else (0, 256, jnp.uint8)
  codes = jax.random.randint(kc, (n, k), lo, hi).astype(dt)
  scales = jax.random.uniform(ks, (n, k // g), jnp.float32, 1e-4, 2e-4)
  zeros = None if symmetric else jax.random.uniform(kz, (n, k // g), jnp.float32, 120, 136)
  return codes, scales, zeros


def rand_i8(r, k, i=0, tag="a"):
  kc, ks = jax.random.split(_key("i8", tag, r, k, i))
  return (jax.random.randint(kc, (r, k), -127, 128).astype(jnp.int8),
          jax.random.uniform(ks, (r, 1), jnp.float32, 1e-3, 2e-3))


def rand_f8(r, k, i=0, tag="a"):
  kc, ks = jax.random.split(_key("f8", tag, r, k, i))
  return (jax.random.normal(kc, (r, k), jnp.float32).astype(jnp.float8_e4m3fn),
          jax.random.uniform(ks, (r, 1), jnp.float32, 1e-3, 2e-3))


def rand_w4a4(r, k_main, n_out, g, i=0, tag="a"):
  kc, ks, ko, kos = jax.random.split(_key("w4a4", tag, r, k_main, i), 4)
  codes = reference.pack_4bit(jax.random.randint(kc, (r, k_main), -8, 8).astype(jnp.int8), g)
  scales = jax.random.uniform(ks, (r, k_main // g), jnp.float32, 0.01, 0.02)
  out = jax.random.randint(ko, (r, n_out), -127, 128).astype(jnp.int8)
  out_s = jax.random.uniform(kos, (r, 1), jnp.float32, 1e-3, 2e-3)
  return codes, scales, out, out_s


def rel_err(out, ref):
  a = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  if not np.all(np.isfinite(a)):
    return float("inf")
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------
# Baselines written the way a user of XLA would


def xla_bf16(x, w):
  return lax.dot_general(x, w, NT, preferred_element_type=jnp.float32).astype(x.dtype)


def xla_dequant_dot(x, codes, scales, *, g):
  """XLA's "dequantize then dot" W4A16: unpack, scale in bf16, one bf16 GEMM."""
  n = codes.shape[0]
  c = reference.unpack_4bit(codes, g).reshape(n, -1, g).astype(jnp.bfloat16)
  w = (c * scales[..., None].astype(jnp.bfloat16)).reshape(n, -1)
  return xla_bf16(x, w)


# ---------------------------------------------------------------------------------------
# Timing: one jitted call runs the op over R buffer sets


# One jitted call runs the op over every buffer set; a sample dispatches INNER calls and
# blocks on the last. A first run here (H200, jax 0.11.2) with 2-16 sets per call and one
# call per sample showed ~150-200 us of host dispatch and sync per call, which made even
# XLA's bf16 GEMV look like 1 TB/s: the sets per call are now sized so that a call moves
# >= CALL_BYTES (also far more than L2), and several calls are queued per sample.
CALL_BYTES = 512 << 20
INNER = 8


def rotations(bytes_per_set, cap=64):
  return int(min(cap, max(2, math.ceil(CALL_BYTES / max(bytes_per_set, 1)))))


def time_op(op, sets, *, iters, warmup=2, r=None):
  """Median ms of one `op(*set)`, over the first `r` sets in `sets` (arg tuples)."""
  sets = sets[:r] if r else sets
  # The op jitted on its own is lowered once for all sets (a Mosaic GPU kernel is lowered
  # anew at every call site otherwise: ~0.25 s each).
  op = jax.jit(op)
  fn = jax.jit(lambda all_sets: [op(*s) for s in all_sets])
  samples = common.time_calls(lambda: fn(sets), warmup=warmup, iters=iters, inner=INNER)
  r = len(sets)
  return common.median(samples) / r, common.spread(samples)


# ---------------------------------------------------------------------------------------
# The decode path (M <= 16): the default tiling and the alternatives of runs 5-6
# (bench/results/quantized_matmul.md)


def split_k_for(n_groups, tiles, per_sm):
  """The largest split_k dividing n_groups with tiles x split_k <= per_sm programs per SM."""
  target = max(1, per_sm * NUM_SMS // tiles)
  return max(d for d in range(1, n_groups + 1) if n_groups % d == 0 and d <= target)


def decode_label(bs):
  if bs.cuda_cores:
    return f"gemv[bn{bs.block_n} gs{bs.groups_per_step} w{bs.num_warps} sk{bs.split_k}]"
  lhs = " lhs" if bs.weights_lhs else ""
  return (f"mma[bn{bs.block_n}{lhs} cw{bs.code_word} w{bs.num_warps} s{bs.num_stages} "
          f"sk{bs.split_k}]")


def decode_configs(m, n, k, g):
  """(label, BlockSizes): the default decode tiling ("pallas_gpu") and the alternatives
  of run 6: weights as the dot's left operand (tiles, stages, split-K, one launch, 16-bit
  code words) and, at M = 1, the CUDA-core GEMV (run 5 found it slower at M = 4)."""
  groups = k // g
  out = {"pallas_gpu": BlockSizes.get_default("weight_only", m, n, k, group_size=g, bits=4)}
  cands = []
  for bn, warps, stages, per_sm, cw in ((64, 4, 3, 8, 8), (64, 4, 4, 8, 8),
                                        (64, 4, 3, 16, 8), (128, 8, 3, 8, 8),
                                        (64, 4, 3, 1, 8), (64, 4, 3, 8, 16)):
    cands.append(BlockSizes(16, bn, split_k=split_k_for(groups, -(-n // bn), per_sm),
                            group_m=1, num_warps=warps, num_stages=stages, code_word=cw,
                            weights_lhs=True))
  if m == 1:
    cands.append(BlockSizes(block_n=256, num_warps=8, cuda_cores=True,
                            split_k=split_k_for(groups, -(-n // 256), 2)))
  for bs in cands:
    if bs not in out.values():
      out[decode_label(bs)] = bs
  return list(out.items())


def mosaic_label(bs):
  gps = f" gps{bs.groups_per_step}" if bs.groups_per_step > 1 else ""
  unpack = " regunpack" if bs.register_unpack else ""
  direct = " directs" if bs.direct_scales else ""
  return (f"mosaic[bn{bs.block_n} st{bs.max_concurrent_steps} sk{bs.split_k or 'auto'}"
          f"{gps}{unpack}{direct}]")


def mosaic_w4a4_label(bs):
  if bs.decode_tiling is not None:
    return f"mosaic[on the W4A16 kernel: {mosaic_label(bs.decode_tiling)[len('mosaic['):]}"
  x8 = " x8" if bs.x_int8 else ""
  rw = " rw" if bs.register_weights else ""
  gps = f" gps{bs.groups_per_step}" if bs.groups_per_step > 1 else ""
  return f"mosaic[bm{bs.block_m} bn{bs.block_n} st{bs.max_concurrent_steps}{gps}{x8}{rw}]"


_w4a4 = mosaic_gpu.MosaicW4A4BlockSizes
MOSAIC_W4A4_CONFIGS = (  # one warpgroup per tile: float32 + int32 accumulators
    _w4a4(block_m=64, block_n=128, max_concurrent_steps=2),
    # x unpacked by XLA: the kernel unpacks the weights only (run 17)
    _w4a4(block_m=128, block_n=64, max_concurrent_steps=2, x_int8=True),
    _w4a4(block_m=64, block_n=128, max_concurrent_steps=2, x_int8=True),
    # the weights unpacked in registers, two compute warpgroups, the product transposed
    _w4a4(block_m=128, block_n=128, max_concurrent_steps=2, register_weights=True),
    _w4a4(block_m=128, block_n=128, max_concurrent_steps=4, register_weights=True),
    _w4a4(block_m=64, block_n=128, max_concurrent_steps=4, register_weights=True),
    _w4a4(block_m=128, block_n=128, max_concurrent_steps=3, register_weights=True),
    _w4a4(block_m=128, block_n=128, max_concurrent_steps=5, register_weights=True),
    # two groups per step: the second group's wgmma runs while the first is rescaled
    _w4a4(block_m=128, block_n=128, max_concurrent_steps=2, groups_per_step=2,
          register_weights=True),
    _w4a4(block_m=64, block_n=128, max_concurrent_steps=3, groups_per_step=2,
          register_weights=True),
)

MOSAIC_W4A4_CHECKS = [  # m, n, k_main, n_out, block sizes
    (3, 256, 896, 128, MOSAIC_W4A4_CONFIGS[0]),
    (200, 320, 512, 64, _w4a4(block_m=64, block_n=64, max_concurrent_steps=4)),
    (1000, 4096, 3968, 128, MOSAIC_W4A4_CONFIGS[1]),
    (130, 256, 896, 64, MOSAIC_W4A4_CONFIGS[2]),
    (77, 512, 1792, 256, MOSAIC_W4A4_CONFIGS[1]),
    (3, 256, 896, 128, MOSAIC_W4A4_CONFIGS[3]),
    (1000, 4096, 3968, 128, MOSAIC_W4A4_CONFIGS[4]),
    (200, 384, 512, 64, MOSAIC_W4A4_CONFIGS[5]),
    (77, 512, 1792, 256, MOSAIC_W4A4_CONFIGS[6]),
    (300, 256, 512, 0, MOSAIC_W4A4_CONFIGS[3]),
    (1000, 2048, 3840, 128, MOSAIC_W4A4_CONFIGS[8]),
    (77, 512, 1792, 128, MOSAIC_W4A4_CONFIGS[9]),
    (200, 384, 512, 64, MOSAIC_W4A4_CONFIGS[7]),
    (300, 256, 512, 0, MOSAIC_W4A4_CONFIGS[8]),
    # a few tokens on the W4A16 kernel (decode_tiling), the int8 tail by XLA
    (1, 4096, 3968, 128, _w4a4(decode_tiling=mosaic_gpu.MosaicBlockSizes.get_default(
        4096, 3968))),
    (16, 14336, 3968, 128, _w4a4(decode_tiling=mosaic_gpu.MosaicBlockSizes(
        block_n=64, max_concurrent_steps=6, split_k=1, register_unpack=True))),
    (4, 512, 1792, 256, _w4a4(decode_tiling=mosaic_gpu.MosaicBlockSizes(
        block_n=64, max_concurrent_steps=4, split_k=7, register_unpack=True))),
    (13, 1024, 4096, 0, _w4a4(decode_tiling=mosaic_gpu.MosaicBlockSizes.get_default(
        1024, 4096))),
]


def w4a4_decode_tilings(n, k_main, g=128):
  """Alternatives to the default at a few tokens (`mosaic_gpu.w4a4_decode_tiling`): the W4A4
  kernels' 64-token tiles (the default before run 55), and on the W4A16 kernel its own
  default for K_main (one group per step, 3-deep ring, `default_split_k` where the
  128-channel tail leaves an odd group count) and a 6-deep ring without split-K."""
  default = mosaic_gpu.MosaicW4A4BlockSizes.get_default(n, 1, k_main // g, 0, g)
  tilings = [_w4a4(block_n=128, x_int8=True),
             _w4a4(decode_tiling=mosaic_gpu.MosaicBlockSizes.get_default(n, k_main, g)),
             _w4a4(decode_tiling=mosaic_gpu.MosaicBlockSizes(
                 block_n=64, max_concurrent_steps=6, split_k=1, register_unpack=True))]
  return [t for t in dict.fromkeys(tilings) if t != default]


def mosaic_scaled_label(bs):
  return (f"mosaic[bm{bs.block_m} bn{bs.block_n} bk{bs.block_k} "
          f"st{bs.max_concurrent_steps}{f' p{bs.programs}' if bs.programs else ''}]")


_scaled = mosaic_gpu.MosaicScaledBlockSizes
MOSAIC_SCALED_CONFIGS = (  # two compute warpgroups, each [block_m / 2, block_n]
    _scaled(block_m=256, block_n=128, max_concurrent_steps=3, programs=NUM_SMS),
    _scaled(block_m=128, block_n=256, max_concurrent_steps=3),
    _scaled(block_m=128, block_n=128, max_concurrent_steps=4, programs=NUM_SMS),
    _scaled(block_m=128, block_n=128, max_concurrent_steps=4),
)
# Timed in run 15 and dropped: the same tilings with and without `programs` (within
# 0-8% of the two above; quantized_matmul.md).

MOSAIC_SCALED_CHECKS = [  # op, m, n, k, block sizes
    ("int8", 1000, 4096, 4096, MOSAIC_SCALED_CONFIGS[0]),
    ("int8", 4096, 14336, 4096, MOSAIC_SCALED_CONFIGS[1]),
    ("int8", 77, 512, 1024, MOSAIC_SCALED_CONFIGS[2]),
    ("int8", 2000, 28672, 1024, MOSAIC_SCALED_CONFIGS[3]),
    ("fp8", 300, 1024, 2048, MOSAIC_SCALED_CONFIGS[0]),
    ("fp8", 2048, 4096, 14336, MOSAIC_SCALED_CONFIGS[1]),
    ("fp8", 33, 256, 512, MOSAIC_SCALED_CONFIGS[2]),
    ("fp8", 4096, 14336, 4096, MOSAIC_SCALED_CONFIGS[3]),
]
# Fewer buffer sets per call for these (compute-bound at M >= 2048, where 4 sets of the
# smallest case, 4096x4096 at M = 2048, already pass L2 three times over).
MOSAIC_SCALED_ROTATIONS = 4

# Buffer sets per timed call in the Mosaic sections: XLA compiles the kernel anew for each
# set's call (~1 s), so fewer than elsewhere (8 x 8.4 MB of 4096x4096 codes still pass the
# 50 MB L2).
MOSAIC_ROTATIONS = 8

MOSAIC_CONFIGS = (  # the layout-cast unpack of runs 10-18, then the register unpack
    mosaic_gpu.MosaicBlockSizes(block_n=128, max_concurrent_steps=4),
    mosaic_gpu.MosaicBlockSizes(block_n=128, max_concurrent_steps=4, register_unpack=True),
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=3, split_k=8,
                                register_unpack=True),
    # two groups per step, the second unpacked while the first one's wgmma runs
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=3, groups_per_step=2,
                                register_unpack=True),
    mosaic_gpu.MosaicBlockSizes(block_n=128, max_concurrent_steps=3, groups_per_step=2,
                                register_unpack=True),
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=2, groups_per_step=2,
                                split_k=8, register_unpack=True),
    # more, shorter programs (2 or 4 groups each)
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=2, split_k=16,
                                register_unpack=True),
    # [7]: [5] with the scales loaded from [N, G] by each thread (no XLA transpose)
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=2, groups_per_step=2,
                                split_k=8, register_unpack=True, direct_scales=True),
    # [8]-[11]: [5] with fewer, longer programs (run 51's timeline: a program of split-K 8
    # on 14336x4096 waits 44% of its life for its first data)
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=2, groups_per_step=2,
                                split_k=4, register_unpack=True),
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=2, groups_per_step=2,
                                split_k=2, register_unpack=True),
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=3, groups_per_step=2,
                                split_k=2, register_unpack=True),
    mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=4, groups_per_step=2,
                                split_k=1, register_unpack=True),
)


MOSAIC_CHECKS = [  # m, n, k, g, symmetric, block sizes
    (1, 4096, 4096, 128, True, mosaic_gpu.MosaicBlockSizes()),
    (4, 14336, 4096, 128, True, mosaic_gpu.MosaicBlockSizes(block_n=64, max_concurrent_steps=8)),
    (16, 1024, 2048, 64, True, mosaic_gpu.MosaicBlockSizes(block_n=256)),
    (13, 512, 1024, 64, True, mosaic_gpu.MosaicBlockSizes(split_k=4)),
    (7, 256, 1024, 256, True, mosaic_gpu.MosaicBlockSizes(block_n=64, split_k=2)),
    (64, 384, 2048, 128, True, mosaic_gpu.MosaicBlockSizes(max_concurrent_steps=8)),
    (16, 14336, 4096, 128, True, mosaic_gpu.MosaicBlockSizes()),
    (1, 4096, 14336, 128, True, mosaic_gpu.MosaicBlockSizes()),
    (16, 28672, 8192, 128, True, mosaic_gpu.MosaicBlockSizes(block_n=64)),
    (4, 14336, 4096, 128, True, mosaic_gpu.MosaicBlockSizes(block_n=64, groups_per_step=4)),
    (13, 512, 1024, 64, True, mosaic_gpu.MosaicBlockSizes(max_concurrent_steps=3,
                                                          groups_per_step=2)),
    (1, 14336, 4096, 128, True, MOSAIC_CONFIGS[1]),
    (16, 4096, 14336, 128, True, MOSAIC_CONFIGS[3]),
    (4, 28672, 8192, 128, True, MOSAIC_CONFIGS[4]),
    (16, 14336, 4096, 128, True, MOSAIC_CONFIGS[5]),
    (1, 28672, 8192, 128, True, MOSAIC_CONFIGS[6]),
    (13, 512, 1024, 64, True, mosaic_gpu.MosaicBlockSizes(split_k=4, register_unpack=True)),
    (64, 384, 2048, 256, True, mosaic_gpu.MosaicBlockSizes(groups_per_step=2,
                                                           register_unpack=True)),
    (1, 14336, 4096, 128, True, MOSAIC_CONFIGS[7]),
    (16, 4096, 14336, 128, True, MOSAIC_CONFIGS[7]),
    (13, 512, 1024, 64, True, mosaic_gpu.MosaicBlockSizes(split_k=4, direct_scales=True)),
]


DECODE_CHECKS = [  # m, n, k, g, symmetric, block sizes
    (1, 4096, 4096, 128, True, BlockSizes(block_n=128, split_k=2, cuda_cores=True)),
    (3, 1000, 1024, 64, False, BlockSizes(block_n=64, groups_per_step=2, cuda_cores=True)),
    (4, 257, 512, 32, True, BlockSizes(block_n=256, num_warps=8, cuda_cores=True)),
    (13, 1000, 1024, 128, True, BlockSizes(16, 64, split_k=2, weights_lhs=True)),
    (5, 257, 512, 32, False, BlockSizes(16, 128, weights_lhs=True)),
    (16, 333, 1024, 64, False, BlockSizes(16, 64, code_word=16, weights_lhs=True)),
]


# Relative error allowed against the reference: bf16 output rounding (2^-9) dominates; the
# float32 math is tighter.
CHECK_TOLERANCE = 5e-3


def _picked(configs, indices):
  """The configs at comma-separated `indices` ("1,5"), or all of them for None."""
  return configs if indices is None else tuple(configs[int(i)] for i in indices.split(","))


def _kernel_us(per_kernel_ms):
  """{kernel name: ms per call} -> {name: µs per call, 2 decimals}, longest first."""
  return {name: round(ms * 1e3, 2)
          for name, ms in sorted(per_kernel_ms.items(), key=lambda item: -item[1])}


class Bench:

  def __init__(self, args):
    self.args = args
    self.tiny = args.tiny
    self.interpret = args.tiny
    self.iters = 3 if args.tiny else args.iters
    os.makedirs(args.out, exist_ok=True)
    self.writer = common.ResultWriter(os.path.join(args.out, f"{BENCH}.jsonl"), BENCH,
                                      card="cpu-interpret" if args.tiny else None)
    self.summary = []
    self.failures = []
    self.mosaic_configs = _picked(MOSAIC_CONFIGS, args.mosaic_configs)
    self.w4a4_configs = _picked(MOSAIC_W4A4_CONFIGS, args.w4a4_configs)

  # -- ceilings
  def ceilings(self):
    if self.tiny:
      self.bw, self.rate = 1e11, 1e12
      return
    bw, mm = common.measure_ceilings(self.writer.card)
    self.bw, self.rate = bw["bytes_per_s"], mm["flops_per_s"]
    self.writer.add(case={"what": "hbm_copy", "bytes": bw["bytes_moved"]}, impl="xla_copy",
                    baseline_impl="xla_copy", median_ms=bw["median_ms"],
                    baseline_median_ms=bw["median_ms"], fraction_of_ceiling=None,
                    ceiling="measured HBM bandwidth", bytes_per_s=bw["bytes_per_s"])
    self.writer.add(case={"what": "bf16_matmul", "n": 8192}, impl="xla_bf16",
                    baseline_impl="xla_bf16", median_ms=mm["median_ms"],
                    baseline_median_ms=mm["median_ms"], fraction_of_ceiling=None,
                    ceiling="measured bf16 rate", flops_per_s=mm["flops_per_s"])

  def roofline(self, flops, nbytes, rate_mult=1.0):
    t_mem = nbytes / self.bw
    t_mma = flops / (self.rate * rate_mult)
    if t_mem >= t_mma:
      return t_mem * 1e3, f"HBM {self.bw / 1e12:.2f} TB/s (measured copy)"
    return t_mma * 1e3, (f"tensor cores {self.rate * rate_mult / 1e12:.0f} T/s "
                         f"({'measured bf16' if rate_mult == 1 else '2x measured bf16'})")

  def record(self, case, impl, base_impl, ms, base_ms, flops, nbytes, rate_mult=1.0,
             **extra):
    roof_ms, ceiling = self.roofline(flops, nbytes, rate_mult)
    row = self.writer.add(case=case, impl=impl, baseline_impl=base_impl, median_ms=ms,
                          baseline_median_ms=base_ms, fraction_of_ceiling=roof_ms / ms,
                          ceiling=ceiling, **extra)
    line = (f"{case.get('op'):6s} M={case['m']:5d} N={case['n']:6d} K={case['k']:6d} "
            f"{impl:40s} {ms * 1e3:9.1f} us  vs {base_impl:18s} {base_ms * 1e3:9.1f} us  "
            f"x{row['ratio_vs_baseline']:.2f}  ceil {row['fraction_of_ceiling']:.2f}")
    print(line, flush=True)
    self.summary.append(line)

  def guarded(self, label, fn):
    return common.guarded(label, fn, self.failures)

  # -- correctness
  def check(self, decode_only=False):
    """Every Pallas-GPU kernel against the reference; `decode_only`: the decode paths and
    the Mosaic GPU kernels."""
    ip = self.interpret
    rows = []
    tol = CHECK_TOLERANCE

    def add(name, out, ref):
      err = rel_err(out, ref)
      rows.append((name, err))
      ok = err <= tol
      print(f"check {name:48s} rel_err={err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
      if not ok:
        self.failures.append(f"check {name} rel_err={err:.2e}")

    for (m, n, k, g, sym, bs) in DECODE_CHECKS + MOSAIC_CHECKS:
      if self.tiny and m * n * k > 5e6:
        continue
      x = rand_x(m, k, 9)
      codes, scales, zeros = rand_w4(n, k, g, 9, sym)
      mosaic = isinstance(bs, mosaic_gpu.MosaicBlockSizes)
      kernel = mosaic_gpu if mosaic else gpu
      label = (f"w4a16 g{g} {'sym' if sym else 'asym'} "
               f"{mosaic_label(bs) if mosaic else decode_label(bs)} {m}x{n}x{k}")
      self.guarded(label, lambda: add(
          label, kernel.weight_only_matmul(x, codes, scales, zeros, bits=4, group_size=g,
                                           block_sizes=bs, interpret=ip),
          reference.weight_only_matmul(x, codes, scales, zeros, bits=4, group_size=g)))
    for (m, n, k_main, n_out, bs) in MOSAIC_W4A4_CHECKS:
      # The interpreter hangs at times on the register-weights kernel's tail (its tests).
      if self.tiny and (m * n * k_main > 5e6 or bs.register_weights and n_out):
        continue
      xa, wa = rand_w4a4(m, k_main, n_out, 128, 2), rand_w4a4(n, k_main, n_out, 128, 2, "w")
      args = (xa[0], xa[1], wa[0], wa[1], xa[2], xa[3], wa[2], wa[3])
      label = f"w4a4 {mosaic_w4a4_label(bs)} {m}x{n}x{k_main}+{n_out}"
      self.guarded(label, lambda: add(
          label, mosaic_gpu.w4a4_matmul(*args, block_sizes=bs, interpret=ip),
          reference.w4a4_matmul(*args)))
    for (op, m, n, k, bs) in MOSAIC_SCALED_CHECKS:
      if self.tiny and m * n * k > 5e6:
        continue
      rand = rand_i8 if op == "int8" else rand_f8
      (xq, xs), (wq, ws) = rand(m, k, 3), rand(n, k, 3, "w")
      label = f"{op} {mosaic_scaled_label(bs)} {m}x{n}x{k}"
      self.guarded(label, lambda: add(
          label, mosaic_gpu.scaled_matmul(xq, xs, wq, ws, block_sizes=bs, interpret=ip),
          (reference.int8_matmul if op == "int8" else reference.fp8_matmul)(xq, xs, wq, ws)))
    if decode_only:
      return rows
    for (m, n, k, g, sym, bits, cw) in [(1, 4096, 4096, 128, True, 4, 8),
                                        (13, 1000, 1024, 128, True, 4, 16),
                                        (70, 300, 512, 64, False, 4, 8),
                                        (5, 257, 512, 32, True, 4, 8),
                                        (300, 520, 1024, 128, False, 4, 16),
                                        (9, 333, 512, 64, True, 8, 8),
                                        (129, 200, 256, 128, False, 8, 8)]:
      if self.tiny and m * n * k > 5e6:
        continue
      x = rand_x(m, k, 7)
      codes, scales, zeros = (rand_w4 if bits == 4 else rand_w8)(n, k, g, 7, sym)
      bs = BlockSizes.get_default("weight_only", m, n, k, group_size=g, bits=bits)
      bs = BlockSizes(**{**bs.__dict__, "code_word": cw}) if bits == 4 and g >= 64 else bs
      label = f"w{bits}a16 g{g} {'sym' if sym else 'asym'} cw{bs.code_word} {m}x{n}x{k}"
      self.guarded(label, lambda: add(
          label, gpu.weight_only_matmul(x, codes, scales, zeros, bits=bits, group_size=g,
                                        block_sizes=bs, interpret=ip),
          reference.weight_only_matmul(x, codes, scales, zeros, bits=bits, group_size=g)))
    for (m, n, k) in [(1, 512, 1024), (77, 300, 1000), (300, 513, 2048)]:
      if self.tiny and m * n * k > 5e6:
        continue
      (xc, xs), (wc, ws) = rand_i8(m, k, 1), rand_i8(n, k, 1, "w")
      self.guarded(f"int8 {m}x{n}x{k}", lambda: add(
          f"int8 {m}x{n}x{k}", gpu.int8_matmul(xc, xs, wc, ws, interpret=ip),
          reference.int8_matmul(xc, xs, wc, ws)))
      (xf, xfs), (wf, wfs) = rand_f8(m, k, 1), rand_f8(n, k, 1, "w")
      self.guarded(f"fp8 {m}x{n}x{k}", lambda: add(
          f"fp8 {m}x{n}x{k}", gpu.fp8_matmul(xf, xfs, wf, wfs, interpret=ip),
          reference.fp8_matmul(xf, xfs, wf, wfs)))
    for (m, n, k_main, n_out) in [(3, 256, 896, 128), (200, 300, 512, 40)]:
      xa, wa = rand_w4a4(m, k_main, n_out, 128, 1), rand_w4a4(n, k_main, n_out, 128, 1, "w")
      args = (xa[0], xa[1], wa[0], wa[1], xa[2], xa[3], wa[2], wa[3])
      self.guarded(f"w4a4 {m}x{n}x{k_main}+{n_out}", lambda: add(
          f"w4a4 {m}x{n}x{k_main}+{n_out}", gpu.w4a4_matmul(*args, interpret=ip),
          reference.w4a4_matmul(*args)))
    return rows

  # -- speed
  def _w4a16_cases(self, shapes, ms, g=128):
    """Per (N x K, M): random W4A16 inputs and XLA bf16 timed and recorded as the baseline.
    Yields (case, flops, bytes of the W4A16 op, baseline ms, W4A16 arg sets)."""
    for (n, k) in shapes:
      bytes_w = n * k // 2 + n * (k // g) * 4
      wsets = [rand_w4(n, k, g, i) for i in range(rotations(bytes_w))]
      wb = [jax.random.normal(_key("wb", n, k, i), (n, k), jnp.bfloat16)
            for i in range(rotations(2 * n * k))]
      for m in ms:
        io = 2 * m * k + 2 * m * n
        r4, rb = min(len(wsets), rotations(bytes_w + io)), min(len(wb), rotations(2 * n * k + io))
        xs = [rand_x(m, k, i) for i in range(max(r4, rb))]
        case = {"op": "w4a16", "m": m, "n": n, "k": k, "group_size": g, "symmetric": True}
        flops = 2 * m * n * k
        base = self.guarded("bf16", lambda: time_op(
            xla_bf16, [(xs[i], wb[i]) for i in range(rb)], iters=self.iters))
        if base is None:
          continue
        self.record({**case, "op": "bf16"}, "xla_bf16", "xla_bf16", base[0], base[0], flops,
                    2 * n * k + io, spread=base[1])
        yield case, flops, bytes_w + io, base[0], [(xs[i], *wsets[i][:2]) for i in range(r4)]

  def w4a16(self, shapes, ms, configs=None, with_dequant=True):
    """W4A16 g128 against XLA bf16 (and XLA dequantize-then-dot); `configs(m, n, k, g)`
    gives the (label, BlockSizes) to time, by default `w4a16_configs`."""
    g = 128
    configs = configs or self.w4a16_configs
    for case, flops, nbytes, base_ms, sets in self._w4a16_cases(shapes, ms, g):
      deq = with_dequant and self.guarded("dequant", lambda: time_op(
          functools.partial(xla_dequant_dot, g=g), sets, iters=self.iters))
      if deq:
        self.record(case, "xla_dequant_dot", "xla_bf16", deq[0], base_ms, flops, nbytes)
      m, n, k = case["m"], case["n"], case["k"]
      for label, bs in configs(m, n, k, g):
        op = functools.partial(gpu.weight_only_matmul, bits=4, group_size=g, block_sizes=bs,
                               interpret=self.interpret)
        res = self.guarded(f"w4a16 {label} M={m} {n}x{k}",
                           lambda: time_op(op, sets, iters=self.iters))
        if res is None:
          continue
        self.record(case, label, "xla_bf16", res[0], base_ms, flops, nbytes,
                    block_sizes=bs.__dict__, spread=res[1],
                    ratio_vs_dequant_dot=(deq[0] / res[0]) if deq else None)

  def w4a16_decode_candidates(self, m, n, k, g):
    """(label, kernel module, block sizes): the Triton default, then the picked Mosaic GPU
    tilings whose block_n divides N."""
    default = BlockSizes.get_default("weight_only", m, n, k, group_size=g, bits=4)
    return [("pallas_gpu", gpu, default)] + [
        (mosaic_label(bs), mosaic_gpu, bs) for bs in self.mosaic_configs if n % bs.block_n == 0]

  def mosaic(self, shapes, ms):
    """Mosaic GPU W4A16 (g128, symmetric) against XLA bf16 and the Triton default: the
    whole op (operand prep, kernel, split-K sum) per tiling, and the kernel alone on
    prepared operands (what the XLA glue around it costs) at run 19's tiling and at the
    default one."""
    g = 128
    for case, flops, nbytes, base_ms, sets in self._w4a16_cases(shapes, ms, g):
      m, n, k = case["m"], case["n"], case["k"]
      for label, kernel, bs in self.w4a16_decode_candidates(m, n, k, g):
        op = functools.partial(kernel.weight_only_matmul, bits=4, group_size=g,
                               block_sizes=bs, interpret=self.interpret)
        res = self.guarded(f"{label} M={m} {n}x{k}", lambda: time_op(
            op, sets, iters=self.iters, r=MOSAIC_ROTATIONS))
        if res:
          self.record(case, label, "xla_bf16", res[0], base_ms, flops, nbytes,
                      block_sizes=bs.__dict__, spread=res[1])
      for bs in (MOSAIC_CONFIGS[1], mosaic_gpu.MosaicBlockSizes.get_default(n, k, g)):
        prep = jax.jit(functools.partial(mosaic_gpu.kernel_operands, group_size=g,
                                         block_sizes=bs, interpret=self.interpret))
        prepared = [common.block(prep(*st)) for st in sets[:MOSAIC_ROTATIONS]]
        op = functools.partial(mosaic_gpu.partial_products, group_size=g, block_sizes=bs,
                               interpret=self.interpret)
        res = self.guarded(f"kernel only M={m} {n}x{k}", lambda: time_op(
            op, prepared, iters=self.iters, r=MOSAIC_ROTATIONS))
        if res:
          self.record(case, "kernel_only " + mosaic_label(bs), "xla_bf16", res[0], base_ms,
                      flops, nbytes, block_sizes=bs.__dict__, spread=res[1])

  def mosaic_device(self, shapes, ms, calls=64):
    """The W4A16 candidates of `mosaic` (XLA bf16, the Triton default, the Mosaic GPU
    tilings) timed as GPU kernel time per call from a profiler trace
    (`common.device_kernel_times`): no host dispatch or launch gaps, and each row lists
    its kernels (the XLA glue apart from the kernel). Each candidate's output on the
    first set is checked against the reference first."""
    g = 128
    for (n, k) in shapes:
      wsets = [rand_w4(n, k, g, i) for i in range(MOSAIC_ROTATIONS)]
      wb = [jax.random.normal(_key("wb", n, k, i), (n, k), jnp.bfloat16)
            for i in range(rotations(2 * n * k, cap=MOSAIC_ROTATIONS))]
      for m in ms:
        xs = [rand_x(m, k, i) for i in range(MOSAIC_ROTATIONS)]
        case = {"op": "w4a16", "m": m, "n": n, "k": k, "group_size": g, "symmetric": True,
                "timing": "profiler kernel time per call"}
        flops = 2 * m * n * k
        nbytes = n * k // 2 + n * (k // g) * 4 + 2 * m * k + 2 * m * n
        base_ms = self.bf16_device_baseline(case, xs, wb, calls)
        if base_ms is None:
          continue
        sets = [(x, *wsets[i][:2]) for i, x in enumerate(xs)]
        want = reference.weight_only_matmul(*sets[0], bits=4, group_size=g)
        for label, kernel, bs in self.w4a16_decode_candidates(m, n, k, g):
          op = functools.partial(kernel.weight_only_matmul, bits=4, group_size=g,
                                 block_sizes=bs, interpret=self.interpret)
          self.check_and_time_device(case, label, op, sets, want, base_ms, flops, nbytes,
                                     calls, block_sizes=bs.__dict__)

  def bf16_device_baseline(self, case, xs, wb, calls):
    """XLA's bf16 dot on the activations `xs` (weights `wb` in turn) as GPU kernel time per
    call, recorded as the case's "bf16" row; its ms, or None if it failed."""
    m, n, k = case["m"], case["n"], case["k"]
    base = self.guarded(f"bf16 device M={m} {n}x{k}", lambda: common.device_kernel_times(
        xla_bf16, [(x, wb[i % len(wb)]) for i, x in enumerate(xs)], calls=calls))
    if base is None:
      return None
    self.record({**case, "op": "bf16"}, "xla_bf16", "xla_bf16", base[0], base[0],
                2 * m * n * k, 2 * n * k + 2 * m * k + 2 * m * n, kernels=_kernel_us(base[1]))
    return base[0]

  def check_and_time_device(self, case, label, op, sets, want, base_ms, flops, nbytes, calls,
                            **fields):
    """`op` on the first set against `want`; if within CHECK_TOLERANCE, its GPU kernel
    time per call over `sets` recorded against the baseline (XLA bf16), kernels listed."""
    where = f"{case['op']} {label} M={case['m']} {case['n']}x{case['k']}"
    err = self.guarded(where, lambda: rel_err(op(*sets[0]), want))
    if err is None or not err <= CHECK_TOLERANCE:
      self.failures.append(f"{where}: rel_err={err}")
      return
    res = self.guarded(f"{where} device",
                       lambda: common.device_kernel_times(op, sets, calls=calls))
    if res:
      kernels = _kernel_us(res[1])
      self.record(case, label, "xla_bf16", res[0], base_ms, flops, nbytes, kernels=kernels,
                  rel_err=err, **fields)
      print("    kernels (us/call):", kernels, flush=True)

  def w4a16_configs(self, m, n, k, g):
    default = BlockSizes.get_default("weight_only", m, n, k, group_size=g, bits=4)
    out = [("pallas_gpu", default)]
    if self.tiny or self.args.no_sweep:
      return out
    n_groups = k // g

    split_for = lambda bn, per_sm=4: split_k_for(n_groups, -(-n // bn), per_sm)

    if m <= 16 and self.args.sweep == "occupancy":
      # After Nsight Compute showed 0.48 waves / 18% achieved occupancy for the default
      # decode blocks: more programs (split-K, narrower tiles, fewer warps).
      for bn, per_sm, st, w in ((32, 8, 4, 4), (32, 14, 4, 4), (64, 8, 4, 4), (64, 14, 4, 4),
                                (64, 14, 3, 4), (16, 14, 4, 4), (32, 14, 4, 2), (32, 28, 4, 2)):
        bs = BlockSizes(block_m=16, block_n=bn, split_k=split_for(bn, per_sm), group_m=1,
                        num_warps=w, num_stages=st)
        label = f"pallas_gpu[bn{bn} cw8 w{w} s{st} sk{bs.split_k}]"
        if all(label != l for l, _ in out):
          out.append((label, bs))
    elif m <= 16:
      # (block_n, code_word, join_halves, warps, stages, programs per SM)
      for bn, cw, join, w, st, per_sm in (
          (64, 8, True, 4, 4, 4), (64, 8, False, 4, 4, 8), (128, 8, True, 4, 4, 4),
          (32, 8, False, 4, 6, 4), (64, 8, True, 4, 6, 1), (64, 16, False, 4, 4, 4),
          (128, 16, False, 4, 4, 4), (128, 16, False, 8, 4, 6)):
        bs = BlockSizes(block_m=16, block_n=bn, split_k=split_for(bn, per_sm), group_m=1,
                        num_warps=w, num_stages=st, code_word=cw, join_halves=join)
        out.append((f"pallas_gpu[bn{bn} cw{cw}{' join' if join else ''} w{w} s{st} "
                    f"sk{bs.split_k}]", bs))
    elif m >= 1024:
      for bm, bn, w, st, join in ((128, 128, 8, 3, True), (64, 128, 4, 4, True)):
        bs = BlockSizes(block_m=bm, block_n=bn, group_m=8, num_warps=w, num_stages=st,
                        join_halves=join)
        out.append((f"pallas_gpu[{bm}x{bn} w{w} s{st}{' join' if join else ''}]", bs))
    return out

  def mosaic_scaled_candidates(self, n, k):
    """(label, fn, block sizes) of the Mosaic GPU int8 / fp8 tilings that fit N x K."""
    configs = MOSAIC_SCALED_CONFIGS[:1] if self.tiny else MOSAIC_SCALED_CONFIGS
    return [(mosaic_scaled_label(bs), mosaic_gpu.scaled_matmul, bs) for bs in configs
            if n % bs.block_n == 0 and k % bs.block_k == 0]

  def w8a8(self, shapes, ms, mosaic=False):
    """W8A8 against XLA bf16 and XLA's int8 dot: the Triton tilings of `w8a8_configs`,
    or with `mosaic` the Triton default and the Mosaic GPU tilings."""
    for (n, k) in shapes:
      r8 = rotations(n * k)
      wq = [rand_i8(n, k, i, "w") for i in range(r8)]
      wb = [jax.random.normal(_key("wb", n, k, i), (n, k), jnp.bfloat16)
            for i in range(rotations(2 * n * k))]
      for m in ms:
        r8 = min(len(wq), rotations(n * k + m * k + 2 * m * n))
        rb = min(len(wb), rotations(2 * n * k + 2 * m * k + 2 * m * n))
        wq_m, wb_m = wq[:r8], wb[:rb]
        xq = [rand_i8(m, k, i) for i in range(r8)]
        xb = [rand_x(m, k, i) for i in range(rb)]
        case = {"op": "w8a8", "m": m, "n": n, "k": k}
        flops = 2 * m * n * k
        base = self.guarded("bf16", lambda: time_op(
            xla_bf16, [(xb[i], wb_m[i]) for i in range(rb)], iters=self.iters))
        if base is None:
          continue
        base_ms = base[0]
        self.record({**case, "op": "bf16"}, "xla_bf16", "xla_bf16", base_ms, base_ms,
                    flops, 2 * n * k + 2 * m * k + 2 * m * n)
        nbytes = n * k + m * k + 2 * m * n + 4 * (m + n)
        xi = self.guarded("xla int8", lambda: time_op(
            reference.int8_matmul, [(xq[i][0], xq[i][1], wq_m[i][0], wq_m[i][1])
                                    for i in range(r8)], iters=self.iters))
        if xi is not None:
          self.record(case, "xla_int8_nt+rescale", "xla_bf16", xi[0], base_ms, flops,
                      nbytes, 2.0)
        triton = self.scaled_configs("int8", m, n, k)[:1] if mosaic else \
            self.w8a8_configs(m, n, k)
        candidates = [(label, gpu.int8_matmul, bs) for label, bs in triton]
        candidates += self.mosaic_scaled_candidates(n, k) if mosaic else []
        for label, fn, bs in candidates:
          res = self.guarded(f"int8 {label} M={m}", lambda: time_op(
              functools.partial(fn, block_sizes=bs, interpret=self.interpret),
              [(xq[i][0], xq[i][1], wq_m[i][0], wq_m[i][1]) for i in range(r8)],
              iters=self.iters,
              r=MOSAIC_SCALED_ROTATIONS if fn is mosaic_gpu.scaled_matmul else None))
          if res is not None:
            self.record(case, label, "xla_bf16", res[0], base_ms, flops, nbytes, 2.0,
                        block_sizes=bs.__dict__, spread=res[1],
                        ratio_vs_xla_int8=(xi[0] / res[0]) if xi else None)

  def scaled_configs(self, op, m, n, k):
    """The default tiling, and at decode sizes the same without split-K (the default
    before split-K)."""
    default = BlockSizes.get_default(op, m, n, k)
    out = [("pallas_gpu", default)]
    if default.split_k > 1:
      out.append(("pallas_gpu[no split-K]", dataclasses.replace(default, split_k=1)))
    return out

  def w8a8_configs(self, m, n, k):
    out = self.scaled_configs("int8", m, n, k)
    if self.tiny or self.args.no_sweep or m < 1024:
      return out
    for bm, bn, bk, w, st in ((128, 128, 128, 8, 4), (128, 256, 128, 8, 3),
                              (64, 128, 128, 4, 4)):
      out.append((f"pallas_gpu[{bm}x{bn}x{bk} w{w} s{st}]",
                  BlockSizes(block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=w,
                             num_stages=st)))
    return out

  def fp8(self, shapes, ms, mosaic=False):
    """FP8 against XLA's own fp8 dot: the Triton default (and its unsplit twin), and with
    `mosaic` the Mosaic GPU tilings."""
    for (n, k) in shapes:
      wq = [rand_f8(n, k, i, "w") for i in range(rotations(n * k))]
      for m in ms:
        r = min(len(wq), rotations(n * k + m * k + 2 * m * n))
        xq = [rand_f8(m, k, i) for i in range(r)]
        sets = [(xq[i][0], xq[i][1], wq[i][0], wq[i][1]) for i in range(r)]
        case = {"op": "fp8", "m": m, "n": n, "k": k}
        flops, nbytes = 2 * m * n * k, n * k + m * k + 2 * m * n
        base = self.guarded("xla fp8", lambda: time_op(reference.fp8_matmul, sets,
                                                       iters=self.iters))
        if base is None:
          continue
        self.record(case, "xla_fp8", "xla_fp8", base[0], base[0], flops, nbytes, 2.0)
        candidates = [(label, gpu.fp8_matmul, bs)
                      for label, bs in self.scaled_configs("fp8", m, n, k)]
        candidates += self.mosaic_scaled_candidates(n, k) if mosaic else []
        for label, fn, bs in candidates:
          res = self.guarded(f"fp8 {label} M={m}", lambda: time_op(
              functools.partial(fn, block_sizes=bs, interpret=self.interpret),
              sets, iters=self.iters,
              r=MOSAIC_SCALED_ROTATIONS if fn is mosaic_gpu.scaled_matmul else None))
          if res is not None:
            self.record(case, label, "xla_fp8", res[0], base[0], flops, nbytes, 2.0,
                        block_sizes=bs.__dict__, spread=res[1])

  def w4a4(self, shapes, ms, n_out=128, g=128, mosaic=False):
    """Atom W4A4 (+ n_out int8 outliers) against XLA bf16: the Triton kernel, and with
    `mosaic` the Mosaic GPU tilings of MOSAIC_W4A4_CONFIGS."""
    for (n, k) in shapes:
      k_main = k - n_out
      wsz = n * k_main // 2 + n * n_out + 4 * n * (k_main // g + 1)
      ws = [rand_w4a4(n, k_main, n_out, g, i, "w") for i in range(rotations(wsz))]
      wb = [jax.random.normal(_key("wb", n, k, i), (n, k), jnp.bfloat16)
            for i in range(rotations(2 * n * k))]
      for m in ms:
        r = max(min(len(ws), rotations(wsz + m * k // 2 + 2 * m * n)),
                min(len(wb), rotations(2 * n * k + 2 * m * k + 2 * m * n)))
        xa = [rand_w4a4(m, k_main, n_out, g, i) for i in range(r)]
        xb = [rand_x(m, k, i) for i in range(r)]
        case = {"op": "w4a4", "m": m, "n": n, "k": k, "n_outliers": n_out, "group_size": g}
        flops = 2 * m * n * k
        base = self.guarded("bf16", lambda: time_op(
            xla_bf16, [(xb[i], wb[i]) for i in range(min(r, len(wb)))], iters=self.iters))
        if base is None:
          continue
        nbytes = wsz + m * k_main // 2 + m * n_out + 2 * m * n
        sets = [(xa[i][0], xa[i][1], ws[i][0], ws[i][1], xa[i][2], xa[i][3], ws[i][2],
                 ws[i][3]) for i in range(min(r, len(ws)))]
        candidates = [("pallas_gpu", functools.partial(gpu.w4a4_matmul, group_size=g))]
        if mosaic:
          candidates += [(mosaic_w4a4_label(bs),
                          functools.partial(mosaic_gpu.w4a4_matmul, group_size=g,
                                            block_sizes=bs))
                         for bs in self.w4a4_configs if n % bs.block_n == 0]
        for label, op in candidates:
          res = self.guarded(f"w4a4 {label} M={m}", lambda: time_op(
              functools.partial(op, interpret=self.interpret), sets, iters=self.iters,
              r=MOSAIC_ROTATIONS if label.startswith("mosaic") else None))
          if res is not None:
            self.record(case, label, "xla_bf16", res[0], base[0], flops, nbytes, 2.0,
                        spread=res[1])


  def w4a4_decode_device(self, shapes, ms, n_out=128, g=128, calls=64):
    """Atom W4A4 (+ n_out int8 outliers) at a few tokens, as GPU kernel time per call
    (`common.device_kernel_times`): XLA bf16, the Triton kernel, the Mosaic default (the
    product on the W4A16 kernel) and its alternatives (`w4a4_decode_tilings`), each checked
    against the reference first."""
    for (n, k) in shapes:
      k_main = k - n_out
      ws = [rand_w4a4(n, k_main, n_out, g, i, "w") for i in range(MOSAIC_ROTATIONS)]
      wb = [jax.random.normal(_key("wb", n, k, i), (n, k), jnp.bfloat16)
            for i in range(rotations(2 * n * k, cap=MOSAIC_ROTATIONS))]
      for m in ms:
        xa = [rand_w4a4(m, k_main, n_out, g, i) for i in range(MOSAIC_ROTATIONS)]
        xb = [rand_x(m, k, i) for i in range(MOSAIC_ROTATIONS)]
        case = {"op": "w4a4", "m": m, "n": n, "k": k, "n_outliers": n_out, "group_size": g,
                "timing": "profiler kernel time per call"}
        flops = 2 * m * n * k
        nbytes = n * k_main // 2 + n * n_out + 4 * n * (k_main // g + 1) + m * k + 2 * m * n
        base_ms = self.bf16_device_baseline(case, xb, wb, calls)
        if base_ms is None:
          continue
        sets = [(xa[i][0], xa[i][1], ws[i][0], ws[i][1], xa[i][2], xa[i][3], ws[i][2],
                 ws[i][3]) for i in range(MOSAIC_ROTATIONS)]
        want = reference.w4a4_matmul(*sets[0], group_size=g)
        candidates = [("pallas_gpu", functools.partial(gpu.w4a4_matmul, group_size=g)),
                      ("mosaic default", functools.partial(mosaic_gpu.w4a4_matmul,
                                                           group_size=g))]
        candidates += [(mosaic_w4a4_label(bs), functools.partial(
            mosaic_gpu.w4a4_matmul, group_size=g, block_sizes=bs))
            for bs in w4a4_decode_tilings(n, k_main, g)]
        for label, op in candidates:
          self.check_and_time_device(case, label, op, sets, want, base_ms, flops, nbytes,
                                     calls)


def profile_decode(n=14336, k=4096, g=128, m=1, calls=3):
  """A few plain calls of the W4A16 decode kernel (default blocks) and of XLA's bf16 dot,
  for Nsight Compute: `ncu --kernel-name regex:w4a16 ... -m bench.quantized_matmul
  --only profile`."""
  x = rand_x(m, k)
  codes, scales, _ = rand_w4(n, k, g)
  wb = jax.random.normal(_key("wb", n, k, 0), (n, k), jnp.bfloat16)
  f = jax.jit(lambda x, c, s: gpu.weight_only_matmul(x, c, s, bits=4, group_size=g))
  b = jax.jit(xla_bf16)
  for _ in range(calls):
    common.block(f(x, codes, scales))
    common.block(b(x, wb))
  print("profile calls done", BlockSizes.get_default("weight_only", m, n, k), flush=True)


def profile_mosaic(calls=2):
  """A few plain calls of the Mosaic GPU kernels at Llama-3-8B sizes, for Nsight Compute:
  W4A4 at M = 4096 on 14336x4096 with a 128-channel tail (default), W4A16 at M = 1 on
  14336x4096 (default, and the layout-cast unpack), W8A8 at M =
  4096 on 14336x4096; kernels `w4a4_mosaic_kernel`, `w4a16_mosaic_kernel`,
  `scaled_mosaic_kernel`:
  `ncu --clock-control none ... -m bench.quantized_matmul --only profile_mosaic`. The
  inputs come from numpy, so the first kernels ncu sees are the ops' own."""
  n, k, n_out, g, m = 14336, 4096, 128, 128, 4096
  rng = np.random.default_rng(0)
  codes = lambda *shape: jnp.asarray(rng.integers(-128, 128, shape, dtype=np.int8))
  scales = lambda *shape: jnp.asarray(rng.uniform(0.01, 0.02, shape).astype(np.float32))
  k_main = k - n_out
  w4a4_args = (codes(m, k_main // 2), scales(m, k_main // g), codes(n, k_main // 2),
               scales(n, k_main // g), codes(m, n_out), scales(m, 1), codes(n, n_out),
               scales(n, 1))
  x = jnp.asarray(rng.standard_normal((1, k)).astype(jnp.bfloat16))
  w4a16_args = (x, codes(n, k // 2), scales(n, k // g))
  w8a8_args = (codes(m, k), scales(m, 1), codes(n, k), scales(n, 1))
  for _ in range(calls):  # the entry points are jitted
    common.block(mosaic_gpu.w4a4_matmul(*w4a4_args, group_size=g))
    common.block(mosaic_gpu.weight_only_matmul(*w4a16_args, bits=4, group_size=g))
    common.block(mosaic_gpu.weight_only_matmul(
        *w4a16_args, bits=4, group_size=g,
        block_sizes=mosaic_gpu.MosaicBlockSizes(register_unpack=False)))
    common.block(mosaic_gpu.scaled_matmul(*w8a8_args))
  print("profile calls done", flush=True)


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
  p.add_argument("--tiny", action="store_true", help="CPU smoke test in interpret mode")
  p.add_argument("--iters", type=int, default=30)
  p.add_argument("--no-sweep", action="store_true")
  p.add_argument("--only", default="check,w4a16,w8a8,fp8,w4a4")
  p.add_argument("--ms", default=None, help="comma-separated M values for W4A16 / W8A8")
  p.add_argument("--sweep", default="default", choices=["default", "occupancy"])
  p.add_argument("--no-extra-shapes", action="store_true")
  p.add_argument("--mosaic-configs", default=None,
                 help="comma-separated indices into MOSAIC_CONFIGS to time (default all)")
  p.add_argument("--w4a4-configs", default=None,
                 help="comma-separated indices into MOSAIC_W4A4_CONFIGS to time")
  p.add_argument("--w4a4-outliers", type=int, default=128,
                 help="int8 outlier channels of the timed W4A4 cases (0 leaves an even "
                      "group count at K = 4096 and 8192, for groups_per_step 2)")
  p.add_argument("--shapes", default=None,
                 help="comma-separated NxK (e.g. 14336x4096) replacing every section's shapes")
  args = p.parse_args(argv)
  if args.tiny:  # interpret mode is slow: one small call per sample
    global CALL_BYTES, INNER
    CALL_BYTES, INNER = 1, 1
  t0 = time.time()
  b = Bench(args)
  only = set(args.only.split(","))
  if only == {"profile"}:
    profile_decode()
    return 0
  if only == {"profile_mosaic"}:
    profile_mosaic()
    return 0
  b.ceilings()
  if "check" in only:
    b.check(decode_only=bool(only & {"decode", "mosaic", "mosaic_w4a4", "mosaic_scaled"})
            and not only & {"w4a16", "w8a8"})
  if args.tiny:
    shapes, ms_w4, ms_w8 = [(256, 512)], [1, 20], [33]
  else:
    shapes = [(4096, 4096), (14336, 4096), (4096, 14336)]
    ms_w4 = ms_w8 = [1, 16, 64, 256, 1024, 4096]
    if args.ms:
      ms_w4 = ms_w8 = [int(v) for v in args.ms.split(",")]
  only_shapes = ([tuple(int(d) for d in nk.split("x")) for nk in args.shapes.split(",")]
                 if args.shapes else None)
  shapes = only_shapes or shapes
  if "mosaic_scaled" in only:
    scaled_shapes = ([(256, 512)] if args.tiny else
                     only_shapes or [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)])
    scaled_ms = [33] if args.tiny else [int(v) for v in (args.ms or "2048,4096").split(",")]
    b.w8a8(scaled_shapes, scaled_ms, mosaic=True)
    b.fp8(scaled_shapes, scaled_ms, mosaic=True)
    print(f"[mosaic_scaled done at {time.time() - t0:.0f}s]", flush=True)
  if "mosaic" in only:
    if args.tiny:
      b.mosaic([(256, 512)], [1, 20])
    else:
      b.mosaic(only_shapes or [(14336, 4096), (4096, 4096), (4096, 14336), (28672, 8192)],
               [int(v) for v in (args.ms or "1,4,16").split(",")])
      if not args.ms:
        b.mosaic(only_shapes or [(14336, 4096), (4096, 14336)], [64, 256])
    print(f"[mosaic done at {time.time() - t0:.0f}s]", flush=True)
  if "mosaic_device" in only:
    b.mosaic_device([(256, 512)] if args.tiny else
                    only_shapes or [(14336, 4096), (28672, 8192), (4096, 14336)],
                    [1, 20] if args.tiny else [int(v) for v in (args.ms or "1,4,16").split(",")])
    print(f"[mosaic_device done at {time.time() - t0:.0f}s]", flush=True)
  if "mosaic_w4a4_decode" in only:
    b.w4a4_decode_device([(256, 512)] if args.tiny else
                         only_shapes or [(14336, 4096), (4096, 14336), (4096, 4096),
                                         (28672, 8192)],
                         [1, 20] if args.tiny else [int(v) for v in (args.ms or "1,4,16")
                                                    .split(",")],
                         n_out=64 if args.tiny else args.w4a4_outliers,
                         g=64 if args.tiny else 128)
    print(f"[mosaic_w4a4_decode done at {time.time() - t0:.0f}s]", flush=True)
  if "mosaic_w4a4" in only:
    b.w4a4(only_shapes or shapes[:2], [1024, 4096] if not args.tiny else [33],
           n_out=64 if args.tiny else args.w4a4_outliers, g=64 if args.tiny else 128,
           mosaic=True)
    print(f"[mosaic_w4a4 done at {time.time() - t0:.0f}s]", flush=True)
  if "decode" in only:
    decode_shapes = ([(256, 512)] if args.tiny else
                     [(14336, 4096), (4096, 4096), (4096, 14336), (28672, 8192)])
    b.w4a16(decode_shapes, [1, 4] if args.tiny else [1, 4, 16], configs=decode_configs,
            with_dequant=False)
    print(f"[decode done at {time.time() - t0:.0f}s]", flush=True)
  if "w4a16" in only:
    b.w4a16(shapes, ms_w4)
    if not args.tiny and not args.no_extra_shapes:
      b.w4a16([(28672, 8192)], [1, 16])
    print(f"[w4a16 done at {time.time() - t0:.0f}s]", flush=True)
  if "w8a8" in only:
    b.w8a8(shapes, ms_w8)
    if not args.tiny and not args.no_extra_shapes:
      b.w8a8([(28672, 8192)], [4096])
    print(f"[w8a8 done at {time.time() - t0:.0f}s]", flush=True)
  if "fp8" in only:
    b.fp8(shapes[:2], [33] if args.tiny else ms_w8 if args.ms else [16, 4096])
  if "w4a4" in only:
    b.w4a4(shapes[:2], [1024, 4096] if not args.tiny else [33])
  print(f"\n=== summary ({time.time() - t0:.0f}s, card {b.writer.card}) ===")
  for line in b.summary:
    print(line)
  print(f"{len(b.failures)} failures")
  for f in b.failures:
    print(f)
  with open(os.path.join(args.out, "summary.txt"), "w") as f:
    f.write("\n".join(b.summary + b.failures) + "\n")
  return 1 if b.failures else 0


if __name__ == "__main__":
  sys.exit(main())
