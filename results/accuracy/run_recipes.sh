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
# W4A4 with 4-bit caches (kv_cache setting of the folder overridden at eval time).
lowbit eval --model "$out/quarot-w4a4" "${eval_args[@]}" --kv-cache kv4
lowbit eval --model "$out/atom-w4a4" "${eval_args[@]}" --kv-cache kv4
lowbit eval --model "$out/atom-w4a4" "${eval_args[@]}" --kv-cache kv4-atom
# seq_len 512, dense cache.
eval_512=(--text pride-and-prejudice --seq-len 512 --max-tokens 8192 --kv-cache dense --json
          --out results/accuracy/recipes.jsonl)
lowbit eval --model smollm2-135m "${eval_512[@]}"
for recipe in rtn w4a16 w8a8 atom-w4a4 quarot-w4a4; do
  lowbit eval --model "$out/$recipe" "${eval_512[@]}"
done
# Gemma 3 270M (groups of 128; its GGUF weights lie on a 4-bit grid of 32).
lowbit compress --model gemma3-270m --recipe w4a16 --calib emma --calib-samples 32 \
  --calib-seq-len 512 --out "$out/gemma-w4a16"
for recipe in atom-w4a4 quarot-w4a4; do
  lowbit compress --model gemma3-270m --recipe "$recipe" --calib emma --calib-samples 16 \
    --calib-seq-len 512 --out "$out/gemma-$recipe"
done
for recipe in w4a16 atom-w4a4 quarot-w4a4; do
  lowbit eval --model "$out/gemma-$recipe" "${eval_args[@]}" --kv-cache dense
done
# Gemma 3's full W4A4 recipes with their default 4-bit caches.
lowbit eval --model "$out/gemma-atom-w4a4" "${eval_args[@]}" --kv-cache kv4-atom
lowbit eval --model "$out/gemma-quarot-w4a4" "${eval_args[@]}" --kv-cache kv4
