#!/usr/bin/env bash
# One half of the DSA parity experiment (docs/dsa_parity.md); each half fits one 10-minute GPU command.
#   OUT=/some/dir bash benchmarks/run_parity.sh a   # dense stage, then the dense continuation
#   OUT=/some/dir bash benchmarks/run_parity.sh b   # the same dense stage, warm-up, sparse
# Then here: python -m experiments.plot_dsa_run --run_dir=<a>,<b> --out=docs/dsa_parity_small_8k.png
set -u
: "${OUT:?set OUT to the output folder}"
case "${1:-}" in
  a) stages=dense,dense_cont ;;
  b) stages=dense,warmup,sparse ;;
  *) echo "usage: run_parity.sh a|b" >&2; exit 2 ;;
esac
run_dir=/tmp/parity_$1
timeout -k 15 560 python3 -u -m experiments.train_dsa --config=experiments/configs/train_small.py \
  --config.run_dir="$run_dir" --config.train.stages="$stages" > "$OUT/log_$1.txt" 2>&1
echo "rc=$?"
(cd "$run_dir" && find . -name metrics.jsonl -o -name results.json | while read -r f; do
  mkdir -p "$OUT/$(dirname "$f")" && cp "$f" "$OUT/$f"; done)
