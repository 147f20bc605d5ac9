"""Starting points of the recipe (an HF checkpoint, our own Orbax checkpoint), stage subsets, KL chunks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsa_jax.checkpoint.hf_config import read_config
from dsa_jax.checkpoint.hf_convert import load_hf
from dsa_jax.data.pipeline import DataConfig
from dsa_jax.model import AttentionAux, IndexerInputs, MQAOperands, preset
from dsa_jax.training import checkpointing, losses, recipe, state
from tests.conftest import FIXTURES

TINY_HF = FIXTURES / "hf_deepseek_v32_tiny"


def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_hf_then_orbax_starts_carry_the_weights(tmp_path):
  model = read_config(TINY_HF)
  model = model.replace(indexer=dataclasses.replace(model.indexer, topk=4))
  cfg = recipe.RecipeConfig(model=model, data=DataConfig(seq_len=model.max_position), run_dir=str(tmp_path), init="hf",
                            init_path=str(TINY_HF))
  from_hf = recipe.initial_state(cfg)
  assert _same(from_hf.params, state.split_model_state(load_hf(TINY_HF)[1])[0]) and int(from_hf.step) == 0
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", every=1)
  ckpt.save(7, from_hf, {})
  ckpt.wait()
  from_orbax = recipe.initial_state(dataclasses.replace(cfg, init="orbax", init_path=str(tmp_path / "ckpt")))
  assert _same(from_orbax.params, from_hf.params) and int(from_orbax.step) == 0


def test_stage_subsets_and_their_validation():
  """`stages` splits a run into processes; a stage must run with the one it starts from; bad values name
  the field."""
  base = dict(model=preset("tiny"), data=DataConfig(seq_len=64, batch_size=2), run_dir="unused")
  assert recipe.RecipeConfig(**base).stage_names == recipe.STAGE_NAMES
  assert recipe.RecipeConfig(**base, compare_dense=False).stage_names == ("dense", "warmup", "sparse")
  assert recipe.RecipeConfig(**base, stages="dense, dense_cont").stage_names == ("dense", "dense_cont")
  with pytest.raises(ValueError, match=r"RecipeConfig.stages='dense,sparse' is invalid: 'sparse' starts from 'warmup'"):
    recipe.RecipeConfig(**base, stages="dense,sparse")
  with pytest.raises(ValueError, match=r"\['dens'\] unknown"):
    recipe.RecipeConfig(**base, stages="dens")
  with pytest.raises(ValueError, match="bias_gamma=-1"):
    recipe.RecipeConfig(**base, bias_gamma=-1.0)


def test_rows_and_tokenizer_must_fit_the_model(tmp_path):
  """Rows longer than the model's positions and a tokenizer with more ids than its embedding fail at the start."""
  with pytest.raises(ValueError, match=r"DataConfig.seq_len=512 is invalid; allowed: <= ModelConfig.max_position=256"):
    recipe.RecipeConfig(model=preset("tiny"), data=DataConfig(seq_len=512, batch_size=2), run_dir="unused")
  small_vocab = preset("tiny").replace(vocab_size=260)
  with pytest.raises(ValueError, match=r"tokenizer vocab_size=269 exceeds RecipeConfig.model.vocab_size=260"):
    recipe.Recipe(recipe.RecipeConfig(model=small_vocab, data=DataConfig(seq_len=64, batch_size=2),
                                      run_dir=str(tmp_path)))


def test_kl_chunks_follow_the_byte_budget():
  aux = lambda t, n, c, i, h, k: AttentionAux(
      lse=jnp.zeros((1, t, n)), mqa=MQAOperands(q=jnp.zeros((1, t, n, c)), kv=jnp.zeros((1, t, c))),
      indexer=IndexerInputs(q=jnp.zeros((1, t, i, h)), k=jnp.zeros((1, t, h)), w=jnp.zeros((1, t, i))),
      topk_indices=jnp.zeros((1, t, k)))
  cfg = losses.LossConfig()
  v32, small = aux(4096, 128, 576, 64, 128, 2048), aux(8192, 16, 320, 16, 64, 512)
  assert losses.kl_chunks(cfg, v32, True) == {"t_chunk": 32}
  assert losses.kl_chunks(cfg, small, True) == {"t_chunk": 512}
  assert losses.kl_chunks(cfg, small, False) == {"t_chunk": 1024, "s_chunk": 1024}
  assert losses.kl_chunks(losses.LossConfig(kl_t_chunk=16), small, True) == {"t_chunk": 16}


