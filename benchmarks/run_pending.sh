#!/usr/bin/env bash
# Re-measures what the latest session changed (docs/kernels.md, "Pending GPU measurements"); each part fits one 10-minute device
# command. One process per section, each with its own time limit; logs and JSON go to $OUT.
# On the GPU machine, from the repository root:
#   OUT=/some/dir bash benchmarks/run_pending.sh 1   # sparse MLA backward variants; sparse KL variants; parity shapes
#   OUT=/some/dir bash benchmarks/run_pending.sh 2   # top-k variants; DSA core at 128K
#   OUT=/some/dir bash benchmarks/run_pending.sh 3   # scores kernel pipeline options (opt-in, unmeasured); index_topk
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
    # The sparse MLA backward (TMA reduce-adds / red_add, with diagnostics) at 8K and 128K keys, the sparse KL
    # variants, the training kernels at the parity model's shapes (a hang there names its variant in the log), and
    # last, in its own process, the never-run pair_sum backward (a 2-CTA cluster summing the head tiles' dkv).
    run 180 sparse_mla_gather --sections=sparse_mla_gather --seq_lens=8192,131072
    run 100 indexer_kl_sparse --sections=indexer_kl_sparse --seq_lens=8192
    run 120 parity_shapes --sections=parity_shapes --seq_lens=8192
    run 120 sparse_mla_pair --sections=sparse_mla_pair --seq_lens=8192,131072
    ;;
  2)
    # Top-k (fused compaction beside the XLA-compaction and group variants, rows full of ties, index_topk) and the
    # DSA core at 128K.
    run 200 topk_131072 --sections=topk --seq_lens=131072
    run 300 dsa_layer_131072 --sections=dsa_layer --seq_lens=131072
    ;;
  3)
    # The scores kernel's opt-in options (2 query buffers: two CTAs per SM; 2 heads per step: a wgmma overlapping
    # the previous head's epilogue; never run on a GPU) beside the default, and index_topk end to end, at 128K.
    run 300 indexer_topk_131072 --sections=indexer_topk --seq_lens=131072
    ;;
  *) echo "usage: run_pending.sh 1|2|3" >&2; exit 2 ;;
esac
