"""Per-phase timeline of the Atom W4A4 register-weights kernel, from Mosaic GPU's profiler.

bench/results/quantized_matmul.md (runs 39-46) found the tensor cores idle 62% of the
time, and six ways to overlap the rescale with the wgmmas all slower. This measures what
each compute warpgroup does per group (unpack, issue, wait, rescale; the kernel names
these phases) and whether the two compute warpgroups of a program take turns or move in
step. `mosaic_gpu.w4a4_matmul(..., profile_dir=DIR)` makes Mosaic GPU record each phase's
start and end with the SM's cycle counter and write a Chrome trace to DIR; `summarize`
turns that trace into:
  * each phase's median length in cycles, and the time per group (the period: a
    warpgroup's first to last unpack over the groups between);
  * how far apart the two compute warpgroups issue the same group, and the share of each
    program's time in which at least one of them has a wgmma in flight (issue start to
    wait end), the most the tensor cores can be busy.

Usage (GPU):  python3 -m bench.w4a4_timeline --out $OUT [--n 14336 --k 4096 --m 1024]
Cross-warpgroup times are aligned by the trace's per-warpgroup start time (globaltimer)
plus cycles since each warpgroup's first phase: good to tens of cycles when both start
on the same barrier, as here.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import tempfile

PHASES = ("unpack", "issue", "wait", "rescale")
WARPGROUPS_PER_PROGRAM = 3  # two compute warpgroups and the one that issues the loads


def intervals(trace: dict) -> dict[int, list[tuple[str, float, float]]]:
  """{trace id: [(phase, start, end)] in time order}; times in cycles (the trace's
  microsecond field holds thousands of cycles)."""
  open_at, out = {}, collections.defaultdict(list)
  for event in trace["traceEvents"]:
    key = (event["tid"], event["name"])
    if event["ph"] == "B":
      open_at[key] = event["ts"] * 1e3
    elif key in open_at:
      out[event["tid"]].append((event["name"], open_at.pop(key), event["ts"] * 1e3))
  return {tid: sorted(spans, key=lambda s: s[1]) for tid, spans in out.items()}


def summarize(trace: dict) -> dict:
  spans = {tid: s for tid, s in intervals(trace).items() if any(p == "rescale" for p, *_ in s)}
  lengths = collections.defaultdict(list)
  periods, issue_gaps, busy_shares = [], [], []
  for s in spans.values():
    for phase, start, end in s:
      lengths[phase].append(end - start)
    starts = [start for phase, start, _ in s if phase == "unpack"]
    if len(starts) > 1:
      periods.append((starts[-1] - starts[0]) / (len(starts) - 1))
  programs = collections.defaultdict(list)
  for tid, s in spans.items():
    programs[(tid - 1) // WARPGROUPS_PER_PROGRAM].append(s)
  for pair in programs.values():
    if len(pair) != 2:
      continue
    issues = [[start for phase, start, _ in s if phase == "issue"] for s in pair]
    issue_gaps += [abs(a - b) for a, b in zip(*issues)]
    # A group's wgmma is in flight from its issue to the end of the wait for it (waits
    # come in issue order).
    windows = []
    for s in pair:
      issued = collections.deque()
      for phase, start, end in s:
        if phase == "issue":
          issued.append(start)
        elif phase == "wait" and issued:
          windows.append((issued.popleft(), end))
    windows.sort()
    busy, reach = 0.0, float("-inf")
    for start, end in windows:
      busy += max(0.0, end - max(start, reach))
      reach = max(reach, end)
    first = min(s[0][1] for s in pair)
    last = max(s[-1][2] for s in pair)
    if last > first:
      busy_shares.append(busy / (last - first))
  median = lambda v, digits=1: round(statistics.median(v), digits) if v else None
  return {
      "compute_warpgroups": len(spans),
      "phase_cycles": {p: median(lengths[p]) for p in PHASES},
      "period_cycles": median(periods),
      "issue_gap_cycles": median(issue_gaps),
      "wgmma_in_flight_share": median(busy_shares, 3),
  }


def summarize_trace(trace_dir: str, summarize_fn, out_dir: str, jsonl_name: str,
                    **fields) -> dict:
  """The one trace a profiled call wrote to trace_dir, summarized, with `fields` added and
  appended as one line to out_dir/jsonl_name."""
  [path] = glob.glob(os.path.join(trace_dir, "*.json"))
  with open(path) as f:
    summary = summarize_fn(json.load(f))
  summary.update(fields)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, jsonl_name), "a") as f:
    f.write(json.dumps(summary) + "\n")
  return summary


def run(out_dir: str, n: int, k: int, m: int, n_out: int, block_sizes=None) -> dict:
  """One traced call of the kernel at N x K (the last n_out channels the int8 tail)."""
  import jax.numpy as jnp
  import numpy as np

  from pallas_kernels.quantized_matmul import mosaic_gpu

  rng = np.random.default_rng(0)
  codes = lambda *shape: jnp.asarray(rng.integers(-128, 128, shape, dtype=np.int8))
  scales = lambda *shape: jnp.asarray(rng.uniform(0.01, 0.02, shape).astype(np.float32))
  k_main, g = k - n_out, 128
  args = [codes(m, k_main // 2), scales(m, k_main // g), codes(n, k_main // 2),
          scales(n, k_main // g)]
  if n_out:
    args += [codes(m, n_out), scales(m, 1), codes(n, n_out), scales(n, 1)]
  trace_dir = tempfile.mkdtemp(prefix="w4a4_trace_")
  mosaic_gpu.w4a4_matmul(*args, group_size=g, block_sizes=block_sizes,
                         profile_dir=trace_dir).block_until_ready()
  return summarize_trace(
      trace_dir, summarize, out_dir, "w4a4_timeline.jsonl", n=n, k=k, m=m,
      n_outliers=n_out, block_sizes=str(block_sizes or mosaic_gpu.MosaicW4A4BlockSizes
                                        .get_default(n, m, k_main // g, n_out, g)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--n", type=int, default=14336)
  p.add_argument("--k", type=int, default=4096)
  p.add_argument("--m", type=int, default=1024)
  p.add_argument("--outliers", type=int, default=128)
  p.add_argument("--groups-per-step", type=int, default=0,
                 help="1 or 2 with a 4- or 2-step ring (default: get_default's choice)")
  args = p.parse_args(argv)
  block_sizes = None
  if args.groups_per_step:
    from pallas_kernels.quantized_matmul import mosaic_gpu
    block_sizes = mosaic_gpu.MosaicW4A4BlockSizes(
        block_m=128, block_n=128, register_weights=True,
        groups_per_step=args.groups_per_step,
        max_concurrent_steps=4 if args.groups_per_step == 1 else 2)
  print(json.dumps(run(args.out, args.n, args.k, args.m, args.outliers, block_sizes)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
