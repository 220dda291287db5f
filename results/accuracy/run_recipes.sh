#!/usr/bin/env bash
# Perplexity of SmolLM2 after each recipe (lowbit compress), on the CPU. Calibration on Emma
# (shipped), evaluation on Pride and Prejudice: the first 8192 tokens, windows of 2048.
# Weights at group 64, not 32: SmolLM2's weights already lie on a 4-bit grid of 32 (DATA.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/lowbit-recipes}
mkdir -p "$out"
eval_args=(--text pride-and-prejudice --seq-len 2048 --max-tokens 8192 --json
           --out results/accuracy/recipes.jsonl)
lowbit eval --model smollm2-135m "${eval_args[@]}"
lowbit compress --model smollm2-135m --recipe rtn --set group_size=64 --out "$out/rtn"
lowbit compress --model smollm2-135m --recipe w4a16 --set group_size=64 --calib emma \
  --calib-samples 32 --calib-seq-len 512 --out "$out/w4a16"
lowbit compress --model smollm2-135m --recipe w8a8 --out "$out/w8a8"
lowbit compress --model smollm2-135m --recipe atom-w4a4 --calib emma --calib-samples 16 \
  --calib-seq-len 512 --out "$out/atom-w4a4"
lowbit compress --model smollm2-135m --recipe quarot-w4a4 --calib emma --calib-samples 16 \
  --calib-seq-len 512 --out "$out/quarot-w4a4"
for recipe in rtn w4a16 w8a8 atom-w4a4 quarot-w4a4; do
  lowbit eval --model "$out/$recipe" "${eval_args[@]}"
done
