#!/usr/bin/env bash
# The DSA parity experiment (docs/reports/dsa_parity.md) in one 10-minute GPU command, or in two halves.
#   bash experiments/run_parity.sh all  # every stage in one process: both branches start from one dense
#                                       # checkpoint (GPU training is not bitwise repeatable)
#   bash experiments/run_parity.sh a    # dense stage, then the dense continuation
#   bash experiments/run_parity.sh b    # the dense stage again, warm-up, sparse
# Logs go to $OUT/log_<mode>.txt, metrics and results.json to $OUT/<mode>/ (OUT defaults to /tmp/dsa_jax/parity).
# Then: python -m experiments.plot_dsa_run --run_dir=$OUT/all (or =$OUT/a,$OUT/b) [--out=PNG]
# CONFIG (default experiments/configs/train_small.py) and FLAGS (extra flags) allow a CPU rehearsal, e.g.
#   CONFIG=experiments/configs/train_tiny.py FLAGS="--config.train.dense_steps=4" bash experiments/run_parity.sh a
set -u
OUT="${OUT:-/tmp/dsa_jax/parity}"
case "${1:-}" in
  all) stages=dense,dense_cont,warmup,sparse ;;
  a) stages=dense,dense_cont ;;
  b) stages=dense,warmup,sparse ;;
  *) echo "usage: run_parity.sh all|a|b" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
run_dir=/tmp/dsa_jax/parity_run_$1
rm -rf "$run_dir"
# shellcheck disable=SC2086  # FLAGS is a list of flags
timeout -k 10 575 "${PYTHON:-python3}" -u -m experiments.train_dsa --config="${CONFIG:-experiments/configs/train_small.py}" \
  --config.run_dir="$run_dir" --config.train.stages="$stages" ${FLAGS:-} > "$OUT/log_$1.txt" 2>&1
echo "rc=$?"
(cd "$run_dir" && find . -name metrics.jsonl -o -name results.json | while read -r f; do
  mkdir -p "$OUT/$1/$(dirname "$f")" && cp "$f" "$OUT/$1/$f"; done)
