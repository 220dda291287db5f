"""Device check of the integer W8A8 / W4A4 path of `lowbit.nn.qtensor_linear`, stage by
stage, at the Llama-3-8B layer shapes.

For each format, layer shape [N, K] and token count M, on random bf16 activations and
random weights quantized as `bench.quantized_model` does:
  quant   the activation quantizer's Pallas kernel against its XLA reference: fraction of
          codes that differ, worst code difference, scales' relative error;
  matmul  the integer matmul's Pallas kernel against its XLA reference on the same
          (Pallas-quantized) inputs: relative error;
  linear  `integer_linear` as `qtensor_linear` dispatches it, and with
          implementation="xla", against the simulation (fake-quantized activations times
          the dequantized weight, XLA dot): relative error.
A correct path differs from the simulation only by float rounding (~1e-3 or less) plus
the codes that land on the other side of a rounding tie.

  python -m bench.integer_path_check [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench.quantized_model import quantize_format
from lowbit import nn as lowbit_nn
from lowbit.qtensor import dequantize
from pallas_kernels.activation_quant import api as activation_quant
from pallas_kernels.quantized_matmul import api as quantized_matmul

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))
TOKENS = (1, 128, 2048)


def rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def quantize(x, q, fmt, implementation):
  if fmt == "w8a8":
    return activation_quant.quantize_activations(x, bits=8, clip_ratio=q.act_clip,
                                                 perm=q.perm, implementation=implementation)
  return activation_quant.quantize_activations(
      x, bits=4, group_size=q.group_size, clip_ratio=q.act_clip, perm=q.perm,
      num_outliers=q.num_outliers, implementation=implementation)


def matmul(a, q, fmt, implementation):
  if fmt == "w8a8":
    return quantized_matmul.int8_matmul(a.codes, a.scales, q.codes, q.scales,
                                        implementation=implementation)
  return quantized_matmul.w4a4_matmul(a.codes, a.scales, q.codes, q.scales, a.outlier_codes,
                                      a.outlier_scales, q.outlier_codes, q.outlier_scales,
                                      group_size=q.group_size, implementation=implementation)


def code_diff(a, b):
  """(fraction of differing bytes, max |difference| of the unpacked codes)."""
  a, b = np.asarray(a).view(np.int8), np.asarray(b).view(np.int8)
  unpack = lambda v: np.stack([(v << 4).astype(np.int8) >> 4, v >> 4], -1)
  return float(np.mean(a != b)), int(np.max(np.abs(unpack(a).astype(int) - unpack(b))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  args = p.parse_args(argv)
  shapes, tokens = (((64, 256), (96, 512)), (1, 33)) if args.tiny else (SHAPES, TOKENS)
  group, n_out = (32, 32) if args.tiny else (128, 128)
  pallas = "pallas_gpu" if jax.default_backend() == "gpu" else "pallas_tpu"
  if args.tiny:  # the CPU: interpret mode stands in for the kernels
    pallas = None
  out = open(os.path.join(args.out, "integer_path_check.jsonl"), "w")  # noqa: SIM115
  for fmt in ("w8a8", "w4a4"):
    for n, k in shapes:
      w = jax.random.normal(jax.random.key(n + k), (n, k), jnp.float32).astype(jnp.bfloat16)
      q = quantize_format(w, fmt, group, n_out, seed=n + k)
      w_sim = dequantize(q, transformed=True)
      for m in tokens:
        x = (jax.random.normal(jax.random.key(m), (m, k), jnp.float32) * 2.0
             ).astype(jnp.bfloat16)
        row = {"format": fmt, "n": n, "k": k, "m": m}
        kw = dict(implementation=pallas) if pallas else dict(implementation="xla")
        a_kernel = quantize(x, q, fmt, **kw)
        a_ref = quantize(x, q, fmt, "xla")
        row["quant_codes_differ"], row["quant_codes_max_step"] = code_diff(a_kernel.codes,
                                                                           a_ref.codes)
        row["quant_scales_rel_err"] = rel_err(a_kernel.scales, a_ref.scales)
        if a_ref.outlier_codes is not None:
          row["tail_codes_differ"] = code_diff(a_kernel.outlier_codes, a_ref.outlier_codes)[0]
        try:
          row["matmul_rel_err"] = rel_err(matmul(a_kernel, q, fmt, **kw),
                                          matmul(a_kernel, q, fmt, "xla"))
        except NotImplementedError as e:
          row["matmul_rel_err"] = f"not served: {e}"[:160]
        sim = lowbit_nn.linear(lowbit_nn._fake_quantize_input(x, q), w_sim)
        row["linear_dispatch_vs_sim"] = rel_err(lowbit_nn.qtensor_linear(x, q), sim)
        row["linear_xla_vs_sim"] = rel_err(
            lowbit_nn.integer_linear(x, q, implementation="xla"), sim)
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(" ".join(f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
                       for key, val in row.items()), flush=True)


if __name__ == "__main__":
  main()
