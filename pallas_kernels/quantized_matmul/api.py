"""The quantized matmul family: dispatchers over the Pallas kernels and the XLA reference.

Each function picks an implementation by backend, shape and dtype (DESIGN.md "Kernels"):

  implementation=None     the backend's order: "pallas_gpu" then "xla" on a GPU,
                          "pallas_tpu" then "xla" on a TPU, "xla" elsewhere; a kernel that
                          cannot serve the case raises NotImplementedError and the next is
                          tried. On a GPU, measured exceptions: large-M W4A16 / W8A16 and
                          FP8 start at XLA (WEIGHT_ONLY_GPU_MAX_M, FP8_GPU_MAX_M); decode
                          W4A16 on large weights, Atom W4A4, and W8A8 / FP8 from 1024 /
                          2048 tokens start at "mosaic_gpu" (Hopper only; see
                          MOSAIC_W4A16_MAX_M, MOSAIC_INT8_MIN_M).
  implementation="name"   that implementation only; its errors propagate.
  implementation=(...)    that order.

"xla" is `reference.py`: plain jnp, correct everywhere. "xla_dequant" (weight-only only)
dequantizes to the activation dtype and calls XLA's dot: the fast XLA path for large M.
`block_sizes=` reaches the kernel of the matching type (`BlockSizes` for GPU,
`TpuBlockSizes` for TPU, `MOSAIC_BLOCK_SIZES` for Mosaic GPU); `interpret=`
runs a Pallas kernel on the CPU (True for the GPU kernels, `pltpu.InterpretParams()` for
the TPU ones).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from pallas_kernels.dispatch import backend_order, call_first, requested_order
from pallas_kernels.quantized_matmul import gpu
from pallas_kernels.quantized_matmul import mosaic_gpu
from pallas_kernels.quantized_matmul import reference
from pallas_kernels.quantized_matmul import tpu
from pallas_kernels.quantized_matmul.config import BlockSizes, TpuBlockSizes
from pallas_kernels.quantized_matmul.mosaic_gpu import (MosaicBlockSizes, MosaicScaledBlockSizes,
                                                       MosaicW4A4BlockSizes)

IMPLEMENTATIONS = ("mosaic_gpu", "pallas_gpu", "pallas_tpu", "xla_dequant", "xla")

# W4A16 / W8A16 on a GPU: above this many tokens XLA's dequantize-then-dot wins. Pallas'
# Triton lowering cannot keep a float accumulator in the wgmma registers (it emits
# `acc + dot(a, b, 0)`, which Triton does not fold for floats), so each group's product
# waits for its wgmma; measured on an H200 (bench/results/quantized_matmul.md): the
# kernel leads up to M = 256 and trails from M = 1024.
WEIGHT_ONLY_GPU_MAX_M = 256

# The block-size types of the Mosaic GPU kernels, by op.
MOSAIC_BLOCK_SIZES = {"weight_only_matmul": MosaicBlockSizes,
                      "w4a4_matmul": MosaicW4A4BlockSizes,
                      "int8_matmul": MosaicScaledBlockSizes, "fp8": MosaicScaledBlockSizes}

# Symmetric W4A16 through Mosaic GPU on an H200 (quantized_matmul.md, runs 14, 19, 21, 53):
# with the register unpack 1.79-2.43x XLA bf16 (GPU time, run 53) and 1.2-1.7x the Triton
# kernel at M = 1-16 on 14336x4096, 4096x14336 and 28672x8192, slower on 4096x4096 (runs
# 11, 18-19). So it goes
# first for up to MOSAIC_W4A16_MAX_M tokens on weights of at least MOSAIC_W4A16_MIN_WEIGHTS
# codes; elsewhere it would need `implementation=`.
MOSAIC_W4A16_MAX_M = 16
MOSAIC_W4A16_MIN_WEIGHTS = 1 << 25
# Atom W4A4 through Mosaic GPU: 2.3-2.6x the Triton kernel at M = 1024 and 4096 (run 17),
# 2.2-5.9x at M = 1-16 with the product on the W4A16 kernel (run 55), so it goes first on
# a GPU; a case it does not serve falls through to Triton. The cost of
# the Mosaic GPU kernels is compile time: the first forward of 4 Llama-3-8B layers took
# 6.9 s against Triton's 1.9 s (quantized_model.md, model_i; 42.5 s before the Mosaic
# entry points were jitted, which shares their lowering across identical call sites).

# W8A8 and FP8 through Mosaic GPU (TMA ring, two wgmma warpgroups, one program per SM) on
# an H200 (quantized_matmul.md, runs 15-16): int8 1.9-2.35x XLA bf16 at M = 2048-4096 on
# all four Llama-3-8B shapes (the Triton kernel: 1.55-1.77x) and 1.76-1.99x at M = 1024;
# fp8 1.01-1.24x XLA's own fp8 dot at M = 2048-4096, 0.92-1.06x at 1024. Below that its
# 256-token tiles waste work (M = 64: 0.5-0.9x bf16), so it goes first from these M on.
MOSAIC_INT8_MIN_M = 1024
MOSAIC_FP8_MIN_M = 2048

# FP8 on a GPU: Pallas' Triton lowering emits its fp8 dot without `maxNumImpreciseAcc`,
# and Triton then upcasts both operands to fp16 (mma.sync HMMA instead of fp8 wgmma; seen
# in the SASS of jax 0.10.2 + Triton 3.6), so for large M XLA's own fp8 dot (on the fp8
# tensor cores) is 2.5x faster; at small M, where both are memory-bound, the kernel's
# fused rescale wins (1.07-1.22x on an H200).
FP8_GPU_MAX_M = 64


def _order(op: str, implementation, m: int, weights: int) -> tuple[str, ...]:
  """The implementations to try for `op` with `m` tokens and `weights` = N x K."""
  if implementation is None:
    backend = jax.default_backend()
    if op == "fp8" and backend == "gpu":
      if m >= MOSAIC_FP8_MIN_M:
        return ("mosaic_gpu", "xla")
      return ("pallas_gpu", "xla") if m <= FP8_GPU_MAX_M else ("xla",)
    if op == "int8_matmul" and backend == "gpu" and m >= MOSAIC_INT8_MIN_M:
      return ("mosaic_gpu", "pallas_gpu", "xla")
    if op == "weight_only_matmul" and backend == "gpu":
      if m > WEIGHT_ONLY_GPU_MAX_M:
        return ("xla_dequant", "xla")
      mosaic = m <= MOSAIC_W4A16_MAX_M and weights >= MOSAIC_W4A16_MIN_WEIGHTS
      return ("mosaic_gpu",) * mosaic + ("pallas_gpu", "xla_dequant", "xla")
    if op == "w4a4_matmul" and backend == "gpu":
      return ("mosaic_gpu", "pallas_gpu", "xla")
    return backend_order()
  return requested_order(implementation, IMPLEMENTATIONS)


def _dispatch(op: str, fns: dict[str, Callable], implementation, block_sizes, interpret,
              *args, **kwargs):
  """args[0] is the activations [M, ...] and args[2] the weights [N, ...] of every op."""
  order = _order(op, implementation, m=args[0].shape[0],
                 weights=args[2].shape[0] * args[0].shape[1])
  return call_first(op, order, fns, args, kwargs, block_sizes=block_sizes,
                    interpret=interpret, gpu_type=BlockSizes, tpu_type=TpuBlockSizes,
                    mosaic_type=MOSAIC_BLOCK_SIZES.get(op))


def weight_only_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array,
                       zeros: jax.Array | None = None, *, bits: int, group_size: int,
                       implementation: str | Sequence[str] | None = None,
                       block_sizes: BlockSizes | TpuBlockSizes | MosaicBlockSizes | None = None,
                       interpret: Any = False) -> jax.Array:
  """W4A16 / W8A16: x [M, K] (bf16/f32) @ dequant(codes [N, K(/2)]).T -> [M, N] in x.dtype.

  Args:
    x: activations [M, K].
    codes: int8 (symmetric) or uint8 (asymmetric) [N, K // 2] for bits=4 (two codes per
      byte, "group_halves" order), [N, K] for bits=8.
    scales: float32 [N, K // group_size].
    zeros: float32 [N, K // group_size] zero points for asymmetric codes, else None.
    bits: 4 or 8.
    group_size: input channels per scale.
    implementation, block_sizes, interpret: see the module docstring.
  """
  fns = {"mosaic_gpu": mosaic_gpu.weight_only_matmul, "pallas_gpu": gpu.weight_only_matmul,
         "pallas_tpu": tpu.weight_only_matmul,
         "xla_dequant": reference.weight_only_matmul_dequant_dot,
         "xla": reference.weight_only_matmul}
  return _dispatch("weight_only_matmul", fns, implementation, block_sizes, interpret,
                   x, codes, scales, zeros, bits=bits, group_size=group_size)


def int8_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, *, out_dtype=jnp.bfloat16,
                implementation: str | Sequence[str] | None = None,
                block_sizes: BlockSizes | TpuBlockSizes | MosaicScaledBlockSizes | None = None,
                interpret: Any = False) -> jax.Array:
  """W8A8: int8 [M, K] x int8 [N, K] (contraction minor) -> [M, N], int32 accumulation,
  rescaled by x_scales [M, 1] (per token) and w_scales [N, 1] (per channel)."""
  fns = {"mosaic_gpu": mosaic_gpu.int8_matmul, "pallas_gpu": gpu.int8_matmul,
         "pallas_tpu": tpu.int8_matmul, "xla": reference.int8_matmul}
  return _dispatch("int8_matmul", fns, implementation, block_sizes, interpret,
                   x_codes, x_scales, w_codes, w_scales, out_dtype=out_dtype)


def fp8_matmul(x: jax.Array, x_scales: jax.Array, w: jax.Array, w_scales: jax.Array, *,
               out_dtype=jnp.bfloat16, implementation: str | Sequence[str] | None = None,
               block_sizes: BlockSizes | MosaicScaledBlockSizes | None = None,
               interpret: Any = False) -> jax.Array:
  """FP8 (e4m3) W8A8: x [M, K] x w [N, K] -> [M, N], fp32 accumulation, per-token and
  per-channel scales [M, 1] and [N, 1]."""
  fns = {"mosaic_gpu": mosaic_gpu.fp8_matmul, "pallas_gpu": gpu.fp8_matmul,
         "xla": reference.fp8_matmul}
  return _dispatch("fp8", fns, implementation, block_sizes, interpret,
                   x, x_scales, w, w_scales, out_dtype=out_dtype)


def w4a4_matmul(x_codes: jax.Array, x_scales: jax.Array, w_codes: jax.Array,
                w_scales: jax.Array, x_out: jax.Array | None = None,
                x_out_scales: jax.Array | None = None, w_out: jax.Array | None = None,
                w_out_scales: jax.Array | None = None, *, group_size: int = 128,
                out_dtype=jnp.bfloat16, implementation: str | Sequence[str] | None = None,
                block_sizes: BlockSizes | TpuBlockSizes | MosaicW4A4BlockSizes | None = None,
                interpret: Any = False) -> jax.Array:
  """Atom W4A4: packed 4-bit activations x_codes [M, K_main/2] and weights w_codes
  [N, K_main/2] with group scales [M, G] and [N, G] (G = K_main / group_size), plus the
  optional int8 outlier tail x_out [M, n_out], w_out [N, n_out] with scales [M,1], [N,1]."""
  fns = {"mosaic_gpu": mosaic_gpu.w4a4_matmul, "pallas_gpu": gpu.w4a4_matmul,
         "pallas_tpu": tpu.w4a4_matmul, "xla": reference.w4a4_matmul}
  return _dispatch("w4a4_matmul", fns, implementation, block_sizes, interpret,
                   x_codes, x_scales, w_codes, w_scales, x_out, x_out_scales, w_out,
                   w_out_scales, group_size=group_size, out_dtype=out_dtype)
