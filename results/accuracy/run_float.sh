#!/usr/bin/env bash
# Float perplexity of the real models (DATA.md) by lowbit's protocol, on the CPU.
# Texts: Pride and Prejudice (shipped) and the Wikipedia extract of ../shared/data/corpora.
# Each run scores the first 16384 tokens of the text (--max-tokens), in float32.
set -euo pipefail
cd "$(dirname "$0")/../.."
wiki=../shared/data/corpora/enwiki_gensim_clean.txt
for model in smollm2-135m gemma3-270m; do
  for text in pride-and-prejudice "$wiki"; do
    for seq_len in 512 2048; do
      lowbit eval --model "$model" --text "$text" --seq-len "$seq_len" --max-tokens 16384 \
        --json --out results/accuracy/float.jsonl
    done
  done
done
