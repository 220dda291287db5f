"""bench/w4a16_timeline.py's reading of a Mosaic GPU profiler trace (the trace itself only
comes from a GPU)."""

from bench import w4a16_timeline


def _trace(programs):
  """A Chrome trace as Mosaic GPU writes it: ts = (start ns + cycles since the first
  event) / 1e3, pid = 1 + SM, one trace id per program (one warpgroup each)."""
  events = []
  for tid, (sm, start_ns, phases) in enumerate(programs, start=1):
    for name, begin, end in phases:
      events += [{"name": name, "ph": "B", "ts": (start_ns + begin) / 1e3, "pid": 1 + sm,
                  "tid": tid},
                 {"name": name, "ph": "E", "ts": (start_ns + end) / 1e3, "pid": 1 + sm,
                  "tid": tid}]
  return {"traceEvents": sorted(events, key=lambda e: e["ts"])}


def _program(first_data=1000, steps=2, gap=300):
  """One program: its first data after `first_data` cycles, steps of two groups (unpack
  100, issue 20 each, wait 200, scale 30), `gap` cycles between steps, a 400-cycle store."""
  phases, t = [], first_data
  for _ in range(steps):
    for _ in range(2):
      phases += [("unpack", t, t + 100), ("issue", t + 100, t + 120)]
      t += 120
    phases += [("wait", t, t + 200), ("scale", t + 200, t + 230)]
    t += 230 + gap
  t -= gap
  phases += [("pipeline", 0, t), ("store", t, t + 400)]
  return phases


def test_summary_of_programs_on_two_sms():
  # SM 0: two programs side by side, then one after them; SM 1: one program. 2000 cycles
  # per program = 1000 ns at 2 GHz.
  program = _program()
  trace = _trace([(0, 0, program), (0, 0, program), (0, 1000, program), (1, 0, program)])
  summary = w4a16_timeline.summarize(trace, clock_ghz=2.0)
  assert summary["programs"] == 4 and summary["sms"] == 2
  assert summary["phase_cycles"] == {"pipeline": 1000 + 470 + 300 + 470, "unpack": 100,
                                     "issue": 20, "wait": 200, "scale": 30, "store": 400}
  assert summary["lifetime_cycles"] == 2640
  assert summary["first_data_cycles"] == 1000
  assert summary["step_gap_cycles"] == 300
  assert summary["programs_per_sm"] == 2  # median of 3 and 1
  # SM 0: 3 x 1320 ns over [0, 2320] ns; SM 1: 1320 over 1320.
  assert summary["resident_programs_per_sm"] == round((3 * 1320 / 2320 + 1.0) / 2, 2)


def test_programs_without_phases_are_left_out():
  trace = _trace([(0, 0, _program()), (0, 0, [("store", 0, 10)])])
  summary = w4a16_timeline.summarize(trace, clock_ghz=2.0)
  assert summary["programs"] == 1


def test_summarize_trace_reads_the_one_trace_and_appends_a_line(tmp_path):
  import json

  from bench.w4a4_timeline import summarize_trace
  trace_dir, out_dir = tmp_path / "trace", tmp_path / "out"
  trace_dir.mkdir()
  (trace_dir / "t.json").write_text(json.dumps(_trace([(0, 0, _program())])))
  for _ in range(2):
    summary = summarize_trace(str(trace_dir), w4a16_timeline.summarize, str(out_dir),
                              "w4a16_timeline.jsonl", n=128)
  assert summary["programs"] == 1 and summary["n"] == 128
  lines = (out_dir / "w4a16_timeline.jsonl").read_text().splitlines()
  assert [json.loads(line)["lifetime_cycles"] for line in lines] == [2640, 2640]
