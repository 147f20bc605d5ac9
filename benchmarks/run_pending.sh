#!/usr/bin/env bash
# Re-measures what the latest session changed (docs/kernels.md, "Pending GPU measurements"); each part fits one 10-minute device
# command. One process per section, each with its own time limit; logs and JSON go to $OUT.
# On the GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/run_pending.sh 1   # the DSA core at 128K
#   OUT=/some/dir bash benchmarks/run_pending.sh 2   # sparse MLA index orders, the issue-4 section, parity shapes
#   OUT=/some/dir bash benchmarks/run_pending.sh 3   # the grouped GEMM
#   OUT=/some/dir bash benchmarks/run_pending.sh 4   # index_topk at 128K
#   OUT=/some/dir bash benchmarks/run_pending.sh 5   # the indexer KL at 128K
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
    # The DSA core at 128K with the 32 causal stages of session 8 (beside 8 and 16). Every index_topk jit compiles
    # 32 scores + selection kernels: a 340 s limit returned nothing in session 8, hence the whole command.
    run 570 dsa_layer_131072 --sections=dsa_layer --seq_lens=131072
    ;;
  2)
    # The sparse MLA kernels on indices in random order and sorted (as `topk_indices` returns them); the issue-4
    # sparse MLA section at all lengths (with rows on sorted indices); the parity model's shapes.
    run 100 sparse_mla_gather --sections=sparse_mla_gather --seq_lens=32768,131072
    run 330 sparse_mla_all --sections=sparse_mla --seq_lens=8192,32768,65536,131072
    run 100 parity_shapes --sections=parity_shapes --seq_lens=8192
    ;;
  3)
    # The grouped GEMM at its three loads, the automatic kernel beside the other one.
    run 250 moe_gmm --sections=moe_gmm --seq_lens=8192
    ;;
  4)
    # index_topk at 128K (scores kernel options, FP8, radix select) with the 32-stage default.
    run 400 indexer_topk_131072 --sections=indexer_topk --seq_lens=131072
    ;;
  5)
    # The indexer KL kernels at T = 128K again (first run in session 7).
    run 300 indexer_kl_131072 --sections=indexer_kl --seq_lens=131072
    ;;
  *) echo "usage: run_pending.sh 1|2|3|4|5" >&2; exit 2 ;;
esac
