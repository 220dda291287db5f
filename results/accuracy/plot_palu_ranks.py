"""Plot Palu's rank allocation per layer (K and V, Fisher against uniform) from palu.jsonl.

  pip install 'lowbit[plot]'   # matplotlib
  python results/accuracy/plot_palu_ranks.py   # -> results/accuracy/palu_ranks.png

One panel per (model, compression) with Fisher rows in palu.jsonl; each panel shows the rank
kept by every layer's K and V projection under Fisher ranks (bars) and the rank every
module keeps under uniform ranks (dashed line): the same total.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent


def fisher_records(path: Path) -> list[dict]:
  """Records of joint Fisher rows, with their uniform twin's ranks attached."""
  records = [json.loads(line) for line in open(path)]
  by_key = {(r["model"], r["row"]): r for r in records}
  out = []
  for r in records:
    if r["row"].startswith("joint-fisher-") and "lt" not in r["row"]:
      uniform = by_key.get((r["model"], r["row"].replace("fisher", "uniform")))
      out.append(dict(r, uniform_ranks=uniform["ranks"] if uniform else None))
  return out


def plot(records: list[dict], out: Path) -> None:
  fig, axes = plt.subplots(len(records), 1, figsize=(9, 2.6 * len(records)), squeeze=False)
  for ax, r in zip(axes[:, 0], records):
    ranks = r["ranks"]
    n = len(ranks) // 2
    layers = np.arange(n)
    for offset, proj, color in ((-0.2, "k_proj", "tab:blue"), (0.2, "v_proj", "tab:orange")):
      kept = [ranks[f"layers.{i}.attn.{proj}"] for i in range(n)]
      ax.bar(layers + offset, kept, width=0.4, color=color, label=f"{proj[0].upper()} (Fisher)")
    if r["uniform_ranks"]:
      ax.axhline(r["uniform_ranks"]["layers.0.attn.k_proj"], color="gray", linestyle="--",
                 label="uniform")
    ax.set_ylim(0, max(ranks.values()) * 1.25)
    ax.set_title(f"{r['model']}, {r['row']} (ppl {r['perplexity']:.2f})", fontsize=9)
    ax.set_ylabel("rank kept")
    ax.set_xticks(layers)
    ax.legend(fontsize=7, ncol=3, loc="upper right")
  axes[-1, 0].set_xlabel("layer")
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  plot(fisher_records(HERE / "palu.jsonl"), HERE / "palu_ranks.png")
