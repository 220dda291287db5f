"""Float (bf16) baseline of the model code: prefill and decode speed against the hardware.

Every later speedup is measured against these numbers. In one process on one GPU:

  1. ceilings: HBM bandwidth from a large device-to-device copy (bytes read + written), a
     read-only bandwidth (a sum), and the bf16 matmul rate at 8192^3, medians of many runs on
     random data; measured again at the end of the run (recorded, not used);
  2. a Llama-3-8B-shaped `DecoderLM` with random normal bf16 weights, drawn on the device by
     a jitted generator per weight shape (nothing large on the host);
  3. prefill tokens/s (batch 1 and 8 x 2048 tokens) through `models.generate._prefill`, and
     model FLOPs utilization against the measured matmul rate (the first runs also timed
     two bench-only variants, the lm_head on the last position only and cuDNN flash
     attention; both are library code now, compared by bench/prefill_dispatch.py);
  4. decode tokens/s through the compiled decode loop `models.generate._decode_loop`
     (256 steps per call; batch 1 after a real 512-token prefill and at an 8k context,
     batch 8 and 32), against the roofline (weight bytes + KV bytes read per step) /
     measured copy bandwidth;
  5. diagnostics: a kernel-time profile of batch-1 decode calls, GEMV layouts ([out, in] as
     the model stores weights vs [in, out]) and prefill attention alone (reference vs cuDNN).

Usage (GPU):  PYTHONUNBUFFERED=1 python3 -m bench.float_baseline --out $OUT
CPU smoke test of the whole script on tiny shapes:  python3 -m bench.float_baseline --tiny

Results: one DESIGN.md line per measurement in <out>/float_baseline.jsonl; kernel profiles in
<out>/decode_profile_b1_ctx{512,8192}.json and the decode loop's optimized HLO in
<out>/decode_hlo.txt. Notes and history: bench/NOTES.md; summary: bench/results/float_baseline.md.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from lowbit.attention import attention_mask, gqa_attention
from lowbit.kv_cache import DenseKVCache
from lowbit.nn import linear
from models import generate
from models.config import ModelConfig, RopeScaling, for_architecture
from models.transformer import DecoderLM

BENCH = "float_baseline"
DTYPE = jnp.bfloat16


def llama3_8b_config() -> ModelConfig:
  """Llama-3(.1)-8B shapes: hidden 4096, 32 layers, 32 / 8 heads of 128, MLP 14336."""
  return for_architecture(
      "llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
      num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
      rms_norm_eps=1e-5, rope_theta=500000.0,
      rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=8192),
      tie_word_embeddings=False, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009))


def tiny_config() -> ModelConfig:
  """Same switches, shapes small enough for a CPU run of the whole script."""
  return for_architecture(
      "llama", vocab_size=1000, hidden_size=128, intermediate_size=256, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=4096,
      rms_norm_eps=1e-5, rope_theta=500000.0,
      rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=64))


# ---------------------------------------------------------------------------------------------
# Model on the device


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_normal(key, shape, std):
  """Random normal bf16 array made on the device (one small compile per shape)."""
  return (jax.random.normal(key, shape, jnp.float32) * std).astype(DTYPE)


def build_on_device(config: ModelConfig, seed: int = 0):
  """(graphdef, state): random normal bf16 weights generated on the device.

  The skeleton is abstract (`nnx.eval_shape`); each weight is drawn by a jitted generator
  compiled once per shape, with the model's own scales (Linear [out, in]: std in**-0.5;
  embedding: std 1; norm scales: ones). Jitting the whole constructor instead made one
  module of ~290 RNG ops that XLA:GPU took over 9 minutes to compile.
  """
  abstract = nnx.eval_shape(lambda: DecoderLM(config, dtype=DTYPE, rngs=nnx.Rngs(seed)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for i, (path, variable) in enumerate(flat):
    name = ".".join(str(p) for p in path)
    shape = tuple(variable.get_value().shape)
    if name.endswith(".scale"):
      value = jnp.ones(shape, DTYPE)
    elif name.endswith(".bias"):
      value = jnp.zeros(shape, DTYPE)
    elif name == "embed.embedding":
      value = _random_normal(keys[i], shape, 1.0)
    else:
      value = _random_normal(keys[i], shape, float(shape[-1]) ** -0.5)
    variable.set_value(value)
  return graphdef, common.block(nnx.from_flat_state(flat))


def parameter_bytes(state) -> dict[str, int]:
  """Flat parameter name -> bytes."""
  return {".".join(str(p) for p in path): int(v.get_value().nbytes)
          for path, v in nnx.to_flat_state(state)}


def weight_bytes_per_step(config: ModelConfig, param_bytes: dict[str, int], batch: int) -> int:
  """Weight bytes a decode step must read: every parameter once, but of the embedding table
  only the `batch` rows gathered (the untied lm_head is read whole)."""
  embed = param_bytes["embed.embedding"]
  row = config.hidden_size * jnp.dtype(DTYPE).itemsize
  return sum(param_bytes.values()) - embed + batch * row


def kv_bytes_per_token(config: ModelConfig) -> int:
  """K and V of one position across all layers."""
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * jnp.dtype(DTYPE).itemsize


def linear_params_per_token(config: ModelConfig) -> int:
  """Parameters of the per-layer projections (the matmul FLOPs per token are twice this)."""
  c = config
  attn = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  attn += c.num_heads * c.head_dim * c.hidden_size
  mlp = 3 * c.hidden_size * c.intermediate_size
  return c.num_layers * (attn + mlp)


def prefill_model_flops(config: ModelConfig, batch: int, tokens: int) -> float:
  """FLOPs prefill must do: projections for every token, causal attention (QK^T and PV over
  the keys each query sees), and the lm_head for the last position only."""
  c = config
  proj = 2.0 * batch * tokens * linear_params_per_token(c)
  visible = tokens * (tokens + 1) / 2
  attn = 2 * 2.0 * batch * c.num_layers * c.num_heads * c.head_dim * visible
  head = 2.0 * batch * c.hidden_size * c.vocab_size
  return proj + attn + head


def random_tokens(batch: int, length: int, vocab: int, seed: int) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def random_cache(config: ModelConfig, batch: int, max_len: int, seed: int):
  """A KV cache of random normal values (never zeros), as a prefill would have left it."""
  c = config
  shape = (batch, max_len, c.num_kv_heads, c.head_dim)
  keys = jax.random.split(jax.random.key(seed), 2 * c.num_layers)
  return common.block(tuple(
      DenseKVCache(_random_normal(keys[2 * i], shape, 1.0),
                   _random_normal(keys[2 * i + 1], shape, 1.0))
      for i in range(c.num_layers)))


# ---------------------------------------------------------------------------------------------
# Profile reading


_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Launch Stats", "TensorFlow Ops",
                  "TensorFlow Name Scope", "Source code", "Framework Ops", "Framework Name Scope")


def profile_kernels(fn, steps: int, out_path: str | None) -> dict:
  """Runs `fn()` once under jax.profiler and sums GPU kernel time by kernel name.

  Returns per-step kernel counts and times, the busy time (union of kernel intervals) and the
  wall window from the first kernel start to the last kernel end.
  """
  from jax.profiler import ProfileData

  trace_dir = tempfile.mkdtemp(prefix="lowbit_trace_")
  common.block(fn())  # warm
  with jax.profiler.trace(trace_dir):
    common.block(fn())
  paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not paths:
    return {"error": "no xplane file written"}
  data = ProfileData.from_file(paths[0])
  by_name: dict[str, list[float]] = collections.defaultdict(list)
  intervals = []
  lines_seen = collections.Counter()
  gpu_planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
  have_streams = any(l.name.startswith("Stream") for p in gpu_planes for l in p.lines)
  for plane in gpu_planes:
    for line in plane.lines:
      kernel_line = (line.name.startswith("Stream") if have_streams
                     else line.name not in _DERIVED_LINES)
      if not kernel_line:
        lines_seen[f"{plane.name} | {line.name} (skipped)"] += 1
        continue
      for event in line.events:
        lines_seen[f"{plane.name} | {line.name}"] += 1
        by_name[event.name].append(event.duration_ns)
        intervals.append((event.start_ns, event.start_ns + event.duration_ns))
  if not intervals:
    return {"error": "no GPU stream events", "lines": dict(lines_seen)}
  intervals.sort()
  busy, cur_start, cur_end = 0.0, *intervals[0]
  for s, e in intervals[1:]:
    if s > cur_end:
      busy += cur_end - cur_start
      cur_start, cur_end = s, e
    else:
      cur_end = max(cur_end, e)
  busy += cur_end - cur_start
  window = intervals[-1][1] - intervals[0][0]
  kernels = []
  for name, durations in by_name.items():
    kernels.append({"name": name[:160], "category": _kernel_category(name),
                    "calls_per_step": len(durations) / steps,
                    "us_per_step": sum(durations) / steps / 1e3,
                    "us_per_call": sum(durations) / len(durations) / 1e3})
  kernels.sort(key=lambda k: -k["us_per_step"])
  categories = collections.defaultdict(lambda: [0.0, 0.0])
  for k in kernels:
    categories[k["category"]][0] += k["us_per_step"]
    categories[k["category"]][1] += k["calls_per_step"]
  summary = {
      "steps": steps,
      "kernels_per_step": sum(len(d) for d in by_name.values()) / steps,
      "kernel_us_per_step": sum(sum(d) for d in by_name.values()) / steps / 1e3,
      "busy_us_per_step": busy / steps / 1e3,
      "window_us_per_step": window / steps / 1e3,
      "categories": {k: {"us_per_step": v[0], "calls_per_step": v[1]}
                     for k, v in sorted(categories.items(), key=lambda kv: -kv[1][0])},
      "lines": dict(lines_seen),
      "kernels": kernels[:60],
  }
  if out_path:
    with open(out_path, "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def _kernel_category(name: str) -> str:
  n = name.lower()
  if re.search(r"memcpy|memset", n):
    return "memcpy/memset"
  if re.search(r"gemv|gemm|xmma|cutlass|nvjet|cublas|triton_gemm|sm90_|dot", n):
    return "matmul (gemv/gemm)"
  if "reduce" in n or "softmax" in n:
    return "reduction fusion"
  if "dynamic_update_slice" in n or "dynamic-update-slice" in n:
    return "cache update"
  return "other fusion"


# ---------------------------------------------------------------------------------------------
# The benchmark


class Bench:

  def __init__(self, args):
    self.args = args
    self.t0 = time.perf_counter()
    self.out = args.out
    os.makedirs(self.out, exist_ok=True)
    self.results_path = os.path.join(self.out, f"{BENCH}.jsonl")
    if os.path.exists(self.results_path):
      os.remove(self.results_path)
    self.writer = common.ResultWriter(self.results_path, BENCH)
    self.config = tiny_config() if args.tiny else llama3_8b_config()
    self.table = []
    self.skipped = []

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def log(self, msg: str) -> None:
    print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

  def budget_allows(self, name: str, cost_s: float) -> bool:
    left = self.args.budget_s - self.elapsed()
    if left < cost_s:
      self.log(f"SKIP {name}: {left:.0f}s of budget left, needs ~{cost_s:.0f}s")
      self.skipped.append(name)
      return False
    return True

  # -- ceilings ------------------------------------------------------------------------------

  def ceilings(self, when: str = "start of run"):
    """Measures the copy bandwidth, read bandwidth and matmul rate. The first call sets the
    ceilings every fraction is taken against; a later call only records them again (clocks
    and power state drift over a run)."""
    a = self.args
    card = self.writer.card
    bw = common.measure_hbm_bandwidth(a.copy_bytes, iters=a.hw_iters)
    rd = common.measure_read_bandwidth(a.copy_bytes, iters=a.hw_iters)
    mm = common.measure_matmul_rate(a.matmul_n, iters=a.hw_iters)
    if not hasattr(self, "bandwidth"):
      self.bandwidth = bw["bytes_per_s"]
      self.read_bandwidth = rd["bytes_per_s"]
      self.matmul_rate = mm["flops_per_s"]
      self.bw_label = f"HBM {self.bandwidth / 1e12:.2f} TB/s measured copy"
      self.mm_label = (f"bf16 matmul {self.matmul_rate / 1e12:.0f} TFLOP/s measured at "
                       f"{a.matmul_n}^3")
    sheet = common.datasheet(card)
    sheet_bw, sheet_flops = sheet if sheet else (None, None)
    for op, m, impl in (("hbm_copy", bw, "jnp.copy (jit), read + write counted"),
                        ("hbm_read", rd, "jnp.sum (jit), bytes read")):
      self.writer.add(
          case={"op": op, "bytes_moved": m["bytes_moved"], "when": when}, impl=impl,
          baseline_impl="datasheet" if sheet_bw else "none",
          median_ms=m["median_ms"],
          baseline_median_ms=(m["bytes_moved"] / sheet_bw * 1e3 if sheet_bw
                              else m["median_ms"]),
          fraction_of_ceiling=(m["bytes_per_s"] / sheet_bw if sheet_bw else None),
          ceiling=(f"datasheet HBM {sheet_bw / 1e12:.2f} TB/s" if sheet_bw else "none"),
          bytes_per_s=m["bytes_per_s"], best_bytes_per_s=m["best_bytes_per_s"],
          spread=m["spread"])
    flops = 2 * a.matmul_n**3
    self.writer.add(
        case={"op": "matmul", "m": a.matmul_n, "n": a.matmul_n, "k": a.matmul_n,
              "dtype": "bfloat16", "when": when}, impl="jnp.matmul (jit)",
        baseline_impl="datasheet" if sheet_flops else "none",
        median_ms=mm["median_ms"],
        baseline_median_ms=(flops / sheet_flops * 1e3 if sheet_flops else mm["median_ms"]),
        fraction_of_ceiling=(mm["flops_per_s"] / sheet_flops if sheet_flops else None),
        ceiling=(f"datasheet bf16 dense {sheet_flops / 1e12:.0f} TFLOP/s" if sheet_flops
                 else "none"),
        flops_per_s=mm["flops_per_s"], best_flops_per_s=mm["best_flops_per_s"],
        spread=mm["spread"])
    self.log(f"[{when}] copy {bw['bytes_per_s'] / 1e12:.3f} TB/s (best "
             f"{bw['best_bytes_per_s'] / 1e12:.3f}, spread {bw['spread']:.1%}), read "
             f"{rd['bytes_per_s'] / 1e12:.3f} TB/s (best {rd['best_bytes_per_s'] / 1e12:.3f}, "
             f"spread {rd['spread']:.1%}), matmul {mm['flops_per_s'] / 1e12:.1f} TFLOP/s (best "
             f"{mm['best_flops_per_s'] / 1e12:.1f}, spread {mm['spread']:.1%})")
    self.table.append((f"HBM copy ({when})", f"{bw['bytes_per_s'] / 1e12:.2f} TB/s", "", ""))
    self.table.append((f"HBM read ({when})", f"{rd['bytes_per_s'] / 1e12:.2f} TB/s", "", ""))
    self.table.append((f"bf16 matmul {a.matmul_n}^3 ({when})",
                       f"{mm['flops_per_s'] / 1e12:.0f} TFLOP/s", "", ""))

  # -- model ---------------------------------------------------------------------------------

  def build(self):
    start = time.perf_counter()
    self.graphdef, self.state = build_on_device(self.config)
    self.param_bytes = parameter_bytes(self.state)
    total = sum(self.param_bytes.values())
    leaves = jax.tree.leaves(self.state)
    kinds = {str(x.dtype) for x in leaves}
    sample = self.state["layers"][0]["mlp"]["down_proj"]["weight"].get_value()
    std = float(jnp.std(sample.astype(jnp.float32)))
    zero_frac = float(jnp.mean(sample == 0))
    self.log(f"model built on {leaves[0].devices()} in {time.perf_counter() - start:.1f}s: "
             f"{total / 1e9:.3f} GB, dtypes {kinds}, down_proj std {std:.4g}, "
             f"zero fraction {zero_frac:.2g}")

  def decode_roofline_ms(self, batch: int, start: int, steps: int) -> tuple[float, int, int]:
    """(roofline ms per step, weight bytes, mean KV bytes read per step)."""
    weights = weight_bytes_per_step(self.config, self.param_bytes, batch)
    # Step i (0-based) attends over positions 0 .. start + i.
    mean_len = start + (steps + 1) / 2
    kv = int(batch * mean_len * kv_bytes_per_token(self.config))
    return (weights + kv) / self.bandwidth * 1e3, weights, kv

  # -- decode --------------------------------------------------------------------------------

  def decode(self, *, batch: int, context: int, steps: int, real_prefill: bool,
             profile: bool = False, calls: int = 5):
    c = self.config
    max_len = context + steps
    sampling = generate.Sampling()
    token = random_tokens(batch, 1, c.vocab_size, seed=3)[:, 0]
    if real_prefill:
      # The Generator's path: prefill the prompt into an empty cache, then decode.
      cache = DecoderLM.init_cache(nnx.merge(self.graphdef, self.state), batch, max_len)
      prompt = random_tokens(batch, context, c.vocab_size, seed=4)
      logits, cache = generate._prefill(self.graphdef, self.state, prompt, cache)
      finite = bool(jnp.all(jnp.isfinite(logits)))
      token = generate.sample_tokens(logits, jax.random.key(5), sampling)
      self.log(f"prefill of the {context}-token prompt done, logits finite: {finite}")
    else:
      cache = random_cache(c, batch, max_len, seed=6)
    position = jnp.int32(context)
    key = jax.random.key(7)
    start = time.perf_counter()
    lowered = generate._decode_loop.lower(self.graphdef, self.state, token, cache, position,
                                          key, steps, sampling)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    if profile and self.args.dump_hlo and not os.path.exists(
        os.path.join(self.out, "decode_hlo.txt")):
      with open(os.path.join(self.out, "decode_hlo.txt"), "w") as f:
        f.write(compiled.as_text())
    box = {"cache": cache}

    def call():
      tokens, box["cache"] = compiled(self.state, token, box["cache"], position, key)
      return tokens

    samples = common.time_calls(call, warmup=1, iters=calls)
    ms_step = common.median(samples) / steps
    roof_ms, weights, kv = self.decode_roofline_ms(batch, context, steps)
    tok_s = batch / (ms_step * 1e-3)
    frac = roof_ms / ms_step
    case = {"phase": "decode", "batch": batch, "context": context, "steps_per_call": steps,
            "cache_len": max_len, "prompt": "prefilled" if real_prefill else "random cache"}
    self.writer.add(
        case=case, impl="models.generate._decode_loop (XLA, dense bf16 cache)",
        baseline_impl="roofline", median_ms=ms_step, baseline_median_ms=roof_ms,
        fraction_of_ceiling=frac, ceiling=self.bw_label, tokens_per_s=tok_s,
        roofline_tokens_per_s=batch / (roof_ms * 1e-3), weight_bytes_per_step=weights,
        kv_bytes_per_step=kv, bytes_per_s=(weights + kv) / (ms_step * 1e-3),
        fraction_of_read_roofline=(weights + kv) / self.read_bandwidth * 1e3 / ms_step,
        compile_s=round(compile_s, 1), spread=common.spread(samples),
        call_ms=[round(s, 2) for s in samples])
    self.log(f"decode b={batch} ctx={context}: {ms_step:.3f} ms/step, {tok_s:.1f} tok/s, "
             f"roofline {roof_ms:.3f} ms ({frac:.1%}), compile {compile_s:.0f}s, "
             f"spread {common.spread(samples):.1%}")
    self.table.append((f"decode b={batch} ctx {context}+{steps}", f"{tok_s:.1f} tok/s",
                       f"{ms_step:.3f} ms/step", f"{frac:.1%} of roofline {roof_ms:.3f} ms"))
    if profile:
      try:
        summary = profile_kernels(
            call, steps, os.path.join(self.out, f"decode_profile_b{batch}_ctx{context}.json"))
        self.report_profile(summary, ms_step, roof_ms)
      except Exception as e:  # A diagnostic must not lose the numbers above.
        self.log(f"profile failed: {type(e).__name__}: {e}")

  def report_profile(self, s: dict, ms_step: float, roof_ms: float):
    if "error" in s:
      self.log(f"profile: {s['error']} {s.get('lines')}")
      return
    self.log(f"profile: {s['kernels_per_step']:.0f} kernels/step, kernel time "
             f"{s['kernel_us_per_step']:.0f} us/step, busy {s['busy_us_per_step']:.0f} us, "
             f"window {s['window_us_per_step']:.0f} us (timed {ms_step * 1e3:.0f} us, "
             f"roofline {roof_ms * 1e3:.0f} us)")
    for cat, v in s["categories"].items():
      self.log(f"  {cat:22s} {v['us_per_step']:8.1f} us/step  {v['calls_per_step']:6.1f} calls")
    for k in s["kernels"][:25]:
      self.log(f"  {k['us_per_step']:8.1f} us/step {k['calls_per_step']:6.1f}x "
               f"{k['us_per_call']:7.2f} us  {k['name'][:100]}")

  # -- prefill -------------------------------------------------------------------------------

  def prefill(self, *, batch: int, tokens: int, calls: int = 5):
    c = self.config
    prompt = random_tokens(batch, tokens, c.vocab_size, seed=8)
    model_flops = prefill_model_flops(c, batch, tokens)
    roof_ms = model_flops / self.matmul_rate * 1e3
    # The bench-only variants of the first runs (lm_head on the last position, cuDNN flash
    # attention patched in) are library code now (bench/prefill_dispatch.py compares).
    variants = [
        ("library", generate._prefill,
         "models.generate._prefill (lm_head on the last position; cuDNN flash attention "
         "on GPU)"),
    ]
    reference_logits = None
    for name, fn, impl in variants:
      cache = DecoderLM.init_cache(nnx.merge(self.graphdef, self.state), batch, tokens)
      start = time.perf_counter()
      try:
        compiled = fn.lower(self.graphdef, self.state, prompt, cache).compile()
      except Exception as e:  # the cuDNN variant is optional
        self.log(f"prefill {name}: compile failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      compile_s = time.perf_counter() - start
      box = {"cache": cache}

      def call():
        logits, box["cache"] = compiled(self.state, prompt, box["cache"])
        return logits

      samples = common.time_calls(call, warmup=1, iters=calls)
      logits = call().astype(jnp.float32)
      if reference_logits is None:
        reference_logits, err = logits, 0.0
      else:
        err = float(jnp.linalg.norm(logits - reference_logits) /
                    jnp.linalg.norm(reference_logits))
      ms = common.median(samples)
      tok_s = batch * tokens / (ms * 1e-3)
      mfu = model_flops / (ms * 1e-3) / self.matmul_rate
      self.writer.add(
          case={"phase": "prefill", "batch": batch, "tokens": tokens},
          impl=impl, baseline_impl="matmul roofline (model FLOPs / measured bf16 rate)",
          median_ms=ms, baseline_median_ms=roof_ms, fraction_of_ceiling=mfu,
          ceiling=self.mm_label, tokens_per_s=tok_s, model_flops=model_flops,
          last_logits_rel_error_vs_library=err, compile_s=round(compile_s, 1),
          spread=common.spread(samples), call_ms=[round(s, 2) for s in samples])
      self.log(f"prefill {name} b={batch} t={tokens}: {ms:.2f} ms, {tok_s:.0f} tok/s, "
               f"MFU {mfu:.1%} (model {model_flops / 1e12:.2f} TFLOP), rel err {err:.1e}, "
               f"compile {compile_s:.0f}s, spread {common.spread(samples):.1%}")
      self.table.append((f"prefill {name} b={batch} t={tokens}", f"{tok_s:.0f} tok/s",
                         f"{ms:.2f} ms", f"MFU {mfu:.1%}"))

  # -- diagnostics ---------------------------------------------------------------------------

  def gemv_layouts(self):
    """One GEMV per weight shape of the model, weight [out, in] (the model's layout, the
    contraction on the minor axis of both) vs [in, out]; enough distinct weights per program
    that they cannot sit in L2."""
    c = self.config
    shapes = {"q/o_proj": (c.num_heads * c.head_dim, c.hidden_size),
              "k/v_proj": (c.num_kv_heads * c.head_dim, c.hidden_size),
              "gate/up_proj": (c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size),
              "lm_head": (c.vocab_size, c.hidden_size)}
    for name, (out_f, in_f) in shapes.items():
      size = out_f * in_f * 2
      copies = max(2, -(-self.args.gemv_bytes // size))
      keys = jax.random.split(jax.random.key(9), copies + 1)
      xs = jax.random.normal(keys[0], (copies, 1, in_f), DTYPE)
      w_nt = [jax.random.normal(k, (out_f, in_f), DTYPE) for k in keys[1:]]
      w_nn = [w.T.copy() for w in w_nt]
      common.block(w_nn)
      nt = jax.jit(lambda xs, ws: [linear(xs[i], w) for i, w in enumerate(ws)])
      nn = jax.jit(lambda xs, ws: [xs[i] @ w for i, w in enumerate(ws)])
      roof_ms = size / self.bandwidth * 1e3
      res = {}
      for layout, fn, ws in (("[out,in] (model)", nt, w_nt), ("[in,out]", nn, w_nn)):
        samples = common.time_calls(lambda: fn(xs, ws), warmup=3, iters=self.args.hw_iters,
                                    inner=4)
        ms = common.median(samples) / copies
        res[layout] = ms
        self.writer.add(
            case={"op": "gemv", "weight": name, "out": out_f, "in": in_f, "batch": 1,
                  "layout": layout, "weights_per_program": copies},
            impl="lax.dot_general (XLA)", baseline_impl="roofline", median_ms=ms,
            baseline_median_ms=roof_ms, fraction_of_ceiling=roof_ms / ms,
            ceiling=self.bw_label, bytes_per_s=size / (ms * 1e-3))
      self.log(f"gemv {name} [{out_f}x{in_f}] x{copies}: " + ", ".join(
          f"{k} {v * 1e3:.1f} us ({size / (v * 1e-3) / 1e12:.2f} TB/s)" for k, v in res.items())
               + f"; roofline {roof_ms * 1e3:.1f} us")

  def attention_share(self, *, batch: int, tokens: int):
    """Prefill attention alone (one layer): the reference vs cuDNN flash attention."""
    c = self.config
    keys = jax.random.split(jax.random.key(10), 3)
    q = jax.random.normal(keys[0], (batch, tokens, c.num_heads, c.head_dim), DTYPE)
    k = jax.random.normal(keys[1], (batch, tokens, c.num_kv_heads, c.head_dim), DTYPE)
    v = jax.random.normal(keys[2], (batch, tokens, c.num_kv_heads, c.head_dim), DTYPE)
    positions = jnp.arange(tokens, dtype=jnp.int32)
    scale = c.attention_scale
    ref = jax.jit(lambda q, k, v: gqa_attention(q, k, v, attention_mask(positions, positions,
                                                                        None), scale=scale))
    visible = tokens * (tokens + 1) / 2
    flops = 2 * 2.0 * batch * c.num_heads * c.head_dim * visible
    roof_ms = flops / self.matmul_rate * 1e3
    impls = [("lowbit.attention.gqa_attention (reference, XLA)", ref)]
    if jax.default_backend() == "gpu":
      impls.append(("jax.nn.dot_product_attention cudnn", jax.jit(
          lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                                       implementation="cudnn"))))
    ref_out = None
    for impl, fn in impls:
      try:
        out = fn(q, k, v)
        if ref_out is None:
          ref_out = out.astype(jnp.float32)
          err = 0.0
        else:
          err = float(jnp.linalg.norm(out.astype(jnp.float32) - ref_out) /
                      jnp.linalg.norm(ref_out))
        samples = common.time_calls(lambda: fn(q, k, v), warmup=2, iters=self.args.hw_iters)
      except Exception as e:
        self.log(f"attention {impl}: failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      ms = common.median(samples)
      self.writer.add(
          case={"op": "prefill_attention_one_layer", "batch": batch, "tokens": tokens,
                "heads": c.num_heads, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                "causal": True},
          impl=impl, baseline_impl="matmul roofline (causal FLOPs / measured bf16 rate)",
          median_ms=ms, baseline_median_ms=roof_ms, fraction_of_ceiling=roof_ms / ms,
          ceiling=self.mm_label, rel_error_vs_reference=err,
          all_layers_ms=ms * c.num_layers)
      self.log(f"attention b={batch} t={tokens} {impl}: {ms:.3f} ms/layer, "
               f"x{c.num_layers} layers = {ms * c.num_layers:.1f} ms, rel err {err:.2e}")

  # -- driver --------------------------------------------------------------------------------

  def run(self):
    a = self.args
    self.log(f"card {self.writer.card}, jax {jax.__version__}, backend "
             f"{jax.default_backend()}, commit {self.writer.commit}")
    self.ceilings()
    self.build()
    ctx, steps = a.prompt, a.steps
    # In priority order; each optional step is skipped when the time budget runs short.
    self.decode(batch=1, context=ctx, steps=steps, real_prefill=True, profile=True,
                calls=a.decode_calls)
    if self.budget_allows("prefill b=1", 60):
      self.prefill(batch=1, tokens=a.prefill_tokens, calls=a.prefill_calls)
    if self.budget_allows("decode b=1 long context", 60):
      self.decode(batch=1, context=a.long_context, steps=steps, real_prefill=False,
                  profile=True, calls=a.decode_calls)
    if self.budget_allows("gemv layouts", 30):
      self.gemv_layouts()
    if self.budget_allows("attention share", 20):
      self.attention_share(batch=1, tokens=a.prefill_tokens)
    if self.budget_allows("prefill b=8", 70):
      self.prefill(batch=8, tokens=a.prefill_tokens, calls=a.prefill_calls)
    for batch in (8, 32):
      if self.budget_allows(f"decode b={batch}", 50):
        self.decode(batch=batch, context=ctx, steps=steps, real_prefill=False,
                    calls=max(3, a.decode_calls - 2))
    if self.budget_allows("ceilings at the end", 15):
      self.ceilings(when="end of run")
    self.log("done" + (f"; skipped: {self.skipped}" if self.skipped else ""))
    print(f"\n{self.writer.card} | jax {jax.__version__} | {self.bw_label} | {self.mm_label}")
    for row in self.table:
      print(" | ".join(f"{x:28s}" for x in row))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
  p.add_argument("--out", default=None, help="output folder (default bench/results)")
  p.add_argument("--budget-s", type=float, default=540.0,
                 help="skip optional cases once this many seconds have passed")
  p.add_argument("--no-dump-hlo", dest="dump_hlo", action="store_false")
  args = p.parse_args(argv)
  if args.out is None:
    args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  if args.tiny:
    args.copy_bytes, args.matmul_n, args.hw_iters, args.gemv_bytes = 8 << 20, 256, 5, 1 << 20
    args.prompt, args.steps, args.long_context, args.prefill_tokens = 16, 8, 64, 32
    args.decode_calls, args.prefill_calls = 3, 3
  else:
    args.copy_bytes, args.matmul_n, args.hw_iters, args.gemv_bytes = 2 << 30, 8192, 30, 1 << 30
    args.prompt, args.steps, args.long_context, args.prefill_tokens = 512, 256, 8192, 2048
    args.decode_calls, args.prefill_calls = 6, 8
  Bench(args).run()


if __name__ == "__main__":
  sys.exit(main())
