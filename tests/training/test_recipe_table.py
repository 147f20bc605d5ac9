"""The main job's table names what its retrieval rows measure and says so when neither model learned them."""

from dsa_jax.training import recipe


def _results(dense_exact: float, sparse_exact: float, with_description: bool = True) -> dict:
  stage = {"lm_loss": 2.0, "dense_kl": 1.0, "topk_mass": 0.5, "retrieval_exact": 0.0, "retrieval_token": 0.1,
           "step_time_s": 0.1}
  results = {"dense": stage, "warmup": stage, "dense_cont": {**stage, "retrieval_exact": dense_exact},
             "sparse": {**stage, "retrieval_exact": sparse_exact}}
  return {**results, "retrieval_eval": "2-pair lookup in 256-token examples"} if with_description else results


def test_retrieval_rows_say_what_they_measure_and_when_nothing_was_learned():
  text = recipe.table(_results(0.0, 0.0))
  assert "| retrieval exact match (2-pair lookup in 256-token examples) | dense model | 0.0000 |" in text
  assert "neither model learned the lookup" in text
  learned = recipe.table(_results(0.5, 0.25))
  assert "neither model" not in learned and "| 0.5000 | DSA model | 0.2500 |" in learned
  assert "retrieval exact match (key-value lookups)" in recipe.table(_results(0.0, 0.0, with_description=False))
