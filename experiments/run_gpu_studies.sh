#!/usr/bin/env bash
# Runs the four issue-7 studies one after the other, each under its own time limit, and
# copies each one's report files (report.md, density_summary.md / speedups.md, results.jsonl,
# config.json, the PNGs and the launcher's log) flat into OUT_ROOT/<study>/.
#
#   experiments/run_gpu_studies.sh WORK_ROOT OUT_ROOT [VARIANT]
#
# Run it from the repository root. VARIANT is the configs' argument: "gpu" (default; about
# 9 minutes on an H200, budgets below) or "cpu" (tiny interpret-mode grids, to test the
# script). A study cut by its limit keeps its finished points and still gets its report;
# running the script again with the same WORK_ROOT resumes the unfinished points.
set -u
work=${1:?usage: $0 WORK_ROOT OUT_ROOT [gpu|cpu]}
out=${2:?usage: $0 WORK_ROOT OUT_ROOT [gpu|cpu]}
variant=${3:-gpu}
python=${PYTHON:-python}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
failed=0
# study:seconds (the configs' docstrings give the points and the estimates behind each budget)
for entry in ablate_block_size:150 ablate_mask_density:190 ablate_batch_size:90 \
             reproduce_binblkmsk:140; do
  study=${entry%:*}
  limit=${entry#*:}
  dir=$work/$study
  mkdir -p "$dir" "$out/$study"
  start=$SECONDS
  timeout -k 10 "$limit" "$python" -m experiments.launch \
    --config="configs/$study.py:$variant" --workdir="$dir" >>"$dir/launch.log" 2>&1
  rc=$?
  if [ -s "$dir/results.jsonl" ]; then
    # A killed launcher never rendered its report; the post-processing reads results.jsonl.
    [ $rc -eq 0 ] || "$python" -m experiments.report --workdir="$dir" >/dev/null 2>&1
    case $study in
      ablate_mask_density | reproduce_binblkmsk)
        "$python" -m "configs.$study" --workdir="$dir" >/dev/null 2>>"$dir/launch.log" ;;
    esac
  fi
  [ $rc -eq 0 ] || failed=1
  cp "$dir"/*.md "$dir"/*.png "$dir"/results.jsonl "$dir"/config.json "$dir"/launch.log \
    "$out/$study/" 2>/dev/null
  summary=$(sed -n 3p "$dir/report.md" 2>/dev/null)
  echo "$study: exit $rc after $((SECONDS - start)) s (limit $limit s); ${summary:-no report}"
done
exit $failed
