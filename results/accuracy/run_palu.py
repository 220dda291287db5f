"""Perplexity of SmolLM2 / Gemma 3 after Palu's low-rank K/V transform (lowbit.palu), on the CPU.

Calibration on Emma (shipped): 32 windows of 512 tokens for the whitening Grams, the first
`--fisher-windows` of them for the Fisher scores. Evaluation on Pride and Prejudice, the
first 8192 tokens in windows of 2048 (the protocol of recipes.md). The statistics are computed
once per model and cached (`--stats`), then every row is one transform + one evaluation.

  python results/accuracy/run_palu.py --model smollm2-135m --rows joint-uniform-50 ...
Rows are named {joint|head|nowhiten}-{uniform|fisher}-{compression %}[-lt{bits}][-had];
"float" evaluates the untouched model. Each result is appended to --out as it finishes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("LOWBIT_CACHE", "/tmp/lbcache")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax
import numpy as np
from flax import nnx

import lowbit.lowrank  # noqa: F401  (registers LowRankKV's Linear implementation)
from lowbit import palu
from lowbit.data import read_text, text_path
from lowbit.recipes import load_into
from models.loading import load_pretrained
from train.perplexity import make_windows, perplexity



def parse_row(name: str) -> dict:
  parts = name.split("-")
  kind, method, compression = parts[0], parts[1], int(parts[2])
  row = dict(ratio=round(1 - compression / 100, 4), rank_method=method,
             group_heads={"joint": "all", "nowhiten": "all", "head": 1}[kind],
             whiten=kind != "nowhiten", latent_bits=None, hadamard=False)
  for extra in parts[3:]:
    if extra.startswith("lt"):
      row["latent_bits"] = int(extra[2:])
    elif extra == "had":
      row["hadamard"] = True
    else:
      raise ValueError(f"unknown row part {extra!r} in {name!r}")
  return row


def kv_bytes_per_token(params, model) -> float:
  """K/V cache bytes per token over all layers: fp16 latents (quantized: bits / 8 plus an
  fp16 scale and zero per group), or fp16 K and V for dense projections."""
  total = 0.0
  for i, layer in enumerate(model.layers):
    attn = params["layers"][i]["attn"]
    for proj in ("k_proj", "v_proj"):
      w = attn[proj]["weight"]
      if isinstance(w, lowbit.lowrank.LowRankKV):
        total += w.latent_bytes_per_token()
      else:
        total += w.shape[0] * 2
  return total


def table(path) -> str:
  """The markdown table of palu.md from the records at `path` (one row per record)."""
  lines = ["| model | row | group | ranks | KV kept | latent bits | perplexity | vs float | "
           "KV bytes/token | compress s | eval s |", "|---" * 11 + "|"]
  records = [json.loads(line) for line in open(path)]
  floats = {r["model"]: r["perplexity"] for r in records if r["recipe"] == "float"}
  for r in records:
    s = r.get("settings") or {}
    base = floats.get(r["model"])
    ratio = "-" if base is None else f"{r['perplexity'] / base:.3f}x"
    group = {"all": "joint", 1: "per head"}.get(s.get("group_heads"), "-")
    if s and not s["whiten"]:
      group += ", no whitening"
    bits = "-" if not s.get("latent_bits") else (
        f"{s['latent_bits']}" + (" + Hadamard" if s["hadamard"] else ""))
    lines.append(
        f"| {r['model']} | {r['row']} | {group} | {s.get('rank_method', '-')} | "
        f"{r.get('kv_kept_fraction', 1.0):.3f} | {bits} | {r['perplexity']:.3f} | "
        f"{ratio} | "
        f"{r['kv_bytes_per_token']:,.0f} | {r.get('compress_seconds', '-')} | {r['seconds']} |")
  return "\n".join(lines)


def rank_table(path, row: str, model: str = "smollm2-135m") -> str:
  """Per-layer K and V ranks of one record (text, one line per layer)."""
  for line in open(path):
    r = json.loads(line)
    if r["row"] == row and r["model"] == model:
      ranks = r["ranks"]
      n = len(ranks) // 2
      out = ["| layer | " + " | ".join(str(i) for i in range(n)) + " |",
             "|---" * (n + 1) + "|"]
      for proj in ("k_proj", "v_proj"):
        out.append(f"| {proj[0].upper()} | " + " | ".join(
            str(ranks[f"layers.{i}.attn.{proj}"]) for i in range(n)) + " |")
      return "\n".join(out)
  raise KeyError(row)


def main(argv=None):
  if argv is None and sys.argv[1:2] == ["--table"]:
    out = str(ROOT / "results/accuracy/palu.jsonl")
    print(table(out))
    for row in sys.argv[2:]:
      print(f"\n{row}:\n" + rank_table(out, row))
    return
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="smollm2-135m")
  p.add_argument("--rows", nargs="+", required=True)
  p.add_argument("--out", default=str(ROOT / "results/accuracy/palu.jsonl"))
  p.add_argument("--stats", default=None, help="cache file of the calibration statistics")
  p.add_argument("--calib", default="emma")
  p.add_argument("--calib-samples", type=int, default=32)
  p.add_argument("--calib-seq-len", type=int, default=512)
  p.add_argument("--fisher-windows", type=int, default=4)
  p.add_argument("--text", default="pride-and-prejudice")
  p.add_argument("--seq-len", type=int, default=2048)
  p.add_argument("--max-tokens", type=int, default=8192)
  args = p.parse_args(argv)
  command = "python results/accuracy/run_palu.py " + " ".join(shlex.quote(a) for a in
                                                               (argv or sys.argv[1:]))
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
  model, tokenizer = load_pretrained(args.model)
  config = model.config
  bos = config.bos_token_id if config.add_bos else None
  calib = make_windows(tokenizer.encode(read_text(args.calib)), args.calib_seq_len,
                       max_tokens=args.calib_samples * args.calib_seq_len, bos_id=bos)
  eval_ids = tokenizer.encode(read_text(args.text))
  stats_path = Path(args.stats or f"/tmp/palu_stats_{args.model}.pkl")
  stats_seconds = None
  if any(r != "float" for r in args.rows):
    if stats_path.exists():
      with open(stats_path, "rb") as f:
        stats, stats_seconds = pickle.load(f)
    else:
      start = time.perf_counter()
      stats = palu.palu_statistics(model, calib, fisher_windows=args.fisher_windows)
      stats_seconds = round(time.perf_counter() - start, 1)
      with open(stats_path, "wb") as f:
        pickle.dump((stats, stats_seconds), f)
  original = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for name in args.rows:
    record = dict(model=args.model, row=name, text=text_path(args.text).name,
                  calib_text=None, date=datetime.date.today().isoformat(), commit=commit,
                  command=command)
    params = original
    if name != "float":
      row = parse_row(name)
      start = time.perf_counter()
      params = palu.palu_compress(model, ratio=row["ratio"], group_heads=row["group_heads"],
                                  rank_method=row["rank_method"],
                                  latent_bits=row["latent_bits"], hadamard=row["hadamard"],
                                  whiten=row["whiten"], statistics=stats, log=None)
      compress_seconds = round(time.perf_counter() - start, 1)
      ranks = palu.palu_ranks(model, ratio=row["ratio"], group_heads=row["group_heads"],
                              rank_method=row["rank_method"], fisher=stats.fisher)
      record.update(recipe="palu", settings=row, calib_text=text_path(args.calib).name,
                    calib_samples=int(calib.shape[0]), calib_seq_len=int(calib.shape[1]),
                    fisher_windows=stats.fisher_windows if row["rank_method"] == "fisher"
                    else None, kv_kept_fraction=palu.kv_cache_fraction(params),
                    ranks=ranks, compress_seconds=compress_seconds,
                    stats_seconds=stats_seconds)
      load_into(model, params)
    else:
      record.update(recipe="float")
    start = time.perf_counter()
    result = perplexity(model, eval_ids, args.seq_len, max_tokens=args.max_tokens,
                        progress=False)
    record = dict(result, **record, seconds=round(time.perf_counter() - start, 1),
                  kv_bytes_per_token=kv_bytes_per_token(params, model),
                  weight_bytes=sum(int(x.nbytes) for x in jax.tree.leaves(params)),
                  max_tokens=args.max_tokens)
    load_into(model, original)
    with open(args.out, "a") as f:
      f.write(json.dumps(record) + "\n")
    print(f"{args.model} {name}: perplexity {result['perplexity']:.3f} "
          f"({record['seconds']} s)", flush=True)


if __name__ == "__main__":
  main()
