"""Benchmark section: the sparse MLA backward with `pair_sum=True` (a short GPU call, in its own process).

The two 64-head tiles of a token run as one 2-CTA cluster that sums their dkv slabs through DSMEM before the TMA
reduce-adds (`pallas_kernels/sparse_mla/kernel_bwd.py`): half the atomic traffic that bounds the backward. Rows
as in `sparse_mla_gather` (same inputs, TFLOP/s, dq / dkv against the first row): the default backward, then
pair_sum. A section of its own so that a hang of this new cross-CTA synchronisation (killed by the caller's
timeout) costs no other section's rows.
"""

from experiments.bench_sections import sparse_mla_gather

BACKWARD_CONFIGS = (dict(gather="cp_async", reduce_warps=4), dict(gather="cp_async", reduce_warps=4, pair_sum=True),
                    dict(gather="cp_async", reduce_warps=4, pair_sum=True, skip="reduce"))


def run(cfg: dict) -> list[dict]:
  return sparse_mla_gather.run(cfg, backward_configs=BACKWARD_CONFIGS, forward_configs=(),
                               section="sparse_mla_pair")
