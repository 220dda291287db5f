"""Shared helpers for benchmarks: timing, hardware ceilings, and result lines.

Every benchmark writes one JSON object per measurement to `bench/results/<name>.jsonl` in the
format DESIGN.md fixes ("Results the repository keeps"): bench, case, impl, baseline_impl,
card, jax_version, median_ms, baseline_median_ms, ratio_vs_baseline (baseline / ours),
fraction_of_ceiling, ceiling, date, commit, plus whatever the benchmark adds.

Timing follows the device method (METHOD.md): warm up, block on the result, take the median
of many samples; never time zeros (random inputs everywhere).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import statistics
import subprocess
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Vendor datasheet figures, for the hardware rows only (the ceilings used everywhere else
# are measured): (substring of device_kind, HBM bytes/s, dense bf16 FLOP/s).
_DATASHEET = (
    ("H200", 4.8e12, 989e12),
    ("H100", 3.35e12, 989e12),
)


def datasheet(card: str) -> tuple[float, float] | None:
  """(HBM bytes/s, bf16 FLOP/s) from the vendor's datasheet, or None for an unknown card."""
  for key, bandwidth, flops in _DATASHEET:
    if key in card:
      return bandwidth, flops
  return None


def card_name() -> str:
  """The first device as it names itself (e.g. 'NVIDIA H100 80GB HBM3')."""
  return jax.devices()[0].device_kind


def git_commit() -> str:
  """LOWBIT_COMMIT if set, else `git rev-parse HEAD`, else 'uncommitted'."""
  if os.environ.get("LOWBIT_COMMIT"):
    return os.environ["LOWBIT_COMMIT"]
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or "uncommitted"
  except (OSError, subprocess.CalledProcessError):
    return "uncommitted"


@contextlib.contextmanager
def patched(*changes: tuple[Any, str, Any]):
  """Within the block, each (owner, name, value) sets owner.name = value (a dispatch default
  swapped for an experiment in a benchmark process); jit caches are cleared on the way in
  and out, so traces see the swap and later ones do not."""
  saved = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
  for owner, name, value in changes:
    setattr(owner, name, value)
  jax.clear_caches()
  try:
    yield
  finally:
    for owner, name, value in saved:
      setattr(owner, name, value)
    jax.clear_caches()


def block(tree: Any) -> Any:
  """Waits for every array in `tree`."""
  return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 10,
               inner: int = 1) -> list[float]:
  """Milliseconds per call of `fn()`, one sample per `inner` back-to-back calls.

  Each sample dispatches `inner` calls and blocks on the last result (host clock around it),
  so `inner` > 1 hides the per-call dispatch for short calls. The first `warmup` samples
  (compilation included) are dropped.
  """
  for _ in range(warmup):
    block(fn())
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    out = None
    for _ in range(inner):
      out = fn()
    block(out)
    samples.append((time.perf_counter() - start) * 1e3 / inner)
  return samples


