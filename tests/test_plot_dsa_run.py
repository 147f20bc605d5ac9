"""experiments/plot_dsa_run: the sparse stage's LM losses paired with dense_cont's on the same batches."""

import numpy as np
import pytest

from experiments import plot_dsa_run


def _runs():
  warmup = [{"step": s, "loss": 1.0} for s in (1, 2)]  # sparse step j reads dense_cont's batch 2 + j
  dense_cont = [{"step": s, "lm_loss": 2.0 + 0.1 * s} for s in range(1, 7)]
  sparse = [{"step": s, "lm_loss": 1.01 * (2.0 + 0.1 * (s + 2)) + (0.01 if s == 4 else 0.0)} for s in range(1, 5)]
  return {"warmup": warmup, "dense_cont": dense_cont, "sparse": sparse + [{"step": 4, "eval_topk_mass": 0.9}]}


def test_pairs_use_the_same_batches():
  got = plot_dsa_run.pairs(_runs())
  assert [(s, d) for s, _, d in got] == [(1, 2.3), (2, 2.4), (3, 2.5), (4, 2.6)]


def test_paired_gap_all_and_last():
  gap, se, n = plot_dsa_run.paired_gap(_runs())
  sparse = np.array([1.01 * v for v in (2.3, 2.4, 2.5, 2.6)]) + np.array([0, 0, 0, 0.01])
  base = np.array([2.3, 2.4, 2.5, 2.6])
  assert n == 4 and gap == pytest.approx(sparse.mean() / base.mean() - 1)
  assert se == pytest.approx(((sparse - base) / base.mean()).std(ddof=1) / 2)
  assert plot_dsa_run.paired_gap(_runs(), last=2)[2] == 2
  assert plot_dsa_run.paired_gap({"sparse": []}) is None
