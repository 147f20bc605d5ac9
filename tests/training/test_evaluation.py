"""Evaluation reports its progress: one line per report over its forward passes (LM loss, indexer metrics and
retrieval batches), ending at the total."""

import numpy as np

from dsa_jax.data import retrieval
from dsa_jax.training import evaluation
from tests.training.conftest import SEQ, fresh_state


def test_evaluate_prints_progress_to_the_last_pass(cfg, batch, capsys):
  state = fresh_state(cfg, "sparse")
  ids = np.arange(SEQ, dtype=np.int32) % 200
  examples = [retrieval.Example(ids=ids, answer_start=SEQ - 4, answer_len=2) for _ in range(3)]
  result = evaluation.evaluate(cfg, state, [batch, batch], examples, "sparse", batch_size=2)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[eval sparse]")]
  passes = 2 * 2 + 2  # LM loss and indexer metrics over 2 batches, 3 retrieval examples in batches of 2
  assert lines[-1].startswith(f"[eval sparse] step {passes}/{passes}")
  assert lines[0].startswith(f"[eval sparse] step 1/{passes}")
  assert {"lm_loss", "retrieval_exact", "retrieval_token"} <= set(result)
