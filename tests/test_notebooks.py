"""The Colab notebooks run top to bottom on a CPU (real model, real text).

Each code cell runs in one namespace, in order, as Colab would; shell and magic lines
(`%pip install`, `!lowbit ...`) are left out (the test runs inside the installed project).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "colab").glob("*.ipynb"))


def run_notebook(path: Path) -> dict:
  namespace: dict = {}
  for i, cell in enumerate(json.loads(path.read_text())["cells"]):
    if cell["cell_type"] != "code":
      continue
    source = "".join(line for line in cell["source"]
                     if not line.lstrip().startswith(("%", "!")))
    exec(compile(source, f"{path.name}, cell {i}", "exec"), namespace)  # noqa: S102
  return namespace


@pytest.mark.real_model
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
  namespace = run_notebook(path)
  if path.name == "quickstart.ipynb":
    assert 15 < namespace["result"]["perplexity"] < 30
  if path.name == "compress.ipynb":
    results = namespace["results"]
    # Quantization and low rank cost perplexity in the order the results tables give.
    assert results["float"] < results["w8a8"] < 1.05 * results["float"]
    assert results["kv4"] < results["kv4-token"]
    assert results["float"] < results["palu 50% + 4-bit latents"] < 2 * results["float"]
