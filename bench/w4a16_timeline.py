"""Per-program timeline of the Mosaic GPU W4A16 decode kernel, from Mosaic GPU's profiler.

bench/results/quantized_matmul.md (runs 29-33, 48-50) found the kernel at 1.4-1.6x the time
its TMA ring alone takes, and that neither fewer instructions per code (the bias folded
out of the unpack, run 48) nor a store that waits for its reads only (run 50) moves it.
This asks where each program's time goes. `mosaic_gpu.partial_products(...,
profile_dir=DIR)` records, per program (one warpgroup), the phases "pipeline" (from
before the first loads to after the last step), per step "unpack" and "issue" per group,
"wait" and "scale", then "store", with the SM's cycle counter and the SM it ran on.
`summarize` turns the trace into:
  * each phase's median length in cycles, the program's lifetime, the time from its start
    to its first unpack (the first loads' latency), and the gap between one step's scale
    and the next step's unpack (waiting for the next step's data);
  * per SM: how many programs ran there, and how many were resident on average over the
    SM's busy span (the sum of lifetimes over the span from the first start to the last
    end), the occupancy the kernel really had.

Usage (GPU):  python3 -m bench.w4a16_timeline --out $OUT [--n 14336 --k 4096 --m 1]
The trace's times are a warpgroup's start (globaltimer, ns) plus cycles since its first
event; per-SM spans convert lifetimes to ns at `--clock-ghz` (H200's 1.98 GHz boost
clock by default, an assumption the result states).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import tempfile

from bench.w4a4_timeline import intervals, summarize_trace

PHASES = ("pipeline", "unpack", "issue", "wait", "scale", "store")
WARMUP_MATMULS = 200


def _program_times(spans: list[tuple[str, float, float]]) -> dict | None:
  """Lifetime and waits of one program from its (phase, start, end) spans, in cycles."""
  pipeline = [s for s in spans if s[0] == "pipeline"]
  unpacks = [s for s in spans if s[0] == "unpack"]
  if not pipeline or not unpacks:
    return None
  start = pipeline[0][1]
  end = max(e for _, _, e in spans)
  # A step begins with its first group's unpack after the last step's scale; the gap
  # before it is the wait for its data (and the release of the last step's slot).
  step_starts, scale_ends, in_step = [], [], False
  for phase, span_start, span_end in spans:
    if phase == "unpack" and not in_step:
      step_starts.append(span_start)
      in_step = True
    elif phase == "scale":
      scale_ends.append(span_end)
      in_step = False
  gaps = [nxt - prev for prev, nxt in zip(scale_ends, step_starts[1:])]
  return {"start": start, "lifetime": end - start, "first_data": unpacks[0][1] - start,
          "step_gaps": gaps}


def summarize(trace: dict, clock_ghz: float = 1.98) -> dict:
  by_tid = intervals(trace)
  sm_of = {e["tid"]: e["pid"] - 1 for e in trace["traceEvents"]}
  lengths = collections.defaultdict(list)
  lifetimes, first_data, step_gaps = [], [], []
  per_sm = collections.defaultdict(list)                    # sm: [(start ns, end ns)]
  for tid, spans in by_tid.items():
    for phase, start, end in spans:
      lengths[phase].append(end - start)
    times = _program_times(spans)
    if times is None:
      continue
    lifetimes.append(times["lifetime"])
    first_data.append(times["first_data"])
    step_gaps += times["step_gaps"]
    # ts was (start ns + cycles) / 1e3 and intervals() multiplied it back by 1e3: the
    # first event's time is the start in ns; the lifetime is in cycles.
    start_ns = times["start"]
    per_sm[sm_of[tid]].append((start_ns, start_ns + times["lifetime"] / clock_ghz))
  resident, programs, ends = [], [], []
  for spans in per_sm.values():
    ends.append(max(e for _, e in spans))
    busy = max(e for _, e in spans) - min(s for s, _ in spans)
    programs.append(len(spans))
    if busy > 0:
      resident.append(sum(e - s for s, e in spans) / busy)
  median = lambda v, digits=1: round(statistics.median(v), digits) if v else None
  return {
      "programs": len(lifetimes),
      "phase_cycles": {p: median(lengths[p]) for p in PHASES},
      "lifetime_cycles": median(lifetimes),
      "first_data_cycles": median(first_data),
      "step_gap_cycles": median(step_gaps),
      "sms": len(per_sm),
      "programs_per_sm": median(programs),
      "resident_programs_per_sm": median(resident, 2),
      # The kernel's length at the assumed clock: check it against its unprofiled time.
      "span_us": round((max(ends) - min(s for v in per_sm.values() for s, _ in v)) / 1e3, 2)
      if per_sm else None,
      "clock_ghz_assumed": clock_ghz,
  }


def run(out_dir: str, n: int, k: int, m: int, block_sizes=None,
        clock_ghz: float = 1.98) -> dict:
  """One traced call of the kernel on random (non-zero) codes at N x K, M tokens."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from pallas_kernels.quantized_matmul import mosaic_gpu

  rng = np.random.default_rng(0)
  g = 128
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  codes = jnp.asarray(rng.integers(-128, 128, (n, k // 2), dtype=np.int8))
  scales = jnp.asarray(rng.uniform(0.01, 0.02, (n, k // g)).astype(np.float32))
  bs = block_sizes or mosaic_gpu.MosaicBlockSizes.get_default(n, k, g)
  operands = mosaic_gpu.kernel_operands(x, codes, scales, group_size=g, block_sizes=bs)
  trace_dir = tempfile.mkdtemp(prefix="w4a16_trace_")
  traced = lambda: mosaic_gpu.partial_products(*operands, group_size=g, block_sizes=bs,
                                               profile_dir=trace_dir)
  traced().block_until_ready()  # compiles; an idle GPU's clocks make this trace no guide
  for path in glob.glob(os.path.join(trace_dir, "*.json")):
    os.remove(path)
  # Queued behind ~0.3 s of bf16 matmuls, the traced call runs at working clocks.
  a = jnp.asarray(rng.standard_normal((8192, 8192)), jnp.bfloat16)
  square = jax.jit(lambda a: (a @ a) * (1 / 90.5))  # keeps entries ~1: sqrt(8192)
  for _ in range(WARMUP_MATMULS):
    a = square(a)
  traced().block_until_ready()
  return summarize_trace(trace_dir, lambda trace: summarize(trace, clock_ghz), out_dir,
                         "w4a16_timeline.jsonl", n=n, k=k, m=m, block_sizes=str(bs))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--n", type=int, default=14336)
  p.add_argument("--k", type=int, default=4096)
  p.add_argument("--m", type=int, default=1)
  p.add_argument("--clock-ghz", type=float, default=1.98)
  args = p.parse_args(argv)
  print(json.dumps(run(args.out, args.n, args.k, args.m, clock_ghz=args.clock_ghz)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
