"""The supervised warm start trains the indexer through its dense KL only, and the rest through the LM loss."""

import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

from dsa_jax.data.tokenizer import ByteTokenizer
from dsa_jax.model import functional
from dsa_jax.model.config import IndexerConfig, tiny
from dsa_jax.rl import get_task, warm_start

TOK = ByteTokenizer()
CFG = tiny().replace(vocab_size=TOK.vocab_size, num_mtp_layers=0, num_layers=2,  # layer 1 is MoE
                     indexer=IndexerConfig(num_heads=4, head_dim=16, topk=8))
TASK = get_task("sort", min_len=3, max_len=3)


def _changed(before, after, in_indexer: bool) -> bool:
  paths = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda a, b: jnp.any(a != b), before, after))
  return any(bool(moved) for path, moved in paths if ("indexer" in jax.tree_util.keystr(path)) == in_indexer)


class WarmStartTest(parameterized.TestCase):

  @parameterized.named_parameters(("with_indexer_kl", 1.0, True), ("without", 0.0, False))
  def test_indexer_learns_only_from_its_kl(self, weight, indexer_moves):
    params = functional.init(CFG, 0)
    before = jax.tree.map(jnp.copy, params)
    after, losses = warm_start.warm_start(CFG, params, TASK, TOK, steps=2, batch_size=4, learning_rate=1e-2,
                                          prompt_width=9, completion_width=4, seed=0, indexer_kl_weight=weight)
    self.assertLen(losses, 2)
    self.assertEqual(_changed(before, after, in_indexer=True), indexer_moves)
    self.assertTrue(_changed(before, after, in_indexer=False))

  def test_dsa_is_sparse_on_every_completion_token(self):
    # "sort:ddd=" is 9 tokens: top-8 leaves a key out from the first completion token on.
    self.assertLess(CFG.indexer.topk, len("sort:123="))


if __name__ == "__main__":
  absltest.main()
