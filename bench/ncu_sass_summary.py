"""Instruction mix and stall samples of one kernel, from Nsight Compute's source page.

Nsight Compute's per-instruction counters say which instructions a kernel spends its issue
slots and its waits on. This reads the CSV that
`ncu -i REPORT.ncu-rep --page source --csv --print-source sass > sass.csv` writes and prints:
  * each opcode's share of executed instructions and of warp stall samples;
  * the loop bodies: instructions grouped by how often they ran (an instruction run
    tiles x groups x warps times belongs to the per-group loop), with each group's
    count, its opcode mix and the stall reasons that dominate it.

Usage:  python3 -m bench.ncu_sass_summary sass.csv [--top 25]
How bench/results/quantized_matmul.md (runs 31, 39) read the Mosaic GPU kernels.
"""

from __future__ import annotations

import argparse
import collections
import csv

EXECUTED = "Instructions Executed"
SAMPLES = "Warp Stall Sampling (All Samples)"


def _number(text: str) -> float:
  return float(text.replace(",", "")) if text else 0.0


def read_rows(path: str) -> tuple[list[str], list[dict]]:
  """The source page's header and one dict per SASS instruction."""
  with open(path, newline="") as f:
    rows = list(csv.reader(f))
  start = next(i for i, row in enumerate(rows) if row and row[0] == "Address")
  header = rows[start]
  return header, [dict(zip(header, row)) for row in rows[start + 1:] if len(row) > 5]


def opcode(source: str) -> str:
  """'@!P0 IGMMA.64x128x32.S8.S8 R24, ...' -> 'IGMMA' (predicate and modifiers dropped)."""
  words = [w for w in source.split() if not w.startswith("@")]
  return words[0].split(".")[0] if words else "?"


def summarize(path: str, top: int) -> str:
  header, rows = read_rows(path)
  stall_columns = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
  executed = collections.Counter()
  sampled = collections.Counter()
  for row in rows:
    executed[opcode(row["Source"])] += _number(row[EXECUTED])
    sampled[opcode(row["Source"])] += _number(row[SAMPLES])
  total_executed = sum(executed.values()) or 1.0
  total_sampled = sum(sampled.values()) or 1.0
  lines = [f"{len(rows)} instructions, {total_executed:.4g} executed, "
           f"{total_sampled:.0f} stall samples", "", "opcode        executed  samples"]
  for name, count in executed.most_common(top):
    lines.append(f"{name:12s} {100 * count / total_executed:8.2f}% "
                 f"{100 * sampled[name] / total_sampled:7.2f}%")
  lines += ["", "loop bodies (instructions that ran equally often):"]
  by_count = collections.defaultdict(list)
  for row in rows:
    if _number(row[EXECUTED]):
      by_count[_number(row[EXECUTED])].append(row)
  for count, body in sorted(by_count.items(), key=lambda kv: -kv[0] * len(kv[1]))[:top]:
    mix = collections.Counter(opcode(r["Source"]) for r in body)
    stalls = collections.Counter()
    for r in body:
      for column in stall_columns:
        stalls[column[len("stall_"):]] += _number(r[column])
    samples = sum(_number(r[SAMPLES]) for r in body)
    lines.append(f"  ran {count:.0f}x: {len(body)} instructions, "
                 f"{100 * samples / total_sampled:.1f}% of samples; "
                 + ", ".join(f"{n} {k}" for k, n in mix.most_common(6))
                 + "; stalls: " + ", ".join(f"{k} {100 * v / max(samples, 1):.0f}%"
                                           for k, v in stalls.most_common(3)))
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)
  print(summarize(args.csv, args.top))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