def test_from_config_builds_every_section_and_names_unknown_keys():
  tree = {"model": {"preset": "tiny", "max_position": 512, "indexer": {"num_heads": 4, "topk": 32}},
          "data": {"seq_len": 64, "batch_size": 2, "files": "a.txt,b.txt", "retrieval": {"rate": 0.5}},
          "optimizer": {"lr_main": 1e-3}, "loss": {"mtp_weight": 0.0}, "mesh": {"data": 1},
          "train": {"dense_steps": 4, "stages": "dense"}, "run_dir": "unused", "implementation": None}
  cfg = recipe.RecipeConfig.from_config(tree)
  tiny = preset("tiny")
  assert cfg.model == tiny.replace(max_position=512, indexer=dataclasses.replace(tiny.indexer, num_heads=4, topk=32))
  assert cfg.data == DataConfig(seq_len=64, batch_size=2, files=("a.txt", "b.txt"),
                                retrieval=dataclasses.replace(DataConfig().retrieval, rate=0.5))
  assert (cfg.optimizer.lr_main, cfg.loss.mtp_weight, cfg.dense_steps, cfg.stage_names) == (1e-3, 0.0, 4, ("dense",))
  with pytest.raises(ValueError, match=r"RecipeConfig.loss.mtp is unknown; allowed: \["):
    recipe.RecipeConfig.from_config({**tree, "loss": {"mtp": 0.0}})
  with pytest.raises(ValueError, match=r"ModelConfig.indexer.heads is unknown"):
    recipe.RecipeConfig.from_config({**tree, "model": {"preset": "tiny", "indexer": {"heads": 4}}})
  with pytest.raises(ValueError, match=r"\['seed'\] are set both in `train` and at the top level"):
    recipe.RecipeConfig.from_config({**tree, "seed": 1, "train": {"seed": 2}})


def test_from_config_with_hf_weights_takes_only_top_k_and_context_from_the_file():
  tree = {"model": {"preset": "tiny", "max_position": 512, "indexer": {"num_heads": 4, "topk": 4}},
          "data": {}, "run_dir": "unused", "init": "hf", "init_path": str(TINY_HF)}
  hf = read_config(TINY_HF)
  assert recipe.RecipeConfig.from_config(tree).model == hf.replace(
      max_position=512, indexer=dataclasses.replace(hf.indexer, topk=4))


def test_export_hf_writes_the_final_model_and_tokenizer(tmp_path):
  from dsa_jax.data.tokenizer import ByteTokenizer, from_checkpoint
  from dsa_jax.training import optimizer
  from tests.training.conftest import tiny_config

  cfg = recipe.RecipeConfig(model=tiny_config(), data=DataConfig(seq_len=64, batch_size=2), run_dir=str(tmp_path),
                            stages="dense", dense_steps=2, checkpoint_every=2, eval_batches=1, eval_examples=1,
                            export_hf=True)
  recipe.run(cfg)
  like = state.create(cfg.model, load_hf(tmp_path / "hf")[1], optimizer.build(cfg.optimizer, "dense"), 0)
  final, _ = checkpointing.Checkpointer(tmp_path / "dense" / "checkpoints", every=1).restore_latest(like)
  exported_cfg, exported = load_hf(tmp_path / "hf")
  assert exported_cfg == cfg.model and int(final.step) == 2
  assert _same(state.split_model_state(exported)[0], final.params)
  assert from_checkpoint(tmp_path / "hf").encode("ab<｜end▁of▁sentence｜>") == ByteTokenizer().encode(
      "ab<｜end▁of▁sentence｜>")
