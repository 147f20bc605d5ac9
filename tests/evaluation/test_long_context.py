"""Long-context evaluation: grid cells and their examples, exact match, the sweep's threshold, held-out loss against
the training evaluation's, its interval and plot. The grid and the top-k sweep on a trained model run in
tests/test_long_context_study.py."""

import numpy as np
import pytest

from dsa_jax.data import pipeline, retrieval
from dsa_jax.data.tokenizer import ByteTokenizer
from dsa_jax.evaluation import long_context as lc
from dsa_jax.evaluation import plots
from dsa_jax.training import evaluation
from tests.training.conftest import fresh_state, tiny_config

TOK = ByteTokenizer()
DOCS = [f"def f{i}(x):\n  return x + {i}\n" * 30 for i in range(12)]
GRID = lc.GridConfig(lengths=(96,), depths=(0.0, 1.0), pairs=(1, 2), hops=(1, 2), examples=2, batch_size=2)


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config()
  return cfg, fresh_state(cfg, "sparse")


def test_grid_cells_leave_out_lookups_with_more_hops_than_pairs_and_repeat_their_examples():
  assert GRID.cells(96) == [(0.0, 1, 1), (0.0, 2, 1), (0.0, 2, 2), (1.0, 1, 1), (1.0, 2, 1), (1.0, 2, 2)]
  a = lc.cell_examples(GRID, DOCS, TOK, 96, 1.0, 2, 2)
  b = lc.cell_examples(GRID, DOCS, TOK, 96, 1.0, 2, 2)
  assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b)) and len(a) == 2
  assert "# value of value of key" in TOK.decode(a[0].ids.tolist())
  with pytest.raises(ValueError, match=r"GridConfig.depths=\(0.5, 2.0\)"):
    lc.GridConfig(depths=(0.5, 2.0))
  with pytest.raises(ValueError, match="GridConfig.pairs"):
    lc.GridConfig(pairs=(1,), hops=(2,))


def test_exact_match_needs_every_answer_token():
  ex = retrieval.make_example(np.random.default_rng(0), TOK.encode(DOCS[0]), 96, TOK, retrieval.RetrievalConfig())

  def second_token_wrong(ids):
    nxt = np.concatenate([ids[:, 1:], ids[:, :1]], axis=1)
    nxt[:, ex.answer_start] = (nxt[:, ex.answer_start] + 1) % 256
    return np.eye(TOK.vocab_size)[nxt]

  exact, tokens = retrieval.exact_matches(second_token_wrong, [ex], batch_size=1)
  assert not exact[0] and tokens[0] == ex.answer_len - 1


def test_holds_down_to_is_the_smallest_k_of_an_unbroken_run_within_tolerance():
  assert lc.holds_down_to([32, 64, 128, 512], [0.2, 0.9, 0.96, 1.0], 1.0, 0.05) == 128
  assert lc.holds_down_to([32, 64, 128, 512], [1.0, 0.5, 1.0, 1.0], 1.0, 0.05) == 128
  assert lc.holds_down_to([32, 512], [0.5, 0.5], 1.0, 0.05) is None


def test_heldout_loss_matches_the_training_evaluation_and_brackets_its_mean(model, tmp_path):
  cfg, state = model
  batches = pipeline.eval_batches(pipeline.DataConfig(seq_len=64, batch_size=2), DOCS, TOK, 3)
  result = lc.heldout_loss(cfg, state, batches, "sparse", buckets=4)
  expected = [float(evaluation.lm_loss(cfg, state, b, "sparse")) for b in batches]
  np.testing.assert_allclose(result["batch_means"], expected, rtol=1e-5)
  low, high = result["ci95"]
  assert low < result["loss"] < high and result["bucket_edges"] == [0, 16, 32, 48, 64]
  assert sum(result["tokens_by_bucket"]) == sum(int((b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]).sum())
                                                for b in batches)
  with pytest.raises(ValueError, match="at least 2"):
    lc.heldout_loss(cfg, state, batches[:1], "sparse")
  plots.loss_by_position({"dense": result, "DSA": result}, tmp_path / "loss.png")
  assert (tmp_path / "loss.png").stat().st_size > 0


def test_buckets_no_document_reaches_are_none_not_zero(model):
  cfg, state = model
  batches = pipeline.eval_batches(pipeline.DataConfig(seq_len=64, batch_size=2, max_doc_tokens=20), DOCS, TOK, 2)
  result = lc.heldout_loss(cfg, state, batches, "dense", buckets=4)
  assert result["loss_by_bucket"][0] > 0 and result["loss_by_bucket"][2:] == [None, None]
  assert result["tokens_by_bucket"][2:] == [0, 0]
