"""Probe: how fast can the Mosaic GPU W4A16 kernel's TMA pipeline read the codes at all?

The W4A16 decode kernel reads its codes at 45-62% of the H200's datasheet bandwidth
(quantized_matmul.md, run 24), and the 3.4x bar of issue 3 needs ~85%. This probe splits
that gap in two, in GPU kernel time per call (`common.device_kernel_times`):

  1. the memory side: a kernel with the same grid and TMA ring as the real one whose steps
     do nothing, so it times the loads alone. Its variants change one thing at a time:
     the smem swizzle (which sets the TMA box's inner width), the bytes each row gives a
     step, the tile height, the ring depth, the split along K, and the weight layout
     (`tiled`: each program's step one contiguous chunk of HBM instead of block_n rows of
     a [N, K/2] array, 2 KB to 16 KB apart);
  2. the compute side: the real kernel (`mosaic_gpu.partial_products`, default tiling) with
     its codes cold (8 rotating weight sets, 8x the L2) and hot (one set, which fits the
     50 MB L2 on 14336x4096 and 4096x14336).

Reading: if the load-only kernel of the default tiling already sits near the kernel's
time, the access pattern is the limit; if it runs near the HBM ceiling while the hot
kernel is as slow as the cold one, the per-step compute and its waits are.

Usage (GPU): python -m bench.w4a16_stream_probe --out $OUT [--shapes 14336x4096,...]
CPU smoke test (the interpreter, and every tiling lowered for CUDA):
  python -m bench.w4a16_stream_probe --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from bench import common
from bench.quantized_matmul import rand_w4, rand_x
from pallas_kernels.quantized_matmul import mosaic_gpu

BENCH = "w4a16_stream_probe"
GROUP = 128
ROTATIONS = 8
DATASHEET_TBPS = 4.8


@dataclasses.dataclass(frozen=True)
class StreamTiling:
  """One load-only pipeline: programs of block_n rows x (K / split_k) code bytes / 2."""
  block_n: int = 64
  step_bytes: int = 128      # code bytes per row per step (128 = two g128 groups)
  split_k: int = 8
  stages: int = 2
  swizzle: int = 64          # 0: none; else the smem swizzle (and TMA box width) in bytes
  tiled: bool = False        # each program's step one contiguous [block_n, step_bytes] chunk

  def label(self) -> str:
    return (f"load_only[bn{self.block_n} step{self.step_bytes}B sk{self.split_k} "
            f"st{self.stages} sw{self.swizzle}{' tiled' if self.tiled else ''}]")


TILINGS = (
    StreamTiling(),                                  # the default kernel's codes pipeline
    StreamTiling(swizzle=128),
    StreamTiling(swizzle=0),
    StreamTiling(tiled=True),
    StreamTiling(tiled=True, swizzle=128),
    StreamTiling(step_bytes=256, split_k=4, swizzle=128),
    StreamTiling(step_bytes=256, split_k=4, swizzle=128, tiled=True),
    StreamTiling(block_n=128, swizzle=128),
    StreamTiling(split_k=4, stages=4, swizzle=128),
    StreamTiling(split_k=1, stages=4, swizzle=128),
    StreamTiling(split_k=1, stages=8, step_bytes=256, swizzle=128, tiled=True),
)


def tiled_layout(codes: jax.Array, t: StreamTiling) -> jax.Array:
  """[N, K/2] bytes -> [N / bn * K/2 / step_bytes * bn, step_bytes]: tile i's step s is
  rows (i * steps_total + s) * bn ..., one contiguous chunk."""
  n, kb = codes.shape
  blocks = codes.reshape(n // t.block_n, t.block_n, kb // t.step_bytes, t.step_bytes)
  return blocks.swapaxes(1, 2).reshape(-1, t.step_bytes)


def load_only(codes: jax.Array, *, n: int, kb: int, t: StreamTiling, interpret=False):
  """Streams every code byte through the TMA ring of a [n / bn, split_k] grid; each step
  waits for its copy and does nothing else. Returns the (unwritten) float32 output."""
  n_tiles = n // t.block_n
  steps_total = kb // t.step_bytes
  steps = steps_total // t.split_k
  transforms = ((plgpu.TilingTransform((8, t.swizzle)), plgpu.SwizzleTransform(t.swizzle))
                if t.swizzle and not interpret else ())

  def kernel(c_gmem, o_gmem):
    del o_gmem
    tile = lax.axis_index("n")
    part = lax.axis_index("k")
    if t.tiled:
      spec = plgpu.BlockSpec((t.block_n, t.step_bytes),
                             lambda i: (tile * steps_total + part * steps + i, 0),
                             transforms=transforms)
      source = c_gmem
    else:
      spec = plgpu.BlockSpec((t.block_n, t.step_bytes), lambda i: (0, part * steps + i),
                             transforms=transforms)
      source = c_gmem.at[pl.ds(tile * t.block_n, t.block_n)]
    plgpu.emit_pipeline(lambda indices, c_smem: None, grid=(steps,), in_specs=[spec],
                        max_concurrent_steps=t.stages)(source)

  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((t.split_k, 8), jnp.float32),
      grid=(n_tiles, t.split_k), grid_names=("n", "k"),
      interpret=mosaic_gpu._interpret_mode(interpret))(codes)


def xla_byte_sum(codes: jax.Array) -> jax.Array:
  """XLA's own read of the same bytes: one int32 row-sum reduction."""
  return jnp.sum(codes.astype(jnp.int32), axis=1)