def device_kernel_times(fn: Callable[..., Any], arg_sets: list[tuple], *,
                        calls: int = 64) -> tuple[float, dict[str, float]]:
  """Milliseconds of GPU kernel time per call of jitted `fn`, from a profiler trace.

  `calls` calls rotate over `arg_sets` after one warm-up call per set; every kernel event on
  the device's stream lines is summed, so the figure is the op's kernels back to back,
  without host dispatch and launch gaps (which made wall-clock samples of 20 µs ops swing by
  30% from run to run). Returns (total ms per call, {kernel name: ms per call}).
  """
  import glob
  import tempfile

  from jax.profiler import ProfileData

  fn = jax.jit(fn)
  for args in arg_sets:
    block(fn(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      out = None
      for i in range(calls):
        out = fn(*arg_sets[i % len(arg_sets)])
      block(out)
    (trace_file,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    profile = ProfileData.from_file(trace_file)
  per_kernel: dict[str, float] = {}
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for event in line.events:
        per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.duration_ns
  if not per_kernel:
    lines = {plane.name: [line.name for line in plane.lines] for plane in profile.planes}
    raise RuntimeError(f"the profiler trace holds no GPU stream events: {lines}")
  per_kernel = {name: ns / 1e6 / calls for name, ns in per_kernel.items()}
  return sum(per_kernel.values()), per_kernel


def guarded(label: str, fn: Callable[[], Any], failures: list[str]) -> Any:
  """fn(), or None after printing and recording in `failures` what it raised: one failing
  candidate must not stop a benchmark run."""
  try:
    return fn()
  except Exception as e:
    msg = f"FAILED {label}: {type(e).__name__}: {str(e)[:400]}"
    print(msg, flush=True)
    traceback.print_exc(limit=3)
    failures.append(msg)
    return None


def median(samples: list[float]) -> float:
  return float(statistics.median(samples))


def spread(samples: list[float]) -> float:
  """(max - min) / median: the run-to-run spread to compare differences against."""
  m = statistics.median(samples)
  return float((max(samples) - min(samples)) / m) if m else 0.0


def _stream_bandwidth(op: Callable, bytes_per_element: int, nbytes: int, seed: int,
                      iters: int) -> dict:
  """Bandwidth of jitted `op` over an `nbytes` bf16 array counting `bytes_per_element`
  moved per element; two source buffers far larger than L2 alternate."""
  n = nbytes // 2
  srcs = [jax.random.normal(k, (n,), jnp.bfloat16)
          for k in jax.random.split(jax.random.key(seed), 2)]
  fn = jax.jit(op)
  state = {"i": 0}

  def call():
    state["i"] += 1
    return fn(srcs[state["i"] % 2])

  # A long warm-up: the clocks ramp up from idle (seen: 14% spread with 3 warm-ups).
  samples = time_calls(call, warmup=100, iters=iters, inner=5)
  ms, moved = median(samples), n * bytes_per_element
  return {"bytes_moved": moved, "median_ms": ms, "spread": spread(samples),
          "bytes_per_s": moved / (ms * 1e-3), "best_bytes_per_s": moved / (min(samples) * 1e-3)}


def measure_hbm_bandwidth(nbytes: int = 2 << 30, *, iters: int = 30) -> dict:
  """Device-to-device copy of an `nbytes` bf16 array: (bytes read + written) / median time."""
  return _stream_bandwidth(jnp.copy, 4, nbytes, 1, iters)


def measure_read_bandwidth(nbytes: int = 2 << 30, *, iters: int = 30) -> dict:
  """Read-only bandwidth: a float32-accumulated sum of an `nbytes` bf16 array.

  A GEMV reads its weight and writes almost nothing, and reads stream faster than a copy's
  mix of reads and writes; this is the tighter ceiling for decode.
  """
  return _stream_bandwidth(lambda x: jnp.sum(x, dtype=jnp.float32), 2, nbytes, 3, iters)


def measure_matmul_rate(n: int = 8192, *, iters: int = 30) -> dict:
  """bf16 [n, n] @ [n, n] on random data: 2 n^3 / median time."""
  keys = jax.random.split(jax.random.key(2), 4)
  mats = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys]
  matmul = jax.jit(lambda a, b: a @ b)
  state = {"i": 0}

  def call():
    state["i"] += 1
    i = state["i"] % 2
    return matmul(mats[2 * i], mats[2 * i + 1])

  samples = time_calls(call, warmup=100, iters=iters, inner=5)
  ms = median(samples)
  return {"n": n, "median_ms": ms, "spread": spread(samples),
          "flops_per_s": 2 * n**3 / (ms * 1e-3),
          "best_flops_per_s": 2 * n**3 / (min(samples) * 1e-3)}


def measure_ceilings(card: str) -> tuple[dict, dict]:
  """(copy bandwidth, bf16 matmul rate at 8192^3) as `measure_hbm_bandwidth` and
  `measure_matmul_rate` give them, printed in one line under the card's name."""
  bw = measure_hbm_bandwidth(1 << 30, iters=20)
  mm = measure_matmul_rate(8192, iters=10)
  print(f"card={card} jax={jax.__version__} HBM={bw['bytes_per_s'] / 1e12:.2f} TB/s "
        f"(copy) bf16={mm['flops_per_s'] / 1e12:.0f} TFLOP/s (8192^3)", flush=True)
  return bw, mm


class ResultWriter:
  """Appends DESIGN.md result lines to a JSONL file, one per `add`, flushed at once."""

  def __init__(self, path: str, bench: str, *, card: str | None = None,
               commit: str | None = None):
    self.path = path
    self.bench = bench
    self.card = card or card_name()
    self.commit = commit or git_commit()
    self.rows: list[dict] = []
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def add(self, *, case: dict, impl: str, baseline_impl: str, median_ms: float,
          baseline_median_ms: float, fraction_of_ceiling: float | None, ceiling: str,
          **extra) -> dict:
    row = {
        "bench": self.bench,
        "case": case,
        "impl": impl,
        "baseline_impl": baseline_impl,
        "card": self.card,
        "jax_version": jax.__version__,
        "median_ms": round(median_ms, 4),
        "baseline_median_ms": round(baseline_median_ms, 4),
        "ratio_vs_baseline": round(baseline_median_ms / median_ms, 4),
        "fraction_of_ceiling": (None if fraction_of_ceiling is None
                                else round(fraction_of_ceiling, 4)),
        "ceiling": ceiling,
        "date": datetime.date.today().isoformat(),
        "commit": self.commit,
        **extra,
    }
    self.rows.append(row)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    return row
