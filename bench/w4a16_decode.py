"""Batch-1 decode with W4A16 weights (QTensor leaves, Pallas kernel) against bf16, one process.

The model is the float baseline's Llama-3-8B shape with random bf16 weights; the W4A16
state replaces every attention/MLP linear weight by a 4-bit symmetric group-128 QTensor at
the same path (RTN; embeddings and lm_head stay bf16), so the same compiled decode loop
runs both. First a correctness check on the device: the quantized model's logits against
the same model with the dequantized weights as dense bf16 arrays.

`--variants` also times the same W4A16 state with the decode matmuls routed differently
(an experiment on where a step's time goes; each variant swaps one default in this process
only and re-traces): "one_launch" (the Pallas kernel without split-K: no zero-filled fp32
buffer, no atomics, bf16 written directly), "one_launch_bn32" (the same with 32-wide tiles,
twice the programs), "xla_dequant" (XLA's dequantize-then-dot for every M), "triton" (the
Pallas-Triton kernel where the default puts the Mosaic GPU one first).

  python -m bench.w4a16_decode [--tiny] [--variants [NAME,...]] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from bench.float_baseline import build_on_device, llama3_8b_config, tiny_config
from lowbit.qtensor import QTensor, dequantize
from lowbit.quantize import quantize_weight
from models.generate import Sampling, _decode_loop
from pallas_kernels.quantized_matmul import api as qmm_api
from pallas_kernels.quantized_matmul import config as qmm_config

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_linears(state, group_size: int):
  """Replaces every attention/MLP linear weight of `state` in place by a W4 QTensor."""
  for path, variable in nnx.to_flat_state(state):
    if path[-1] == "weight" and path[-2] in LINEARS:
      variable.set_value(quantize_weight(variable.get_value(), bits=4, group_size=group_size,
                                         symmetric=True))
  return common.block(state)


def dequantized(state):
  """A copy of `state` with every QTensor replaced by its dense bf16 weight."""
  return jax.tree.map(lambda leaf: dequantize(leaf).astype(jnp.bfloat16)
                      if isinstance(leaf, QTensor) else leaf, state,
                      is_leaf=lambda leaf: isinstance(leaf, QTensor))


def decode_ms_per_step(graphdef, state, config, *, context: int, steps: int) -> list[float]:
  cache = tuple(
      type(layer_cache)(jnp.ones_like(layer_cache.k) * 0.01, jnp.ones_like(layer_cache.v) * 0.01)
      for layer_cache in nnx.merge(graphdef, state).init_cache(1, context + steps))
  token = jnp.ones((1,), jnp.int32)
  holder = {"cache": cache}

  def call():
    tokens, holder["cache"] = _decode_loop(graphdef, state, token, holder["cache"],
                                           jnp.int32(context), jax.random.key(0), steps,
                                           Sampling())
    return tokens

  return [t / steps for t in common.time_calls(call, warmup=2, iters=5)]


def decode_variant(name: str):
  """Within the block, W4A16 decode matmuls run as variant `name` (see the docstring)."""
  default_rule = qmm_config._weight_only_default

  def one_launch(block_n):
    def rule(m, n, k, g, bits):
      bs = default_rule(m, n, k, g, bits)
      return dataclasses.replace(bs, split_k=1, block_n=block_n) if m <= 16 else bs
    return rule

  if name == "one_launch":
    return common.patched((qmm_config, "_weight_only_default", one_launch(64)))
  if name == "one_launch_bn32":
    return common.patched((qmm_config, "_weight_only_default", one_launch(32)))
  if name == "xla_dequant":
    return common.patched((qmm_api, "WEIGHT_ONLY_GPU_MAX_M", 0))
  if name == "triton":
    return common.patched((qmm_api, "MOSAIC_W4A16_MAX_M", 0))
  raise ValueError(f"unknown decode variant {name!r}")


VARIANTS = ("one_launch", "one_launch_bn32", "xla_dequant", "triton")


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny config")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  parser.add_argument("--variants", nargs="?", const=",".join(VARIANTS), default="",
                      help="also time these VARIANTS (comma-separated; all if no value)")
  args = parser.parse_args(argv)
  config = tiny_config() if args.tiny else llama3_8b_config()
  group = 32 if args.tiny else 128
  steps, context = (8, 16) if args.tiny else (128, 512)

  graphdef, state = build_on_device(config)
  bw = common.measure_hbm_bandwidth(64 << 20 if args.tiny else 2 << 30)
  bf16 = decode_ms_per_step(graphdef, state, config, context=context, steps=steps)
  print(f"bf16 decode: {common.median(bf16):.3f} ms/step", flush=True)

  state = quantize_linears(state, group)
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, config.vocab_size)
  dense_logits, _ = nnx.merge(graphdef, dequantized(state))(tokens)

  def logits_rel_error():
    """The W4A16 model's logits against the same weights dequantized to dense bf16."""
    quantized_logits, _ = nnx.merge(graphdef, state)(tokens)
    return float(jnp.linalg.norm(quantized_logits - dense_logits)
                 / jnp.linalg.norm(dense_logits))

  # A step reads every parameter except the embedding table (one row of it).
  weight_bytes = (sum(leaf.nbytes for leaf in jax.tree.leaves(state))
                  - nnx.merge(graphdef, state).embed.embedding.get_value().nbytes)
  roofline_ms = weight_bytes / (bw["bytes_per_s"]) * 1e3
  ms_bf16 = common.median(bf16)
  variants = ("default",) + tuple(v for v in args.variants.split(",") if v)
  for variant in variants:
    context_manager = (contextlib.nullcontext() if variant == "default"
                       else decode_variant(variant))
    with context_manager:
      rel = logits_rel_error()
      w4 = decode_ms_per_step(graphdef, state, config, context=context, steps=steps)
    ms_w4 = common.median(w4)
    print(f"W4A16 {variant}: {ms_w4:.3f} ms/step ({ms_bf16 / ms_w4:.2f}x bf16), logits vs "
          f"dequantized-dense bf16: relative error {rel:.2e}", flush=True)
    record = {
        "bench": "w4a16_decode",
        "case": {"model": "llama3-8b-shape" if not args.tiny else "tiny", "batch": 1,
                 "context": context, "steps": steps, "group_size": group},
        "impl": "lowbit W4A16 QTensor (pallas_kernels weight_only_matmul)"
                + ("" if variant == "default" else f", variant {variant}"),
        "baseline_impl": "bf16 dense (same decode loop)", "card": common.card_name(),
        "jax_version": jax.__version__, "median_ms": ms_w4, "baseline_median_ms": ms_bf16,
        "ratio_vs_baseline": ms_bf16 / ms_w4, "tokens_per_s": 1e3 / ms_w4,
        "fraction_of_ceiling": roofline_ms / ms_w4,
        "ceiling": f"W4A16 weight bytes read per step / {bw['bytes_per_s'] / 1e12:.2f} TB/s "
                   "measured copy",
        "logits_rel_error_vs_dequantized": rel, "spread": common.spread(w4),
        "date": datetime.date.today().isoformat(), "commit": common.git_commit()}
    print(json.dumps(record), flush=True)
    with open(os.path.join(args.out, "w4a16_decode.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
  main()
