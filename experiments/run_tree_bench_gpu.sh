#!/usr/bin/env bash
# Old tree vs this tree on one GPU, alternating processes (old, new, new_tuned, old, new):
# the attention cases of configs/bench_attention_gpu.py B4-T4k (dense and causal, forward and
# forward+backward), B2-T8k-doc512 (both modes) and B1-T16k-win1k for pallas_mosaic_gpu and
# pallas_triton, and pallas_triton decode at S=4k, GQA 32/8, head density 1 and 0.5, B in
# {1, 64, 256}. Rows go to OUT_DIR/trees.jsonl, the tables (attention median ms, decode us per
# step; each run's best / old's best) to OUT_DIR/table.md.
#
#   experiments/run_tree_bench_gpu.sh OLD_TREE OUT_DIR [PART]   (PART: attention, decode or all)
#
# OLD_TREE is a checkout of the commit to compare with (e.g. `git archive COMMIT | tar -x -C
# DIR`); NEW_TREE (environment, default: this repository's root) the one compared with it.
# ROUNDS (default 2) and IMPLEMENTATIONS (default "pallas_mosaic_gpu pallas_triton", the
# attention columns) narrow a short run. Run from this repository's root.
set -u
old=${1:?usage: $0 OLD_TREE OUT_DIR [attention|decode|all]}
out=${2:?usage: $0 OLD_TREE OUT_DIR [attention|decode|all]}
part=${3:-all}
mkdir -p "$out"
python=${PYTHON:-python}
export XLA_PYTHON_CLIENT_PREALLOCATE=false
attention_impls=${IMPLEMENTATIONS:-pallas_mosaic_gpu pallas_triton}
attention_where="case=B4-T4k,case=B2-T8k-doc512,case=B1-T16k-win1k"
for impl in $attention_impls; do attention_where+=",implementation=$impl"; done
decode_where="implementation=pallas_triton,kv_len=4096,num_kv_heads=8,batch=1,batch=64"
decode_where+=",batch=256,head_density=1.0,head_density=0.5"
# old and new run with the tuning tables off (both on the heuristics: the same tiles unless the
# refactor changed them); new_tuned (round 1 only) is this tree as users get it, tables on.
for round in $(seq "${ROUNDS:-2}"); do
  new=${NEW_TREE:-.}
  runs="old:$old:0 new:$new:0"
  [ "$round" = 1 ] && runs+=" new_tuned:$new:1"
  for run in $runs; do
    IFS=: read -r label tree autotune <<< "$run"
    if [ "$part" != decode ]; then
      FLASHJAX_AUTOTUNE=$autotune "$python" experiments/tree_bench.py --tree="$tree" \
        --label="$label" --config=configs/bench_attention_gpu.py:all --out="$out/trees.jsonl" \
        --where="$attention_where" --set=check=False,timing=loop 2>&1 | tail -n 3
    fi
    if [ "$part" != attention ]; then
      FLASHJAX_AUTOTUNE=$autotune "$python" experiments/tree_bench.py --tree="$tree" \
        --label="$label" --config=configs/bench_decode_gpu.py:grid --out="$out/trees.jsonl" \
        --where="$decode_where" 2>&1 | tail -n 3
    fi
  done
done
{ "$python" experiments/tree_bench.py --table="$out/trees.jsonl" --metric=median_ms
  "$python" experiments/tree_bench.py --table="$out/trees.jsonl" --metric=us_per_step
} > "$out/table.md"
cat "$out/table.md"
