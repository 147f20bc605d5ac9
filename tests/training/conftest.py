"""Shared tiny model and batch for the training tests (tiny preset, 2 layers, no MTP, 64 tokens, top-k 8)."""

import numpy as np
import pytest

from dsa_jax.model import config, functional
from dsa_jax.training import optimizer, state

SEQ, BATCH = 64, 2


def tiny_config():
  return config.tiny().replace(num_layers=2, num_mtp_layers=0,
                               indexer=config.IndexerConfig(num_heads=4, head_dim=16, topk=8))


@pytest.fixture(scope="module")
def cfg():
  return tiny_config()


def packed_batch(seq: int = SEQ, split: int = 40):
  """Two packed rows: row 0 holds two documents (segment ids 1 and 2, positions restarting at `split`), row 1 one."""
  rng = np.random.default_rng(0)
  segment_ids = np.ones((BATCH, seq), np.int32)
  segment_ids[0, split:] = 2
  positions = np.tile(np.arange(seq, dtype=np.int32), (BATCH, 1))
  positions[0, split:] -= split
  return {"ids": rng.integers(0, 256, (BATCH, seq), dtype=np.int32), "loss_mask": np.ones((BATCH, seq), np.int32),
          "segment_ids": segment_ids, "positions": positions}


@pytest.fixture(scope="module")
def batch():
  return packed_batch()


def fresh_state(cfg, stage, opt_cfg=optimizer.OptimizerConfig(warmup_steps=0)):
  return state.create(cfg, functional.init(cfg, 0), optimizer.build(opt_cfg, stage), 0)
