#!/usr/bin/env bash
# Atom's ablation ladder on SmolLM2 (SPEC.md 1.1 step 7), CPU: RTN W4A4, then + reorder with
# the int8 outlier tail, + groups, + clipping, + GPTQ, + KV4 (pre-RoPE keys, per token).
# Calibration on Emma (16 windows of 512), evaluation on Pride and Prejudice (first 8192
# tokens, windows of 2048), as run_recipes.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/lowbit-atom-ladder}
mkdir -p "$out"
calib=(--calib emma --calib-samples 16 --calib-seq-len 512)
eval_args=(--text pride-and-prejudice --seq-len 2048 --max-tokens 8192 --json
           --out results/accuracy/atom_ladder.jsonl)
rung() {  # name, then --set arguments
  local name=$1; shift
  lowbit compress --model smollm2-135m --recipe atom-w4a4 "${calib[@]}" "$@" \
    --set kv_cache=dense --out "$out/$name"
  lowbit eval --model "$out/$name" "${eval_args[@]}"
}
plain=(--set act_clip=1.0 --set weight_clip=1.0 --set gptq=false)
rung 1-rtn-w4a4 --set num_outliers=0 --set group_size=null "${plain[@]}"
rung 2-reorder-int8-tail --set group_size=null "${plain[@]}"
rung 3-groups-128 "${plain[@]}"
rung 4-clipping --set gptq=false
rung 5-gptq
lowbit eval --model "$out/5-gptq" --kv-cache kv4-atom "${eval_args[@]}"