def smoke_test(shape):
  """On the CPU: the tiled load-only pipeline in the interpreter (on a 256 x 1024 weight),
  and every tiling lowered for CUDA at `shape`, so that a device run does not fail on a
  tiling that cannot lower."""
  t = StreamTiling(step_bytes=128, split_k=2, tiled=True)
  codes = rand_w4(256, 1024, GROUP)[0]
  load_only(tiled_layout(codes, t), n=256, kb=512, t=t, interpret=True).block_until_ready()
  n, k = shape
  kb = k // 2
  for t in TILINGS:
    rows = n * kb // t.step_bytes if t.tiled else n
    arg = jax.ShapeDtypeStruct((rows, t.step_bytes if t.tiled else kb), jnp.int8)
    fn = functools.partial(load_only, n=n, kb=kb, t=t)
    jax.jit(fn).trace(arg).lower(lowering_platforms=("cuda",))
    print("lowers:", t.label(), flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="bench/results")
  p.add_argument("--shapes", default="14336x4096,28672x8192,4096x14336")
  p.add_argument("--ms", default="1,16")
  p.add_argument("--calls", type=int, default=64)
  p.add_argument("--tiny", action="store_true", help="CPU interpreter smoke test")
  args = p.parse_args()
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  ms = [int(v) for v in args.ms.split(",")]
  writer = common.ResultWriter(os.path.join(args.out, f"{BENCH}.jsonl"), BENCH)
  failures: list[str] = []

  def timed(label, fn, arg_sets):
    res = common.guarded(label, lambda: common.device_kernel_times(fn, arg_sets,
                                                                    calls=args.calls),
                         failures)
    return None if res is None else res[0]

  def record(case, impl, ms_, nbytes, **extra):
    tbps = nbytes / (ms_ * 1e-3) / 1e12
    writer.add(case=case, impl=impl, baseline_impl="hbm_datasheet", median_ms=ms_,
               baseline_median_ms=nbytes / (DATASHEET_TBPS * 1e12) * 1e3,
               fraction_of_ceiling=tbps / DATASHEET_TBPS,
               ceiling=f"HBM {DATASHEET_TBPS} TB/s datasheet", **extra)
    print(f"{case['n']}x{case['k']} M={case.get('m', '-')} {impl:60s} {ms_ * 1e3:8.2f} us "
          f"{tbps:5.2f} TB/s ({tbps / DATASHEET_TBPS:.0%})", flush=True)

  if args.tiny:
    smoke_test(shapes[0])
    return
  for n, k in shapes:
    kb = k // 2
    weights = [rand_w4(n, k, GROUP, i) for i in range(ROTATIONS)]
    code_sets = [(w[0],) for w in weights]
    code_bytes = n * kb
    case = {"n": n, "k": k, "timing": "profiler kernel time per call"}
    ms_ = timed("xla byte sum", xla_byte_sum, code_sets)
    if ms_:
      record(case, "xla_int8_row_sum", ms_, code_bytes)
    for t in TILINGS:
      if n % t.block_n or kb % (t.step_bytes * t.split_k):
        continue
      sets = [(tiled_layout(c, t),) for (c,) in code_sets] if t.tiled else code_sets
      ms_ = timed(t.label(), functools.partial(load_only, n=n, kb=kb, t=t), sets)
      if ms_:
        record(case, t.label(), ms_, code_bytes, tiling=dataclasses.asdict(t))
    bs = mosaic_gpu.MosaicBlockSizes.get_default(n, k, GROUP)
    prep = jax.jit(functools.partial(mosaic_gpu.kernel_operands, group_size=GROUP,
                                     block_sizes=bs))
    kernel = functools.partial(mosaic_gpu.partial_products, group_size=GROUP,
                               block_sizes=bs)
    for m in ms:
      operands = [common.block(prep(rand_x(m, k, i), c, s))
                  for i, (c, s, _) in enumerate(weights)]
      nbytes = code_bytes + n * (k // GROUP) * 4
      for temperature, sets in (("cold", operands), ("hot", operands[:1])):
        ms_ = timed(f"kernel {temperature} M={m}", kernel, sets)
        if ms_:
          record({**case, "m": m}, f"mosaic_kernel_{temperature}", ms_, nbytes,
                 block_sizes=dataclasses.asdict(bs), weight_sets=len(sets))
  if failures:
    print("FAILURES:\n  " + "\n  ".join(failures), flush=True)
    raise SystemExit(1)


if __name__ == "__main__":
  main()
