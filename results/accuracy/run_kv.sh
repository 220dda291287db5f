#!/usr/bin/env bash
# Perplexity of SmolLM2 and Gemma 3 with each KV cache format (no weight change), on the CPU.
# Evaluation: Pride and Prejudice, the first 8192 tokens, windows of 2048 and of 512. KV
# quantization needs no calibration text.
set -euo pipefail
cd "$(dirname "$0")/../.."
# (Gemma 3 at 512 was not run for kv_cache.md.)
for run in smollm2-135m:2048 smollm2-135m:512 gemma3-270m:2048; do
  for kv in dense kv8 kv4 kv4-token kv4-atom kv2; do
    lowbit eval --model "${run%:*}" --kv-cache "$kv" --text pride-and-prejudice \
      --seq-len "${run#*:}" --max-tokens 8192 --json --out results/accuracy/kv_cache.jsonl
  done
done
