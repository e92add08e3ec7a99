#!/usr/bin/env bash
# One Polar Sparsity model variant on a GPU machine within one command's time limit:
# the study (configs/polar_sparsity.py:gpu) for MODEL, stopped after LIMIT seconds, with
# results.jsonl, the report and the setup's small JSON files copied to OUT_DIR every
# 15 s (so a stopped run still returns every finished point).
#   experiments/run_polar_gpu.sh MODEL LIMIT OUT_DIR WORKDIR [extra launcher flags...]
set -u
model=$1 limit=$2 out=$3 workdir=$4
shift 4
mkdir -p "$out" "$workdir"
copy() {
  cp "$workdir"/results.jsonl "$workdir"/report.md "$workdir"/*.png "$out"/ 2>/dev/null
  for f in "$workdir"/setup/"$model"/*.json; do
    [ -f "$f" ] && cp "$f" "$out/${model}_$(basename "$f")"
  done
}
( while true; do sleep 15; copy; done ) &
copier=$!
timeout "$limit" python -m experiments.launch --config=configs/polar_sparsity.py:gpu \
  --workdir="$workdir" --config.models="('$model',)" "$@" > "$out/$model.log" 2>&1
echo "launcher rc=$?"
kill $copier
copy
