#!/usr/bin/env bash
# Some stages of the HAT study (configs/hat_search.py:gpu) within one command's time limit,
# for GPU sessions too short for the whole study (docs/search.md, "Splitting :gpu").
#   [PYTHON=python3] experiments/run_hat_gpu.sh STAGES LIMIT OUT_DIR WORKDIR [launcher flags...]
# STAGES is a tuple literal, e.g. "('latency', 'predictor')". The launcher resumes what
# WORKDIR already holds (copy an earlier OUT_DIR/stages/* into WORKDIR/stages/ to go on
# from another machine). After the launcher stops (finished, failed or out of time) the
# report, results.jsonl and every stage's small files (not the supernet checkpoint) are
# copied to OUT_DIR.
set -u
stages=$1 limit=$2 out=$3 workdir=$4
shift 4
mkdir -p "$out" "$workdir/stages"
start=$SECONDS
timeout -k 10 "$limit" "${PYTHON:-python}" -m experiments.launch --config=configs/hat_search.py:gpu \
  --workdir="$workdir" --config.stages="$stages" "$@" >> "$out/hat_launch.log" 2>&1
echo "launcher rc=$? after $((SECONDS - start)) s"
cp "$workdir"/results.jsonl "$workdir"/report.md "$workdir"/hat_report.md "$out"/ 2>/dev/null
for stage in latency predictor search retrain kernel; do
  [ -d "$workdir/stages/$stage" ] && mkdir -p "$out/stages" && cp -r "$workdir/stages/$stage" "$out/stages/"
done
if [ -d "$workdir/stages/supernet" ]; then
  mkdir -p "$out/stages/supernet"
  cp "$workdir"/stages/supernet/*.json* "$out/stages/supernet/" 2>/dev/null
fi
exit 0
