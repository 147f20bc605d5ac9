#!/usr/bin/env bash
# GPU measurements still owed (benchmarks/results/README.md), most important first. One process per section,
# each with its own time limit, its log and JSON in $OUT. On the GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/run_pending.sh
set -u
: "${OUT:?set OUT to the output folder}"
export PYTHONPATH=.
run() {  # run LIMIT_S NAME FLAGS...
  local limit=$1 name=$2
  shift 2
  timeout -k 5 "$limit" python3 -u -m experiments.bench_kernels --out_dir="$OUT" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$?"
}
run 150 indexer_kl_8192 --sections=indexer_kl --seq_lens=8192  # dense KL backward kernel: first GPU run
run 150 indexer_kl_sparse --sections=indexer_kl_sparse --seq_lens=8192,32768  # sparse KL kernels: first GPU run
run 240 sparse_mla_32768 --sections=sparse_mla --seq_lens=32768  # ran past 100 s in compilation last time
