"""Prefill of the Llama-3-8B shape with the library's attention dispatcher: cuDNN flash
attention (the GPU default of `lowbit.attention.causal_self_attention`) against the
reference (materialized scores), in one process, with the logits compared.

Usage (GPU):  PYTHONUNBUFFERED=1 python3 -m bench.prefill_dispatch --out $OUT
CPU smoke test on tiny shapes:  python3 -m bench.prefill_dispatch --tiny  (reference only)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from bench.float_baseline import (build_on_device, llama3_8b_config, prefill_model_flops,
                                  tiny_config)
from lowbit import attention

BENCH = "prefill_dispatch"


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefill_last_logits(graphdef, state, tokens, implementation):
  """Last-position logits of a cache-less forward with the given prefill attention."""
  del implementation  # static: one compilation per dispatcher choice (read at trace time)
  model = nnx.merge(graphdef, state)
  hidden, _ = model.hidden_states(tokens)
  return model.logits(hidden[:, -1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--batches", default="1,8")
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  writer = common.ResultWriter(os.path.join(args.out, f"{BENCH}.jsonl"), BENCH)
  config = tiny_config() if args.tiny else llama3_8b_config()
  tokens_n = 32 if args.tiny else args.tokens
  rate = common.measure_matmul_rate(256 if args.tiny else 8192, iters=5 if args.tiny else 30)
  print(f"{writer.card}, jax {jax.__version__}: matmul {rate['flops_per_s'] / 1e12:.0f} "
        f"TFLOP/s", flush=True)
  graphdef, state = build_on_device(config)
  impls = ["reference"] if jax.default_backend() != "gpu" else ["reference", "cudnn"]
  original = attention._prefill_implementation
  for batch in (int(b) for b in args.batches.split(",")):
    tokens = jax.random.randint(jax.random.key(batch), (batch, tokens_n), 0,
                                config.vocab_size, jnp.int32)
    flops = prefill_model_flops(config, batch, tokens_n)
    logits, ms = {}, {}
    for impl in impls:
      attention._prefill_implementation = lambda q, softcap, impl=impl: impl
      try:
        call = lambda: _prefill_last_logits(graphdef, state, tokens, impl)
        logits[impl] = call()
        samples = common.time_calls(call, warmup=2, iters=8)
      finally:
        attention._prefill_implementation = original
      ms[impl] = common.median(samples)
      print(f"b={batch} t={tokens_n} {impl}: {ms[impl]:.2f} ms, "
            f"{batch * tokens_n / ms[impl] * 1e3:.0f} tok/s, "
            f"MFU {flops / (ms[impl] * 1e-3) / rate['flops_per_s']:.1%}", flush=True)
    for impl in impls:
      ref = logits["reference"].astype(jnp.float32)
      err = float(jnp.linalg.norm(logits[impl].astype(jnp.float32) - ref)
                  / jnp.linalg.norm(ref))
      agree = float(jnp.mean(jnp.argmax(logits[impl], -1) == jnp.argmax(ref, -1)))
      writer.add(case={"phase": "prefill", "batch": batch, "tokens": tokens_n},
                 impl=f"causal_self_attention={impl}", baseline_impl="reference",
                 median_ms=ms[impl], baseline_median_ms=ms["reference"],
                 fraction_of_ceiling=flops / (ms[impl] * 1e-3) / rate["flops_per_s"],
                 ceiling=f"bf16 matmul {rate['flops_per_s'] / 1e12:.0f} TFLOP/s measured",
                 tokens_per_s=batch * tokens_n / ms[impl] * 1e3,
                 rel_error_last_logits=err, argmax_agreement=agree)
      print(f"b={batch} {impl}: x{ms['reference'] / ms[impl]:.2f} vs reference, last-logit "
            f"rel err {err:.2e}, argmax agreement {agree:.2f}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
