"""Whole quantized models on the GPU: W8A8 and Atom's W4A4 through the integer kernels, and
W4A16, against bf16, in one process.

The model is the float baseline's Llama-3-8B shape with random bf16 weights. Each format
replaces every attention/MLP linear weight by a QTensor at the same path (RTN; embeddings
and lm_head stay bf16), as its recipe stores it:
  w8a8   int8 per output channel, activations int8 per token (`integer_format` "w8a8":
         `activation_quant` + `int8_matmul` on a GPU);
  w4a4   Atom's layout: a channel permutation (random here: a calibrated one costs the
         same), 4-bit groups of 128, the last 128 channels of the order an int8 tail,
         activations 4-bit per group ("w4a4": `activation_quant` + `w4a4_matmul`);
  w4a16  4-bit groups of 128, bf16 activations (`weight_only_matmul`).
For each format, on the device:
  1. correctness: last-position logits of 64-token prompts (--check-batch of them) through
     the kernels, against the same QTensors through the simulation (`simulation_only`:
     dequantized weights, fake-quantized activations, XLA dots), the path every accuracy
     result of the library was measured with;
  2. prefill: 2048-token prompts at batch 1 and 4 (cache-less forward, last-position
     logits), tokens/s against bf16;
  3. decode: ms per step of the compiled decode loop at batch 1 (512 tokens of cache).
Lines in <out>/quantized_model.jsonl (DESIGN.md format); a summary table on stdout.

`--variants` adds rows for a format run with one dispatch default swapped in this process
(an experiment on where the time goes): "w8a8/xla_quantizer" quantizes activations with
the XLA reference, which XLA fuses into the ops before it (the RMSNorm, the residual add),
instead of the Pallas kernel (one more launch per linear); "w4a4/w4a4_kernels_at_decode"
runs a few tokens on the W4A4 kernels' 64-token tiles (the default before run 55) instead
of the W4A16 kernel; "w4a4/triton",
"w4a16/triton" and "w8a8/triton" run the Pallas-Triton matmul where the default runs the
Mosaic GPU one; "w4a16/direct_scales" runs the Mosaic GPU W4A16 kernel with
`direct_scales` (no XLA transpose of the scales).

  python -m bench.quantized_model [--tiny] [--formats w8a8,w4a4,w4a16]
                                  [--variants [NAME,...]] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from bench.float_baseline import build_on_device, llama3_8b_config, tiny_config
from bench.w4a16_decode import LINEARS, decode_ms_per_step
from lowbit import nn as lowbit_nn
from lowbit.quantize import quantize_weight
from pallas_kernels.activation_quant import api as act_quant_api
from pallas_kernels.quantized_matmul import api as qmm_api
from pallas_kernels.quantized_matmul import mosaic_gpu

BENCH = "quantized_model"
FORMATS = ("w8a8", "w4a4", "w4a16")


def quantize_format(w: jax.Array, fmt: str, group: int, n_out: int, seed: int):
  """The QTensor of weight w [N, K] in format `fmt` (see the module docstring)."""
  if fmt == "w8a8":
    return quantize_weight(w, bits=8, group_size=None, symmetric=True, act_quant="int8_token")
  if fmt == "w4a4":
    perm = jax.random.permutation(jax.random.key(seed), w.shape[1]).astype(jnp.int32)
    return quantize_weight(w, bits=4, group_size=group, symmetric=True, num_outliers=n_out,
                           perm=perm, act_quant="int4_group")
  if fmt == "w4a16":
    return quantize_weight(w, bits=4, group_size=group, symmetric=True)
  raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def quantized_state(state, fmt: str, group: int, n_out: int):
  """A copy of `state` with every attention/MLP linear weight quantized to `fmt`."""
  state = jax.tree.map(lambda leaf: leaf, state)  # new containers, same arrays
  for i, (path, variable) in enumerate(nnx.to_flat_state(state)):
    if path[-1] == "weight" and path[-2] in LINEARS:
      variable.set_value(quantize_format(variable.get_value(), fmt, group, n_out, seed=i))
  return common.block(state)


def simulation_only():
  """Within the block `qtensor_linear` runs no kernel: W8A8 / W4A4 QTensors are simulated
  and weight-only ones take the XLA reference (dequantize, f32 dot)."""
  return common.patched(
      (lowbit_nn, "integer_format", lambda q: None),
      (qmm_api, "weight_only_matmul",
       functools.partial(qmm_api.weight_only_matmul, implementation="xla")))


def xla_quantizer():
  """Within the block the activation quantizer runs its XLA reference on every backend."""
  return common.patched((act_quant_api, "backend_order", lambda: ("xla",)))


class _DirectScalesBlockSizes(mosaic_gpu.MosaicBlockSizes):
  """The default Mosaic GPU W4A16 tiling with `direct_scales` (for w4a16/direct_scales)."""

  @classmethod
  def get_default(cls, n, k, group_size=128):
    return dataclasses.replace(super().get_default(n, k, group_size), direct_scales=True)


class _SplitK8BlockSizes(mosaic_gpu.MosaicBlockSizes):
  """The default Mosaic GPU W4A16 tiling with split-K 8 wherever whole steps allow it
  (the default before run 52; for w4a16/split_k8)."""

  @classmethod
  def get_default(cls, n, k, group_size=128):
    bs = super().get_default(n, k, group_size)
    if bs.groups_per_step == 2 and (k // group_size) % 16 == 0:
      return dataclasses.replace(bs, split_k=8)
    return bs


VARIANTS = {"w8a8/xla_quantizer": ("w8a8", xla_quantizer),
            "w4a4/triton": ("w4a4", lambda: common.patched(
                (lowbit_nn, "W4A4_KERNELS", {**lowbit_nn.W4A4_KERNELS, "gpu": ("pallas_gpu",)}))),
            "w4a4/w4a4_kernels_at_decode": ("w4a4", lambda: common.patched(
                (mosaic_gpu, "W4A4_DECODE_MAX_M", 0))),
            "w4a16/triton": ("w4a16", lambda: common.patched((qmm_api, "MOSAIC_W4A16_MAX_M", 0))),
            "w4a16/direct_scales": ("w4a16", lambda: common.patched(
                (mosaic_gpu, "MosaicBlockSizes", _DirectScalesBlockSizes))),
            "w4a16/split_k8": ("w4a16", lambda: common.patched(
                (mosaic_gpu, "MosaicBlockSizes", _SplitK8BlockSizes))),
            "w8a8/triton": ("w8a8", lambda: common.patched(
                (qmm_api, "MOSAIC_INT8_MIN_M", float("inf"))))}


@functools.partial(jax.jit, static_argnums=0)
def last_logits(graphdef, state, tokens):
  """Last-position logits [B, V] (f32) of a cache-less forward."""
  model = nnx.merge(graphdef, state)
  hidden, _ = model.hidden_states(tokens)
  return model.logits(hidden[:, -1]).astype(jnp.float32)


def prefill_ms(graphdef, state, tokens, iters: int) -> tuple[float, float]:
  samples = common.time_calls(lambda: last_logits(graphdef, state, tokens), warmup=1,
                              iters=iters)
  return common.median(samples), common.spread(samples)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny config")
  p.add_argument("--formats", default=",".join(FORMATS))
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--check-batch", type=int, default=2,
                 help="sequences of 64 tokens in the logits check (16: M = 1024, where "
                      "W8A8 takes the Mosaic GPU kernel)")
  p.add_argument("--layers", type=int, default=None,
                 help="decoder layers (default: the model's; fewer for a quicker run)")
  p.add_argument("--variants", nargs="?", const=",".join(VARIANTS), default="",
                  help="also time these VARIANTS (comma-separated; all if no value)")
  args = p.parse_args(argv)
  formats = args.formats.split(",")
  runs = [(fmt, fmt, contextlib.nullcontext) for fmt in formats]
  for name in filter(None, args.variants.split(",")):
    if name not in VARIANTS:
      raise SystemExit(f"--variants: unknown variant {name!r}; expected some of "
                       f"{tuple(VARIANTS)}")
    runs.append((name, *VARIANTS[name]))
  for fmt in formats:
    if fmt not in FORMATS:
      raise SystemExit(f"--formats: unknown format {fmt!r}; expected some of {FORMATS}")
  config = tiny_config() if args.tiny else llama3_8b_config()
  if args.layers:
    config = dataclasses.replace(config, num_layers=args.layers,
                                 layer_types=config.layer_types[:args.layers])
  group, n_out = (32, 32) if args.tiny else (128, 128)
  prompt_len, batches, steps, context = ((32, (1, 2), 4, 16) if args.tiny
                                         else (2048, (1, 4), 64, 512))
  writer = common.ResultWriter(os.path.join(args.out, f"{BENCH}.jsonl"), BENCH)
  t0 = time.time()
  graphdef, bf16_state = build_on_device(config)
  check_tokens = jax.random.randint(jax.random.key(1),
                                    (args.check_batch, 64 if not args.tiny else 16), 0,
                                    config.vocab_size)
  prompts = {b: jax.random.randint(jax.random.key(b), (b, prompt_len), 0, config.vocab_size)
             for b in batches}
  base = {("prefill", b): prefill_ms(graphdef, bf16_state, prompts[b], args.iters)[0]
          for b in batches}
  base["decode"] = common.median(decode_ms_per_step(graphdef, bf16_state, config,
                                                    context=context, steps=steps))
  print(f"bf16: prefill {[round(base['prefill', b], 2) for b in batches]} ms, decode "
        f"{base['decode']:.3f} ms/step ({time.time() - t0:.0f} s)", flush=True)
  table = []
  for label, fmt, dispatch in runs:
    state = quantized_state(bf16_state, fmt, group, n_out)
    with dispatch():
      row = run_format(graphdef, state, config, label, fmt, check_tokens, prompts, base,
                       writer, args.iters, prompt_len, context, steps)
    table.append(row)
    print(" | ".join(row) + f"  ({time.time() - t0:.0f} s)", flush=True)
    del state
  print(f"\n{writer.card}, jax {jax.__version__}; bf16: prefill "
        + ", ".join(f"b{b} {base['prefill', b]:.1f} ms" for b in batches)
        + f", decode {base['decode']:.3f} ms/step")
  print("| format | logits rel. err vs simulation | "
        + " | ".join(f"prefill b{b} x {prompt_len}" for b in batches) + " | decode b1 |")
  for row in table:
    print("| " + " | ".join(row) + " |")


def run_format(graphdef, state, config, label, fmt, check_tokens, prompts, base, writer,
               iters, prompt_len, context, steps):
  """Checks and times one quantized state (see the module docstring) -> a table row."""
  start = time.time()
  kernel_logits = common.block(last_logits(graphdef, state, check_tokens))
  first_call_s = time.time() - start  # mostly compilation
  with simulation_only():
    sim_logits = last_logits(graphdef, state, check_tokens)
  err = rel_err(kernel_logits, sim_logits)
  agree = float(jnp.mean(jnp.argmax(kernel_logits, -1) == jnp.argmax(sim_logits, -1)))
  print(f"{label}: kernels vs simulation logits rel. error {err:.2e}, argmax agreement "
        f"{agree:.2f}; first forward (compilation) {first_call_s:.1f} s", flush=True)
  extra = dict(logits_rel_error_vs_simulation=err, argmax_agreement_vs_simulation=agree,
               first_forward_s=round(first_call_s, 1), layers=config.num_layers,
               weight_bytes=sum(x.nbytes for x in jax.tree.leaves(state)))
  impl = f"lowbit {fmt} QTensors" + ("" if label == fmt else f", variant {label}")
  row = [label, f"{err:.1e}"]
  for b, prompt in prompts.items():
    ms, spread = prefill_ms(graphdef, state, prompt, iters)
    writer.add(case={"phase": "prefill", "format": fmt, "batch": b, "tokens": prompt_len},
               impl=impl, baseline_impl="bf16 dense (same model)", median_ms=ms,
               baseline_median_ms=base["prefill", b], fraction_of_ceiling=None,
               ceiling="none (ratio to bf16 only)", tokens_per_s=b * prompt_len / ms * 1e3,
               spread=spread, **extra)
    row.append(f"{ms:.1f} ms ({base['prefill', b] / ms:.2f}x)")
  ms = common.median(decode_ms_per_step(graphdef, state, config, context=context,
                                        steps=steps))
  writer.add(case={"phase": "decode", "format": fmt, "batch": 1, "context": context,
                   "steps": steps},
             impl=impl, baseline_impl="bf16 dense (same model)", median_ms=ms,
             baseline_median_ms=base["decode"], fraction_of_ceiling=None,
             ceiling="none (ratio to bf16 only)", tokens_per_s=1e3 / ms, **extra)
  row.append(f"{ms:.3f} ms ({base['decode'] / ms:.2f}x)")
  return row


if __name__ == "__main__":
  main()
