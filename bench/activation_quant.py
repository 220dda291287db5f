"""The activation quantizer, and W8A8 linears end to end, on the GPU.

In one process on one GPU (METHOD.md):
  1. ceilings: HBM bandwidth (device copy) and the bf16 matmul rate at 8192^3, measured;
  2. correctness: the Pallas-GPU quantizer against `reference.py` on fresh random inputs,
     codes and scales compared bit for bit (the kernel's div.rn / round-half-even path runs
     only here, never in the CPU tests);
  3. the quantizer alone, Pallas vs the reference under jit (XLA), bf16 x, for M in
     {1, 16, 256, 4096} and K in {4096, 14336}: "int8_token" (W8A8's per-token int8) and
     "atom" (4-bit groups of 128 with clip 0.9, perm, 128-channel int8 tail); the fraction
     of ceiling is (bytes read + written) / measured HBM bandwidth / time;
  4. W8A8 per linear: Pallas quantizer + `quantized_matmul.int8_matmul` (its default
     dispatch) vs XLA's bf16 dot (NT layout), M in {16, 256, 4096}, N x K in {4096 x 4096,
     14336 x 4096}; the ceiling is the larger of bytes / bandwidth and FLOPs / (2 x the
     measured bf16 rate);
  5. `--only norm`: the quantizer fused with the RMSNorm before it (int8 per token,
     K = 4096, M in {1, 16, 256, 4096}): the Pallas kernel's fused norm
     (`rms_norm_weight=`), XLA's norm then the Pallas quantizer, and XLA's norm and
     quantizer (one XLA fusion) -- the baseline.
Timing: `bench.quantized_matmul.time_op` (one jitted call over rotating buffer sets that
exceed L2, several calls per sample, median after warm-up). One DESIGN.md line per
measurement in <out>/activation_quant.jsonl.

Usage (GPU):  PYTHONUNBUFFERED=1 python3 -m bench.activation_quant --out $OUT
CPU smoke test on tiny shapes (interpret mode):  python3 -m bench.activation_quant --cpu-smoke
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

from bench import common
from bench.quantized_matmul import NT, rotations, time_op
from pallas_kernels.activation_quant import gpu
from pallas_kernels.activation_quant import reference
from pallas_kernels.quantized_matmul import api as quantized_matmul

BENCH = "activation_quant"

# name -> quantizer settings (perm is drawn per K when "perm" is set)
QUANTIZERS = {
    "int8_token": dict(bits=8),
    "atom": dict(bits=4, group_size=128, clip_ratio=0.9, num_outliers=128, perm=True),
}


def _key(*ids):
  return jax.random.fold_in(jax.random.key(20261128), hash(ids) % (1 << 30))


def rand_x(m, k, i):
  """bf16 [m, k] with uneven channel scales (never zeros)."""
  chan = jax.random.uniform(_key("chan", k), (k,), jnp.float32, 0.1, 4.0)
  return (jax.random.normal(_key("x", m, k, i), (m, k), jnp.float32) * chan).astype(
      jnp.bfloat16)


def quantizer_kwargs(name, k):
  kw = dict(QUANTIZERS[name])
  if kw.pop("perm", False):
    kw["perm"] = jax.random.permutation(_key("perm", k), k).astype(jnp.int32)
  return kw


def quantizer_bytes(m, k, kw):
  """HBM bytes the op must move: x in, codes and scales out (and the perm)."""
  n_out = kw.get("num_outliers", 0)
  k_main = k - n_out
  g = kw.get("group_size") or k_main
  codes = m * k_main // (2 if kw["bits"] == 4 else 1)
  return 2 * m * k + codes + 4 * m * (k_main // g) + m * n_out + 4 * m * (n_out > 0) + (
      4 * k if "perm" in kw else 0)


class Bench:

  def __init__(self, args):
    self.smoke = args.cpu_smoke
    self.iters = 2 if self.smoke else args.iters
    os.makedirs(args.out, exist_ok=True)
    self.writer = common.ResultWriter(os.path.join(args.out, f"{BENCH}.jsonl"), BENCH,
                                      card="cpu-interpret" if self.smoke else None)
    self.failures = []
    self.quant = functools.partial(gpu.quantize_activations, interpret=self.smoke)
    self.ms = (1, 5) if self.smoke else (1, 16, 256, 4096)
    self.ks = (256,) if self.smoke else (4096, 14336)
    self.linear_ms = (5,) if self.smoke else (16, 256, 4096)
    self.linear_nk = ((128, 256),) if self.smoke else ((4096, 4096), (14336, 4096))

  def ceilings(self):
    if self.smoke:
      self.bw, self.rate = 1e11, 1e12
      return
    bw, mm = common.measure_ceilings(self.writer.card)
    self.bw, self.rate = bw["bytes_per_s"], mm["flops_per_s"]

  def check(self):
    """Codes and scales of the Pallas kernel equal the reference's, bit for bit."""
    for name in QUANTIZERS:
      for m, k in ((5, 4096), (300, 14336)) if not self.smoke else ((5, 256),):
        kw = quantizer_kwargs(name, k)
        x = rand_x(m, k, 0)
        got = self.quant(x, **kw)
        want = reference.quantize_activations(x, **kw)
        bad = sum(int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(got),
                                                       jax.tree.leaves(want)))
        print(f"check {name:10s} M={m:5d} K={k:6d}: {bad} values differ", flush=True)
        if bad:
          self.failures.append(f"check {name} M={m} K={k}: {bad} values differ")

  def quantizer(self):
    for name in QUANTIZERS:
      for k in self.ks:
        kw = quantizer_kwargs(name, k)
        for m in self.ms:
          nbytes = quantizer_bytes(m, k, kw)
          r = 2 if self.smoke else rotations(nbytes)
          sets = [(rand_x(m, k, i),) for i in range(r)]
          ours, _ = time_op(lambda x: self.quant(x, **kw), sets, iters=self.iters)
          base, _ = time_op(lambda x: reference.quantize_activations(x, **kw), sets,
                            iters=self.iters)
          frac = nbytes / self.bw * 1e3 / ours
          case = dict(op="quantize", quantizer=name, m=m, k=k, dtype="bfloat16")
          self.writer.add(case=case, impl="pallas_gpu", baseline_impl="xla_reference",
                          median_ms=ours, baseline_median_ms=base,
                          fraction_of_ceiling=frac, ceiling="HBM (measured copy)",
                          bytes_moved=nbytes)
          print(f"quantize {name:10s} M={m:5d} K={k:6d} {ours * 1e3:9.1f} us vs XLA "
                f"{base * 1e3:9.1f} us  x{base / ours:.2f}  HBM {frac:.2f}", flush=True)

  def fused_norm(self):
    """RMSNorm + int8 per-token quantization: where does fusing them pay?"""
    k = self.ks[0]
    norm_w = jax.random.uniform(_key("norm", k), (k,), jnp.float32, 0.5, 1.5).astype(
        jnp.bfloat16)
    impls = {
        "pallas_fused_norm": lambda x: self.quant(x, bits=8, rms_norm_weight=norm_w),
        "xla_norm+pallas": lambda x: self.quant(reference.rms_norm(x, norm_w, 1e-6), bits=8),
    }
    baseline = lambda x: reference.quantize_activations(x, bits=8, rms_norm_weight=norm_w)
    for m in self.ms:
      nbytes = quantizer_bytes(m, k, dict(bits=8))
      r = 2 if self.smoke else rotations(nbytes)
      sets = [(rand_x(m, k, i),) for i in range(r)]
      base, _ = time_op(baseline, sets, iters=self.iters)
      for name, fn in impls.items():
        t, _ = time_op(fn, sets, iters=self.iters)
        case = dict(op="rmsnorm+quantize", quantizer="int8_token", m=m, k=k,
                    dtype="bfloat16")
        self.writer.add(case=case, impl=name, baseline_impl="xla_norm+xla_quantize",
                        median_ms=t, baseline_median_ms=base,
                        fraction_of_ceiling=nbytes / self.bw * 1e3 / t,
                        ceiling="HBM (measured copy)", bytes_moved=nbytes)
        print(f"norm+quantize {name:18s} M={m:5d} K={k:6d} {t * 1e3:9.1f} us vs XLA "
              f"{base * 1e3:9.1f} us  x{base / t:.2f}", flush=True)

  def w8a8_linear(self):
    impl = dict(interpret=True) if self.smoke else {}

    def ours(x, w_codes, w_scales):
      a = self.quant(x, bits=8)
      return quantized_matmul.int8_matmul(a.codes, a.scales, w_codes, w_scales, **impl)

    def bf16(x, w):
      return jax.lax.dot_general(x, w, NT, preferred_element_type=jnp.float32).astype(
          jnp.bfloat16)

    for n, k in self.linear_nk:
      for m in self.linear_ms:
        io = 2 * m * k + 2 * m * n
        r = 2 if self.smoke else rotations(n * k + io)
        rb = 2 if self.smoke else rotations(2 * n * k + io)
        w8 = [(jax.random.randint(_key("w8", n, k, i), (n, k), -127, 128).astype(jnp.int8),
               jax.random.uniform(_key("ws", n, i), (n, 1), jnp.float32, 1e-3, 2e-3))
              for i in range(r)]
        wb = [jax.random.normal(_key("wb", n, k, i), (n, k), jnp.bfloat16)
              for i in range(rb)]
        t_ours, _ = time_op(ours, [(rand_x(m, k, i), *w8[i]) for i in range(r)],
                            iters=self.iters)
        t_base, _ = time_op(bf16, [(rand_x(m, k, i), wb[i]) for i in range(rb)],
                            iters=self.iters)
        flops = 2 * m * n * k
        nbytes = n * k + io + 4 * n
        roof = max(nbytes / self.bw, flops / (2 * self.rate)) * 1e3
        case = dict(op="w8a8_linear", m=m, n=n, k=k, dtype="bfloat16")
        self.writer.add(case=case, impl="pallas_gpu quantize + int8_matmul",
                        baseline_impl="xla_bf16_dot", median_ms=t_ours,
                        baseline_median_ms=t_base, fraction_of_ceiling=roof / t_ours,
                        ceiling="max(bytes / measured HBM, FLOPs / 2x measured bf16)")
        print(f"w8a8   M={m:5d} N={n:6d} K={k:6d} {t_ours * 1e3:9.1f} us vs bf16 "
              f"{t_base * 1e3:9.1f} us  x{t_base / t_ours:.2f}  ceil {roof / t_ours:.2f}",
              flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--iters", type=int, default=30)
  parser.add_argument("--only", default="check,quantize,w8a8",
                      help="sections to run: check, quantize, w8a8, norm")
  parser.add_argument("--cpu-smoke", action="store_true",
                      help="tiny shapes, kernels in interpret mode, on the CPU")
  args = parser.parse_args(argv)
  if args.cpu_smoke and args.out == parser.get_default("out"):
    args.out = "/tmp/bench_activation_quant_smoke"
  bench = Bench(args)
  bench.ceilings()
  sections = {"check": bench.check, "quantize": bench.quantizer, "w8a8": bench.w8a8_linear,
              "norm": bench.fused_norm}
  for name in args.only.split(","):
    common.guarded(name, sections[name], bench.failures)
  for failure in bench.failures:
    print("FAILED:", failure, file=sys.stderr)
  return 1 if bench.failures else 0


if __name__ == "__main__":
  sys.exit(main())
