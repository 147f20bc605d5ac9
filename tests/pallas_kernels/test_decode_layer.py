"""experiments/bench_decode (its measurements in `benchmarking.decode_layer`) on CPU: the composed decode steps agree
where they must, the byte counts, the cost curves (marginal prefill cost, decode cost per token) and the figure
redrawn from a record."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.benchmarking import decode_layer as bench_decode
from tests.conftest import REPO


@pytest.mark.parametrize("cache", ["fp8", "bf16"])
def test_sparse_step_equals_dense_below_top_k(cache):
  """At P <= 2048 the indexer selects every cached key, so DSA decode is dense decode (XLA paths, V3.2 shapes)."""
  x = bench_decode.decode_inputs(batch=2, position=1024, cache=cache)
  sparse = bench_decode.sparse_step(x, "xla").astype(jnp.float32)
  dense = bench_decode.dense_step(x, "xla").astype(jnp.float32)
  assert sparse.shape == (2, bench_decode.N, bench_decode.C)
  # Both sum the same 1024 entries in float32 in another order, then round to bf16: one bf16 ulp of the output.
  np.testing.assert_allclose(sparse, dense, rtol=2**-7, atol=2**-7 * float(jnp.abs(dense).max()))


def test_decode_bytes_at_v3_2_shapes():
  fp8 = bench_decode.decode_bytes(batch=1, position=131072, cache="fp8")
  assert bench_decode.ENTRY_BYTES == {"fp8": 656, "bf16": 1152}
  q_out = 128 * 576 * 2 + 128 * 512 * 2
  assert fp8["dense"] == 131072 * 656 + q_out
  assert fp8["sparse_mla"] == 2048 * 660 + q_out
  assert fp8["indexer"] == 131072 * 132 + 64 * 128 + 4 * 64 + 8 * 2048
  assert fp8["sparse"] == fp8["indexer"] + fp8["sparse_mla"]


def test_cost_curves():
  prefill = [dict(section="prefill", T=t, dsa_s=2e-6 * t, cudnn_dense_s=1e-10 * t * t) for t in (1000, 3000)]
  decode = [dict(section="decode", cache="fp8", batch=b, position=p, sparse_per_token_s=1e-5,
                 dense_per_token_s=p * 1e-8) for b in (1, 4) for p in (1000, 2000)]
  curves = bench_decode.cost_curves(dict(rows=prefill + decode), usd_per_gpu_hour=3600.0)  # 1 USD per GPU second
  usd = lambda s: s * 61 * 1e6
  xs, ys = curves["prefill, dense (cuDNN)"]
  assert xs == [500, 2000]
  np.testing.assert_allclose(ys, [usd(1e-7), usd(1e-10 * (9e6 - 1e6) / 2000)])  # marginal: (t(T2) - t(T1)) / 2000
  np.testing.assert_allclose(curves["prefill, sparse (DSA core)"][1], [usd(2e-6)] * 2)
  xs, ys = curves["decode, dense (fp8 cache, B=4)"]  # the largest batch
  assert xs == [1000, 2000]
  np.testing.assert_allclose(ys, [usd(1e-5), usd(2e-5)])


def test_plot_from_a_record(tmp_path):
  record = dict(device="cpu", commit="abc", rows=[dict(section="prefill", T=t, dsa_s=t * 1e-6, cudnn_dense_s=t * 2e-6)
                                                   for t in (1024, 2048)])
  (tmp_path / "r.json").write_text(json.dumps(record))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  done = subprocess.run([sys.executable, "-m", "experiments.bench_decode", f"--plot_from={tmp_path / 'r.json'}"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert (tmp_path / "decode_cost.png").stat().st_size > 1000
  bad = subprocess.run([sys.executable, "-m", "experiments.bench_decode", f"--plot_from={tmp_path / 'none.json'}"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "none.json" in bad.stderr
