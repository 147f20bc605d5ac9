"""The study's targets, shortfalls and summary from hand-made results: every number in the markdown is the dict's."""

import pytest

from dsa_jax.evaluation import long_context as lc
from dsa_jax.evaluation import study

GRID = lc.GridConfig(lengths=(1024, 8192), depths=(0.0, 0.9, 1.0), pairs=(1,), hops=(1,))


def _cells(exact_at):
  return [{"length": n, "depth": d, "pairs": 1, "hops": 1, "exact": exact_at(n, d), "token": 1.0}
          for n in GRID.lengths for d in GRID.depths]


def _heldout(loss, by_bucket):
  return {"loss": loss, "ci95": [loss - 0.01, loss + 0.01], "batches": 50, "bucket_edges": [0, 4096, 8192],
          "loss_by_bucket": by_bucket, "tokens_by_bucket": [10, 0 if by_bucket[1] is None else 10]}


def _results():
  results = {"grid": {"dense": _cells(lambda n, d: 1.0 if d < 1.0 else 0.5),
                      "DSA": _cells(lambda n, d: 1.0 if n == 1024 else 0.9)},
             "heldout": {"dense": _heldout(2.0, [2.1, None]), "DSA": _heldout(2.03, [2.12, None])},
             "topk_sweep": {"length": 8192, "ks": [32, 512, 8192], "exact": [0.2, 0.9, 0.95], "tolerance": 0.05,
                            "holds_down_to": 512, "mass_by_depth": {"0.0": [0.3, 0.9, 1.0]}}}
  results["targets"] = study.targets(results, GRID)
  return results


def test_targets_are_computed_from_the_grid_and_the_losses():
  t = _results()["targets"]
  # dense: 4 cells at 1.0 and the 2 at depth 1.0 at 0.5 -> 5/6; DSA: 3 cells at 1.0, 3 at 0.9 -> 0.95
  assert t["grid_gap_points"] == pytest.approx(100 * (0.95 - 5 / 6))
  assert t["grid_within_2_points"] and t["loss_gap_percent"] == pytest.approx(1.5)
  assert not t["loss_within_1_percent"]
  assert t["dense_exact_longest_first_90"] == 1.0 and t["dense_reaches_90"]  # depth 1.0 is outside the first 90%


def test_shortfalls_name_the_slices_where_dsa_trails():
  assert study.shortfalls(_results()) == []  # DSA is ahead at 8192 (0.900 vs 0.833), behind nowhere
  results = _results()
  results["grid"]["DSA"] = _cells(lambda n, d: 0.5 if n == 8192 else 1.0)
  assert study.shortfalls(results) == ["length 8192: DSA 0.500 vs dense 0.833 (-33.3 points)",
                                       "hops 1: DSA 0.750 vs dense 0.833 (-8.3 points)",  # the whole grid here
                                       "pairs 1: DSA 0.750 vs dense 0.833 (-8.3 points)"]


def test_markdown_prints_the_results_numbers_and_marks_empty_buckets():
  text = study.markdown(_results(), {"preset": "unit"}, {"grid": "g.png", "loss": "l.png", "topk": "t.png"}, "cmd")
  assert "| DSA held-out loss within 1% of dense | +1.50% | False |" in text
  assert "| length 8192 | 0.833 | 0.900 | +6.7 |" in text
  assert "| 4096-8191 | - | - | no tokens (no document that long) |" in text
  assert "| 8192 (all keys) | 0.950 | 1.000 |" in text and "down to k = 512." in text
