#!/usr/bin/env bash
# GPU measurements still owed (benchmarks/results/README.md), in two parts that each fit one 10-minute device
# command. One process per section, each with its own time limit; logs and JSON go to $OUT. On the GPU
# machine, from the repository root:
#   OUT=/some/dir bash benchmarks/run_pending.sh 1   # the KL kernels (first GPU runs)
#   OUT=/some/dir bash benchmarks/run_pending.sh 2   # pruned top-k with radix inner selections; sparse MLA
set -u
: "${OUT:?set OUT to the output folder}"
export PYTHONPATH=.
run() {  # run LIMIT_S NAME FLAGS...
  local limit=$1 name=$2
  shift 2
  timeout -k 5 "$limit" python3 -u -m experiments.bench_kernels --out_dir="$OUT" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$?"
}
case "${1:-}" in
  1)
    run 200 indexer_kl_8192 --sections=indexer_kl --seq_lens=8192  # dense KL backward kernel
    run 300 indexer_kl_sparse --sections=indexer_kl_sparse --seq_lens=8192,32768  # sparse KL kernels
    ;;
  2)
    run 200 topk --sections=topk --seq_lens=32768,131072  # pruned + radix / + Mosaic GPU threshold kernel
    run 340 sparse_mla_32768 --sections=sparse_mla --seq_lens=32768  # gather_warpgroups=2 fwd and bwd rows
    ;;
  *) echo "usage: run_pending.sh 1|2" >&2; exit 2 ;;
esac
