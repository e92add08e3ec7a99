#!/usr/bin/env bash
# One Polar Sparsity model variant on a GPU machine within one command's time limit:
# the study (configs/polar_sparsity.py:gpu) for MODEL, stopped after LIMIT seconds, with
# results.jsonl and the setup's small JSON files (the report is rendered from results.jsonl) copied to OUT_DIR every
# 15 s (so a stopped run still returns every finished point).
#   experiments/run_polar_gpu.sh MODEL LIMIT OUT_DIR WORKDIR [extra launcher flags...]
set -u
model=$1 limit=$2 out=$3 workdir=$4
shift 4
mkdir -p "$out" "$workdir"
copy() {
  cp "$workdir"/results.jsonl "$out"/ 2>/dev/null
  for name in model stage_times calibration; do  # at most 8 files come back: no plots
    f="$workdir/setup/$model/$name.json"
    [ -f "$f" ] && cp "$f" "$out/${model}_$name.json"
  done
}
( while true; do sleep 15; copy; done ) &
copier=$!
timeout "$limit" python -m experiments.launch --config=configs/polar_sparsity.py:gpu \
  --workdir="$workdir" --config.models="('$model',)" "$@" > "$out/$model.log" 2>&1
echo "launcher rc=$?"
kill $copier
copy
