#!/usr/bin/env bash
# GPU measurements still owed (docs/kernels.md, "Pending GPU measurements"); each part fits one 10-minute device
# command. One process per section, each with its own time limit; logs and JSON go to $OUT.
# On the GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/run_pending.sh 1   # sparse MLA backward diagnostics, reduce_warps; sparse KL variants
#   OUT=/some/dir bash benchmarks/run_pending.sh 2   # top-k: fused group kernel, multi-bit bisection
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
    # The sparse MLA backward with its dkv added from registers (reduce="red") beside the TMA reduce-adds, with
    # the diagnostics (without copies / without additions), at 8K keys.
    run 200 sparse_mla_gather --sections=sparse_mla_gather --seq_lens=8192
    # The sparse KL kernels with their d ik reduce-adds from 4 warps and with the cp.async gather.
    run 200 indexer_kl_sparse --sections=indexer_kl_sparse --seq_lens=8192
    ;;
  2)
    # The fused group-maxima + threshold kernel against the XLA maxima + threshold kernel (pruned_group_select),
    # and the threshold kernel with 2 / 4 bits per bisection step or 4 partial sums.
    run 300 topk_131072 --sections=topk --seq_lens=131072
    ;;
  *) echo "usage: run_pending.sh 1|2" >&2; exit 2 ;;
esac
