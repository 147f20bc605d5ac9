#!/usr/bin/env bash
# GPU measurements still owed (docs/kernels.md, "Pending GPU measurements"), in two parts that each fit one
# 10-minute device command. One process per section, each with its own time limit; logs and JSON go to $OUT.
# On the GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/run_pending.sh 1   # gather_warps, sparse-KL gradient errors, gmm loads
#   OUT=/some/dir bash benchmarks/run_pending.sh 2   # top-k steps; DSA core profile; sparse MLA at 32K
#   OUT=/some/dir bash benchmarks/run_pending.sh 3   # cp.async gather; DSA core at 128K with 4 gather warps
#   OUT=/some/dir bash benchmarks/run_pending.sh 4   # backward cp.async; sparse KL warps; top-k compaction; DSA core
#   OUT=/some/dir bash benchmarks/run_pending.sh 5   # grouped GEMM tile sweep
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
    run 140 sparse_mla_gather --sections=sparse_mla_gather --seq_lens=8192  # gather_warps 1 / 2 / 4, fwd and bwd
    run 120 indexer_kl_sparse --sections=indexer_kl_sparse --seq_lens=8192  # gradient errors vs float32 inputs
    run 220 moe_gmm --sections=moe_gmm --seq_lens=8192  # three expert loads (128 / 512 / 1024 rows per expert)
    ;;
  2)
    run 120 topk_131072 --sections=topk --seq_lens=131072  # where the pruned_select's 1.34 ms go (per step)
    timeout -k 5 90 python3 -u -m experiments.profile_kernels --target=dsa_layer --seq_len=131072 \
      > "$OUT/profile_dsa_layer_131072.txt" 2>&1  # device time per op of the DSA core at 128K
    echo "profile_dsa_layer_131072 rc=$?"
    run 330 sparse_mla_32768 --sections=sparse_mla --seq_lens=32768  # forward, backward and autodiff rows at 32K
    ;;
  3)
    run 150 sparse_mla_gather --sections=sparse_mla_gather --seq_lens=8192  # TMA 1 / 4 warps vs cp.async
    run 300 dsa_layer_131072 --sections=dsa_layer --seq_lens=131072  # the whole DSA core, 4 gather warps
    ;;
  4)
    run 120 sparse_mla_gather --sections=sparse_mla_gather --seq_lens=8192  # backward: TMA 1 / 4 warps vs cp.async
    run 120 indexer_kl_sparse --sections=indexer_kl_sparse --seq_lens=8192  # row gathers from 4 warps vs 1
    run 120 topk_131072 --sections=topk --seq_lens=131072  # compaction variants, step by step
    run 150 dsa_layer_131072 --sections=dsa_layer --seq_lens=131072  # the DSA core with the cp.async forward
    ;;
  5)
    run 560 moe_gmm_tiles --sections=moe_gmm_tiles  # tile configurations per pass and load
    ;;
  *) echo "usage: run_pending.sh 1|2|3|4|5" >&2; exit 2 ;;
esac
