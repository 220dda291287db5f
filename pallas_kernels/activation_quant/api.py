"""The activation quantizer: the dispatcher over the Pallas kernels and the XLA reference,
by the rules of `pallas_kernels.dispatch` (implementation=, block_sizes=, interpret=). Bad
shapes, dtypes or settings raise ValueError naming the argument before any implementation
runs.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from pallas_kernels.activation_quant import gpu
from pallas_kernels.activation_quant import reference
from pallas_kernels.activation_quant import tpu
from pallas_kernels.activation_quant.config import BlockSizes, TpuBlockSizes
from pallas_kernels.activation_quant.reference import QuantizedActivations
from pallas_kernels.dispatch import backend_order, call_first, requested_order

IMPLEMENTATIONS = ("pallas_gpu", "pallas_tpu", "xla")

# By default a permuted input of more rows than this skips the GPU kernel: its gathered
# 2-byte loads make it slower than XLA there (H200, K = 4096 / 14336, M = 4096: 0.59x /
# 0.34x; faster up to M = 256: bench/results/activation_quant.md).
GPU_PERM_MAX_ROWS = 1024


def quantize_activations(x: jax.Array, *, bits: int, group_size: int | None = None,
                         clip_ratio: float = 1.0, perm: jax.Array | None = None,
                         num_outliers: int = 0, rms_norm_weight: jax.Array | None = None,
                         eps: float = 1e-6,
                         implementation: str | Sequence[str] | None = None,
                         block_sizes: BlockSizes | TpuBlockSizes | None = None,
                         interpret: Any = False) -> QuantizedActivations:
  """Dynamic symmetric per-token activation quantization for the integer matmuls.

  Args:
    x: [M, K] bf16 / f16 / f32 activations, one token per row.
    bits: 8 (codes int8 [M, K_main], for `quantized_matmul.int8_matmul`) or 4 (packed
      int8 [M, K_main / 2] in "group_halves" order, for `quantized_matmul.w4a4_matmul`).
    group_size: channels per scale; None: one scale per token over the main part. Must
      divide K_main = K - num_outliers (and be even for 4 bits).
    clip_ratio: in (0, 1]: scale = clip_ratio * max|x| / (2**(bits-1) - 1) (Atom: 0.9).
    perm: int32 [K]: quantize x[:, perm] (Atom's static channel reorder).
    num_outliers: the last num_outliers channels (after the gather) in int8 per token
      with their own scale, unclipped (Atom's outlier tail).
    rms_norm_weight: [K] (original channel order): RMSNorm x first (x * rsqrt(mean(x^2)
      + eps) * w, rounded to x.dtype); Gemma-style norms pass 1 + w.
    eps: the norm's epsilon.
    implementation, block_sizes, interpret: see the module docstring.

  Returns:
    QuantizedActivations(codes, scales f32 [M, K_main / g], outlier_codes int8
    [M, num_outliers] or None, outlier_scales f32 [M, 1] or None). Dequantized, the
    values equal `lowbit.quantize.fake_quantize` of the (normed, gathered) x with the
    same settings.

  Raises:
    ValueError: bad shapes, dtypes or settings (named argument and value), unknown
      implementation.
    NotImplementedError: no implementation in the requested order serves the case.
  """
  reference.validate_inputs(x, bits=bits, group_size=group_size, clip_ratio=clip_ratio,
                            perm=perm, num_outliers=num_outliers,
                            rms_norm_weight=rms_norm_weight)
  fns = {"pallas_gpu": gpu.quantize_activations, "pallas_tpu": tpu.quantize_activations,
         "xla": reference.quantize_activations}
  names = (backend_order() if implementation is None
           else requested_order(implementation, IMPLEMENTATIONS))
  if implementation is None and perm is not None and x.shape[0] > GPU_PERM_MAX_ROWS:
    names = tuple(name for name in names if name != "pallas_gpu")
  kwargs = dict(bits=bits, group_size=group_size, clip_ratio=float(clip_ratio), perm=perm,
                num_outliers=num_outliers, rms_norm_weight=rms_norm_weight,
                eps=float(eps))
  return call_first("quantize_activations", names, fns, (x,), kwargs,
                    block_sizes=block_sizes, interpret=interpret, gpu_type=BlockSizes,
                    tpu_type=TpuBlockSizes)
