"""End-to-end decode of the Llama-3-8B shape at a long context with bf16, int8 and int4 caches.

What a quantized cache buys a whole model: at 32k tokens a bf16 cache is 4.3 GB per sequence
(128 KiB per token), more than the 15 GB of weights at batch 4, so decode time follows
cache bytes. In one process on one GPU:

  1. the copy bandwidth ceiling (bench.common);
  2. the model with random normal bf16 weights drawn on the device (bench.float_baseline);
  3. per (cache format, batch): a cache of `context` random tokens (dense: normal values;
     quantized: random codes with random positive scales and offsets, as a prefill would
     leave it; never zeros), then `steps` decode steps in the compiled loop
     `models.generate._decode_loop`, which runs `lowbit.attention.paged_decode_attention`
     (the Pallas decode kernel) for quantized caches (kv4's per-channel keys: the kernel
     over the complete key groups, merged with the float window of the newest tokens) and
     XLA's einsum or cuDNN over the dense cache; each row names its path (`decode_path`);
  4. the roofline per step: weight bytes + the live cache bytes (codes and grids) / the
     measured copy bandwidth; tokens/s and the fraction of that roofline.

Usage (GPU):  PYTHONUNBUFFERED=1 python3 -m bench.kv_decode --out $OUT
CPU smoke test on tiny shapes:  python3 -m bench.kv_decode --tiny
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from bench.float_baseline import (build_on_device, llama3_8b_config, parameter_bytes,
                                  tiny_config, weight_bytes_per_step)
from lowbit.kv_cache import KV_FORMATS
from models import generate
from models.transformer import DecoderLM

BENCH = "kv_decode"
DTYPE = jnp.bfloat16


@functools.partial(jax.jit, static_argnums=(0,))
def _random_like(shape_dtype, key):
  """A random array of the given ShapeDtypeStruct: normal floats, uniform codes."""
  shape, dtype = shape_dtype.shape, shape_dtype.dtype
  if dtype == jnp.uint8:
    return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(jnp.uint8)
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def random_cache(model: DecoderLM, batch: int, max_len: int, context: int, seed: int):
  """One cache per layer of the model's KV format, `context` tokens long, random content.

  Quantized grids: scales uniform in [0.01, 0.05], offsets normal * 0.3 (small values like
  a real cache's); the codes are random bytes.
  """
  caches = []
  key = jax.random.key(seed)
  # Shapes only: allocating the empty caches too would double the memory of a 70 GB cache.
  for empty in jax.eval_shape(lambda: model.init_cache(batch, max_len)):
    fields = {}
    for name, leaf in vars(empty).items():
      if not isinstance(leaf, jax.ShapeDtypeStruct):
        continue
      if leaf.ndim == 0:  # QuantizedKVCache.length
        fields[name] = jnp.int32(context)
        continue
      key, sub = jax.random.split(key)
      value = _random_like(leaf, sub)
      if name.endswith("scales"):
        value = 0.01 + 0.04 * jax.nn.sigmoid(value)
      elif name.endswith("offsets"):
        value = value * 0.3
      fields[name] = value
    caches.append(common.block(type(empty)(**{**vars(empty), **fields})))
  return tuple(caches)


def live_cache_bytes(cache, context: int) -> int:
  """Bytes of the first `context` slots of every layer's cache (codes and grids; per-channel
  key grids cover key_group slots each, so every leaf counts its share context / max_len)."""
  total = 0
  for layer in cache:
    for name, leaf in vars(layer).items():
      if isinstance(leaf, jax.Array) and leaf.ndim >= 3 and name != "k_window":
        total += leaf.nbytes * context // layer.max_len
  return total


class Bench:

  def __init__(self, args):
    self.args = args
    self.t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{BENCH}.jsonl")
    if os.path.exists(path):
      os.remove(path)
    self.writer = common.ResultWriter(path, BENCH)
    self.config = tiny_config() if args.tiny else llama3_8b_config()
    self.table = []

  def log(self, msg: str) -> None:
    print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", flush=True)

  def run(self):
    a = self.args
    self.log(f"card {self.writer.card}, jax {jax.__version__}, commit {self.writer.commit}")
    bw = common.measure_hbm_bandwidth(a.copy_bytes, iters=a.hw_iters)
    self.bandwidth = bw["bytes_per_s"]
    self.log(f"copy bandwidth {self.bandwidth / 1e12:.3f} TB/s (spread {bw['spread']:.1%})")
    graphdef, state = build_on_device(self.config)
    self.state = state
    self.weights = weight_bytes_per_step(self.config, parameter_bytes(state), 1)
    self.log(f"model built: {self.weights / 1e9:.2f} GB of weights read per step")
    free = a.memory_gb * 1e9 - sum(x.nbytes for x in jax.tree.leaves(state))
    for fmt_name, batch in a.cases:
      model = nnx.merge(graphdef, state)
      model.set_kv_format(KV_FORMATS[fmt_name])
      need = (KV_FORMATS[fmt_name].bytes_per_token(self.config.num_kv_heads,
                                                   self.config.head_dim)
              * self.config.num_layers * batch * (a.context + a.steps))
      if need > 0.9 * free:
        self.log(f"SKIP {fmt_name} b={batch}: cache {need / 1e9:.1f} GB > 90% of "
                 f"{free / 1e9:.1f} GB free")
        self.table.append((fmt_name, batch, "does not fit", f"{need / 1e9:.0f} GB", "", ""))
        continue
      if time.perf_counter() - self.t0 > a.budget_s:
        self.log(f"SKIP {fmt_name} b={batch}: time budget spent")
        continue
      try:
        self.decode(model, fmt_name, batch)
      except Exception as e:  # one failing case must not lose the others
        self.log(f"FAILED {fmt_name} b={batch}: {type(e).__name__}: {str(e)[:2000]}")
        self.table.append((fmt_name, batch, "failed", type(e).__name__, "", ""))
    print(f"\n{self.writer.card} | jax {jax.__version__} | copy {self.bandwidth / 1e12:.2f} "
          f"TB/s | context {a.context}")
    print("format | batch | tok/s | ms/step | roofline ms | fraction")
    for row in self.table:
      print(" | ".join(str(x) for x in row))

  def decode(self, model: DecoderLM, fmt_name: str, batch: int):
    a = self.args
    c = self.config
    graphdef, state = nnx.split(model)
    cache = random_cache(model, batch, a.context + a.steps, a.context, seed=6)
    kv_bytes = live_cache_bytes(cache, a.context + a.steps // 2)
    token = jax.random.randint(jax.random.key(3), (batch,), 0, c.vocab_size, jnp.int32)
    position, key, sampling = jnp.int32(a.context), jax.random.key(7), generate.Sampling()
    start = time.perf_counter()
    compiled = generate._decode_loop.lower(graphdef, state, token, cache, position, key,
                                           a.steps, sampling).compile()
    compile_s = time.perf_counter() - start
    box = {"cache": cache}
    path = ("paged_decode_attention" if cache[0].paged else
            "dense_decode_attention" if cache[0].exact else "read + gqa_attention")

    def call():
      tokens, box["cache"] = compiled(state, token, box["cache"], position, key)
      return tokens

    samples = common.time_calls(call, warmup=1, iters=a.calls)
    ms_step = common.median(samples) / a.steps
    weights = weight_bytes_per_step(c, parameter_bytes(state), batch)
    roof_ms = (weights + kv_bytes) / self.bandwidth * 1e3
    tok_s = batch / (ms_step * 1e-3)
    self.writer.add(
        case={"phase": "decode", "kv_cache": fmt_name, "batch": batch, "context": a.context,
              "steps_per_call": a.steps},
        impl=f"models.generate._decode_loop, {fmt_name} cache", baseline_impl="roofline",
        decode_path=path,
        median_ms=ms_step, baseline_median_ms=roof_ms, fraction_of_ceiling=roof_ms / ms_step,
        ceiling=f"HBM {self.bandwidth / 1e12:.2f} TB/s measured copy", tokens_per_s=tok_s,
        weight_bytes_per_step=weights, kv_bytes_per_step=kv_bytes,
        compile_s=round(compile_s, 1), spread=common.spread(samples),
        call_ms=[round(s, 2) for s in samples])
    self.log(f"{fmt_name} b={batch} ctx={a.context} ({path}): {ms_step:.3f} ms/step, "
             f"{tok_s:.1f} tok/s, "
             f"roofline {roof_ms:.3f} ms ({roof_ms / ms_step:.1%}), KV {kv_bytes / 1e9:.2f} GB, "
             f"compile {compile_s:.0f}s")
    self.table.append((fmt_name, batch, f"{tok_s:.1f}", f"{ms_step:.3f}", f"{roof_ms:.3f}",
                       f"{roof_ms / ms_step:.1%}"))
    del box, cache


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  p.add_argument("--context", type=int, default=None)
  p.add_argument("--budget-s", type=float, default=480.0)
  p.add_argument("--memory-gb", type=float, default=None,
                 help="device memory to plan against (default: the device's)")
  p.add_argument("--cases", default="dense:1,kv8:1,kv4-token:1,kv4:1,kv4-atom:1,dense:8,"
                                    "kv8:32,kv4-token:32,kv4:32,dense:32",
                 help="format:batch pairs, in order")
  args = p.parse_args(argv)
  args.cases = [(f, int(b)) for f, b in (c.split(":") for c in args.cases.split(","))]
  if args.tiny:
    args.copy_bytes, args.hw_iters, args.steps, args.calls = 8 << 20, 5, 4, 2
    args.context = args.context or 64
  else:
    args.copy_bytes, args.hw_iters, args.steps, args.calls = 2 << 30, 30, 32, 5
    args.context = args.context or 32768
  if args.memory_gb is None:
    stats = jax.devices()[0].memory_stats() or {}
    args.memory_gb = stats.get("bytes_limit", 16e9) / 1e9
  Bench(args).run()


if __name__ == "__main__":
  sys.exit(main())
