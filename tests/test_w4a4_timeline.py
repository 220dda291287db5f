"""bench/w4a4_timeline.py's reading of a Mosaic GPU profiler trace (the trace itself only
comes from a GPU)."""

from bench import w4a4_timeline


def _trace(phases_by_tid):
  """A Chrome trace as Mosaic GPU writes it: B / E events, ts in thousands of cycles."""
  events = []
  for tid, phases in phases_by_tid.items():
    for name, start, end in phases:
      events += [{"name": name, "ph": "B", "ts": start / 1e3, "pid": 1, "tid": tid},
                 {"name": name, "ph": "E", "ts": end / 1e3, "pid": 1, "tid": tid}]
  return {"traceEvents": sorted(events, key=lambda e: e["ts"])}


def _groups(offset, n=3, period=1000):
  """One warpgroup's phases for n groups: unpack 50, issue 50, wait 400, rescale 300."""
  out = []
  for i in range(n):
    t = offset + i * period
    out += [("unpack", t, t + 50), ("issue", t + 50, t + 100), ("wait", t + 100, t + 500),
            ("rescale", t + 500, t + 800)]
  return out


def test_summary_of_two_warpgroups_taking_turns():
  # Program 0: trace ids 1, 2 compute (3 would be the load warpgroup, with no phases).
  # The second warpgroup runs half a period behind the first.
  summary = w4a4_timeline.summarize(_trace({1: _groups(0), 2: _groups(500)}))
  assert summary["compute_warpgroups"] == 2
  assert summary["phase_cycles"] == {"unpack": 50, "issue": 50, "wait": 400, "rescale": 300}
  assert summary["period_cycles"] == 1000
  assert summary["issue_gap_cycles"] == 500
  # In flight: [50, 500] and [550, 1000] per period, from 50 to 3300 in all.
  assert summary["wgmma_in_flight_share"] == round(2700 / 3300, 3)


def test_summary_of_two_warpgroups_in_step():
  summary = w4a4_timeline.summarize(_trace({1: _groups(0), 2: _groups(0)}))
  assert summary["issue_gap_cycles"] == 0
  assert summary["wgmma_in_flight_share"] == round(1350 / 2800, 3)
