"""The DSA continued pre-training recipe (spec section 2), end to end:

  dense        ordinary training from the starting weights (random, our Orbax checkpoint, or HF)
  warmup       from `dense`: dense attention, only the indexer trains on the dense KL
  sparse       from `warmup`: DSA; main model on the LM loss, indexer on the sparse KL
  dense_cont   (with `compare_dense`) from `dense`, dense training for as many tokens as warmup + sparse:
               the baseline the sparse model is compared with. It reads the same batches (same iterator
               state at its start), so the two branches differ only in the attention.
Each stage checkpoints into `run_dir/<stage>/checkpoints` and logs to `run_dir/<stage>/metrics.jsonl` and
TensorBoard events; a rerun resumes each stage from its newest usable checkpoint and skips finished ones
(`checkpointing` says what "usable" means; `run_dir` stops a rerun with another config). With `export_hf` the
run's final model (its last of dense, warmup, sparse) and its tokenizer are written as an HF checkpoint to
`run_dir/hf` (`dsa_jax.load_hf`, `python -m experiments.generate --run_dir=...`).

`RecipeConfig.mesh` of more than one device runs every stage sharded (`docs/sharding.md`): the state is
placed by the parameters' logical axes, each host loads its own rows of the global batch, the routed experts
run expert-parallel when `expert > 1` and the sequence is split over `context > 1`; checkpoints hold the
sharded state. A mesh of one device is the plain single-device run.
"""

import contextlib
import dataclasses
import json
import pathlib
import time

import jax
import numpy as np

from dsa_jax.checkpoint.hf_config import read_config
from dsa_jax.data import pipeline, retrieval
from dsa_jax.data.tokenizer import check_vocab_fits
from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig, preset
from dsa_jax.sharding import distributed, expert_parallel, partition, rules
from dsa_jax.sharding.mesh import MeshConfig, make_mesh
from dsa_jax.training import checkpointing, evaluation, flops, loop, losses, moe_balance, run_dir
from dsa_jax.training import optimizer as optim
from dsa_jax.training import state as state_lib
from dsa_jax.training.train_step import StepConfig
from dsa_jax.validation import as_dict, dataclass_from_config

INITS = ("random", "orbax", "hf")
STAGE_NAMES = ("dense", "warmup", "sparse", "dense_cont")
STAGE_STARTS = {"dense": None, "warmup": "dense", "sparse": "warmup", "dense_cont": "dense"}


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
  model: ModelConfig
  data: pipeline.DataConfig
  run_dir: str
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  loss: losses.LossConfig = losses.LossConfig()
  bias_gamma: float = moe_balance.DEFAULT_GAMMA  # aux-loss-free balance speed (`training/moe_balance.py`)
  dense_steps: int = 200
  warmup_steps: int = 50
  sparse_steps: int = 100
  compare_dense: bool = True
  # Which stages this process runs ("" = all): e.g. "dense,dense_cont" and "dense,warmup,sparse" in two
  # processes split a run that does not fit one job's time limit (the data order is the same in both).
  stages: str = ""
  init: str = "random"  # "random" | "orbax" (a stage checkpoint directory) | "hf" (an HF checkpoint directory)
  init_path: str = ""
  seed: int = 0
  checkpoint_every: int = 50
  keep: int = 2
  log_every: int = 10
  eval_every: int = 0  # > 0: top-k attention mass during warmup and sparse every this many steps
  eval_batches: int = 2
  eval_examples: int = 32
  implementation: str | None = None
  mesh: MeshConfig = MeshConfig()
  export_hf: bool = False  # write the final model and tokenizer to run_dir/hf (one process only)
  # Set the run directory's files aside (`run_dir/set_aside/<n>/`) and start over: needed when its
  # checkpoints are all unusable or it holds a run of another config (`run_dir.remember`).
  restart_from_scratch: bool = False

  @property
  def stage_names(self) -> tuple[str, ...]:
    if self.stages:
      return tuple(s.strip() for s in self.stages.split(",") if s.strip())
    return STAGE_NAMES if self.compare_dense else STAGE_NAMES[:3]

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"RecipeConfig.init={self.init!r} is invalid; allowed: {INITS}.")
    if self.init != "random" and not self.init_path:
      raise ValueError(f"RecipeConfig.init_path={self.init_path!r} is invalid with init={self.init!r}; "
                       "allowed: the checkpoint directory.")
    if not self.bias_gamma >= 0:
      raise ValueError(f"RecipeConfig.bias_gamma={self.bias_gamma!r} is invalid; allowed: >= 0.")
    stages = self.stage_names
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
      raise ValueError(f"RecipeConfig.stages={self.stages!r} is invalid: {unknown} unknown; allowed: a "
                       f"comma-separated subset of {STAGE_NAMES}.")
    for stage in stages:
      if STAGE_STARTS[stage] is not None and STAGE_STARTS[stage] not in stages:
        raise ValueError(f"RecipeConfig.stages={self.stages!r} is invalid: {stage!r} starts from "
                         f"{STAGE_STARTS[stage]!r}, which must run in the same process; allowed: include it.")
    for name in ("dense_steps", "warmup_steps", "sparse_steps", "checkpoint_every", "eval_every"):
      if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
        raise ValueError(f"RecipeConfig.{name}={getattr(self, name)!r} is invalid; allowed: an integer >= 0.")
    if self.data.seq_len > self.model.max_position:
      raise ValueError(f"DataConfig.seq_len={self.data.seq_len} is invalid; allowed: <= ModelConfig.max_position="
                       f"{self.model.max_position}.")
    self.mesh.validate_model(self.model)  # before any data or weights are read
    self.mesh.validate_batch(self.data.batch_size, self.data.seq_len)

  @classmethod
  def from_config(cls, tree) -> "RecipeConfig":
    """A config file's tree (`experiments/configs/train_*.py`: a ConfigDict or nested dict) -> RecipeConfig.

    `model`: a preset's name and overrides of its fields ({"preset": "tiny", "indexer": {"topk": 32}}); with
    init="hf" the checkpoint's config.json instead, of which the file sets only `indexer.topk` and
    `max_position` (the weights fix every shape). `train` and the top-level keys: RecipeConfig's own fields.
    `data`, `optimizer`, `loss`, `mesh`: their dataclasses. Unknown keys fail with their name
    (`validation.dataclass_from_config`).
    """
    tree = as_dict(tree)
    model, train = as_dict(tree.pop("model")), as_dict(tree.pop("train", {}))
    both = sorted(set(train) & set(tree))
    if both:
      raise ValueError(f"RecipeConfig fields {both} are set both in `train` and at the top level; allowed: one.")
    fields = {**train, **tree}
    if "preset" not in model:
      raise ValueError(f"RecipeConfig.model={model!r} is invalid; allowed: a 'preset' and overrides of its fields.")
    model = dataclass_from_config(preset(model.pop("preset")), model, where="ModelConfig")
    if fields.get("init") == "hf":
      hf = read_config(fields.get("init_path", ""))
      model = hf.replace(indexer=dataclasses.replace(hf.indexer, topk=model.indexer.topk),
                         max_position=model.max_position)
    return dataclass_from_config(cls, {**fields, "model": model})


IDENTITY = ("model", "data", "optimizer", "loss", "bias_gamma", "seed", "init", "init_path")


def run_identity(cfg: RecipeConfig) -> dict:
  """The fields that define a run (what its checkpoints and metrics mean): a rerun must match them."""
  return {name: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
          for name in IDENTITY for v in [getattr(cfg, name)]}


def initial_state(cfg: RecipeConfig) -> state_lib.TrainState:
  """Step-0 state of the dense stage from random weights, our Orbax checkpoint or an HF checkpoint."""
  if cfg.init == "hf":
    from dsa_jax.checkpoint.hf_convert import load_hf  # only this start needs the converter
    hf_cfg, model = load_hf(cfg.init_path, include_mtp=cfg.model.num_mtp_layers > 0)
    if hf_cfg.replace(indexer=cfg.model.indexer, max_position=cfg.model.max_position) != cfg.model:
      raise ValueError(f"RecipeConfig.model does not match the HF checkpoint {cfg.init_path}; allowed: its config "
                       f"(top-k and max_position may differ): {hf_cfg}")
  else:
    model = functional.init(cfg.model, cfg.seed)
  state = state_lib.create(cfg.model, model, optim.build(cfg.optimizer, "dense"), cfg.seed)
  if cfg.init == "orbax":
    restored = checkpointing.Checkpointer(cfg.init_path, every=1).restore_latest(state)
    if restored is None:
      raise FileNotFoundError(f"RecipeConfig.init_path={cfg.init_path!r} holds no readable checkpoint.")
    state = state_lib.start_stage(restored[0], optim.build(cfg.optimizer, "dense"))
  return state


class Recipe:
  """Runs the stages of one run directory and collects their evaluations."""

  def __init__(self, cfg: RecipeConfig, stop: loop.StopRequest | None = None):
    self.cfg, self.stop = cfg, stop
    self.root = pathlib.Path(cfg.run_dir)
    run_dir.remember(self.root, run_identity(cfg), restart=cfg.restart_from_scratch)  # before any data is read
    self.mesh = make_mesh(cfg.mesh) if cfg.mesh.size > 1 else None
    self.data_cfg = cfg.data
    if self.mesh is not None:  # this host's block of rows picks its documents
      index, count = distributed.data_shard(self.mesh, cfg.data.batch_size, cfg.data.seq_len)
      self.data_cfg = dataclasses.replace(cfg.data, shard_index=index, shard_count=count)
    # Built once: the dispatch is part of the step's jit cache key, hashed by identity.
    self.parallel = {} if self.mesh is None else {
        "expert_dispatch": expert_parallel.make_dispatch(self.mesh) if cfg.mesh.expert > 1 else None,
        "context": cfg.mesh.context}
    self.tokenizer = pipeline.build_tokenizer(cfg.data)
    check_vocab_fits(self.tokenizer, cfg.model.vocab_size, "RecipeConfig.model.vocab_size")
    self.train_docs, eval_docs = pipeline.documents(cfg.data)
    self.eval_batches = pipeline.eval_batches(cfg.data, eval_docs, self.tokenizer, cfg.eval_batches)
    self.examples = retrieval.eval_examples(eval_docs, self.tokenizer, cfg.data.retrieval.final_length(
        cfg.data.seq_len), cfg.eval_examples, cfg.data.retrieval)
    self.peak, self.peak_source = flops.peak_flops()

  def evaluate(self, state, attention: str) -> dict[str, float]:
    with self._on_mesh():
      return evaluation.evaluate(self.cfg.model, state, self.eval_batches, self.examples, attention,
                                 self.cfg.data.batch_size, self.cfg.implementation)

  def _on_mesh(self):
    """The mesh and its activation rules for jitted calls outside the step (evaluation)."""
    return rules.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _place(self, state: state_lib.TrainState) -> state_lib.TrainState:
    """The state on the mesh, each array as the parameters' logical axes say (unchanged on one device)."""
    if self.mesh is None:
      return state
    return jax.device_put(state, partition.shardings_like(state, functional.abstract_state(self.cfg.model),
                                                          self.mesh))

  def _start(self, name: str, tx, start: tuple | None, checkpointer: checkpointing.Checkpointer):
    """(state, data iterator) a stage starts from: its newest usable checkpoint (`Checkpointer.resume`), else
    the end of `start`, else the initial state; the state placed on the mesh."""
    data = iter(pipeline.train_dataset(self.data_cfg, self.train_docs, self.tokenizer))
    if start is None:
      state = state_lib.start_stage(initial_state(self.cfg), tx)
    else:
      state = state_lib.start_stage(start[0], tx)
      data.set_state(start[1].get_state())
    state = self._place(state)
    restored = checkpointer.resume(state, label=name)  # into the placed state's shardings
    if restored is not None:
      state = restored[0]
      data.set_state(restored[1])
    return state, data

  def run_stage(self, name: str, stage: str, steps: int, start: tuple | None) -> tuple | None:
    """Trains one stage; returns (state, data iterator) at its end, or None when stopped by SIGTERM."""
    cfg = self.cfg
    step_cfg = StepConfig(model=cfg.model, stage=stage, optimizer=cfg.optimizer, loss=cfg.loss,
                          bias_gamma=cfg.bias_gamma, implementation=cfg.implementation, **self.parallel)
    checkpointer = checkpointing.Checkpointer(self.root / name / "checkpoints", keep=cfg.keep,
                                              every=cfg.checkpoint_every or steps or 1)
    state, data = self._start(name, optim.build(cfg.optimizer, stage), start, checkpointer)
    step_fn = None if self.mesh is None else loop.sharded_step(step_cfg, state, self.mesh, cfg.data.batch_size)
    log = loop.MetricsLog(self.root / name, start_step=int(state.step))
    per_token = flops.per_token(cfg.model, cfg.data.seq_len, stage, step_cfg.with_mtp)
    try:
      for target in self._eval_points(stage, steps):
        state, stopped = loop.run(step_cfg, state, data, steps=target, checkpointer=checkpointer, log=log,
                                  flops_per_token=per_token, peak_flops=self.peak * cfg.mesh.size,
                                  log_every=cfg.log_every, stop=self.stop, label=name, step_fn=step_fn,
                                  data_shards=self.data_cfg.shard[1], final=target == steps)
        if stopped:
          return None
        if stage != "dense" and cfg.eval_every:
          with self._on_mesh():
            mass = evaluation.indexer_metrics(cfg.model, state, self.eval_batches[0], cfg.implementation)
          log.write(target, {f"eval_{k}": float(v) for k, v in mass.items()})
    finally:
      log.close()
      checkpointer.close()
    return state, data

  def _eval_points(self, stage: str, steps: int) -> list[int]:
    every = self.cfg.eval_every if stage != "dense" and self.cfg.eval_every else max(steps, 1)
    return sorted(set(list(range(every, steps, every)) + [steps]))


def _step_time(path: pathlib.Path) -> float:
  """Median step time of a stage's log, without its first (compiling) step."""
  times = [r["step_time_s"] for r in loop.read_metrics(path) if "step_time_s" in r]
  return float(np.median(times[1:] or times)) if times else float("nan")


def run(cfg: RecipeConfig, stop: loop.StopRequest | None = None) -> dict | None:
  """All stages, evaluations after each; writes `run_dir/results.json`. None when stopped by SIGTERM."""
  done = run_with_states(cfg, stop)
  return None if done is None else done[0]


def run_with_states(cfg: RecipeConfig, stop: loop.StopRequest | None = None
                    ) -> tuple[dict, dict[str, state_lib.TrainState]] | None:
  """`run`, also returning each stage's final state by stage name (for further evaluations, e.g.
  `dsa_jax.evaluation.long_context`)."""
  started = time.perf_counter()
  if cfg.export_hf and jax.process_count() > 1:
    raise ValueError(f"RecipeConfig.export_hf=True is invalid with {jax.process_count()} processes; allowed: one "
                     "process (export from a checkpoint on one host).")
  recipe = Recipe(cfg, stop)
  results = {"run_dir": str(recipe.root.absolute()), "peak_flops": recipe.peak, "peak_source": recipe.peak_source,
             "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
             "retrieval_eval": cfg.data.retrieval.describe(cfg.data.seq_len)}
  # dense_cont right after dense: it reuses the dense step's compilation, and the stage that needs the most
  # compiling (sparse) comes last.
  stages = [("dense", "dense", cfg.dense_steps, None, "dense"),
            ("dense_cont", "dense", cfg.warmup_steps + cfg.sparse_steps, "dense", "dense"),
            ("warmup", "warmup", cfg.warmup_steps, "dense", "sparse"),
            ("sparse", "sparse", cfg.sparse_steps, "warmup", "sparse")]
  stages = [s for s in stages if s[0] in cfg.stage_names]
  ends = {}
  for name, stage, steps, start, attention in stages:
    ends[name] = recipe.run_stage(name, stage, steps, ends.get(start))
    if ends[name] is None:
      return None
    results[name] = recipe.evaluate(ends[name][0], attention)
    results[name]["step_time_s"] = _step_time(recipe.root / name / "metrics.jsonl") if steps else float("nan")
    results[name]["steps"] = steps
    print(f"[{name}] eval ({attention} attention): " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items())
          + f" | {time.perf_counter() - started:.0f} s since start", flush=True)
    if jax.process_index() == 0:
      (recipe.root / "results.json").write_text(json.dumps(results, indent=1))
  if cfg.export_hf:
    print(f"HF checkpoint of the final model: {export_hf(cfg, ends, recipe.tokenizer)}", flush=True)
  return results, {name: end[0] for name, end in ends.items()}


def export_hf(cfg: RecipeConfig, ends: dict, tokenizer) -> pathlib.Path:
  """The last of the dense, warmup and sparse stages that ran, with the run's tokenizer -> run_dir/hf."""
  from dsa_jax.checkpoint.hf_convert import save_hf  # only the export needs the converter

  last = next(name for name in ("sparse", "warmup", "dense") if name in ends)
  state = ends[last][0]
  path = pathlib.Path(cfg.run_dir) / "hf"
  save_hf(path, cfg.model, state_lib.model_state(cfg.model, state.params, state.model_state), tokenizer=tokenizer)
  return path


def table(results: dict) -> str:
  """The main job's summary table (markdown): each measure for the dense baseline and for the DSA model."""
  dense = results.get("dense_cont", results["dense"])
  sparse, before, warm = results["sparse"], results["dense"], results["warmup"]
  what = results.get("retrieval_eval", "key-value lookups")  # results.json of earlier runs lacks it
  rows = [("held-out LM loss", "dense model, dense attention", dense["lm_loss"], "DSA model, sparse attention",
           sparse["lm_loss"]),
          ("indexer dense KL", "start of warm-up", before["dense_kl"], "end of warm-up", warm["dense_kl"]),
          ("attention mass inside top-k", "start of warm-up", before["topk_mass"], "end of warm-up",
           warm["topk_mass"]),
          ("attention mass inside top-k", "end of warm-up", warm["topk_mass"], "end of sparse stage",
           sparse["topk_mass"]),
          (f"retrieval exact match ({what})", "dense model", dense["retrieval_exact"], "DSA model",
           sparse["retrieval_exact"]),
          (f"retrieval per-token accuracy ({what})", "dense model", dense["retrieval_token"], "DSA model",
           sparse["retrieval_token"]),
          ("median step time (s)", "dense stage", dense["step_time_s"], "sparse stage", sparse["step_time_s"])]
  lines = ["| measure | baseline | value | compared with | value |", "| --- | --- | --- | --- | --- |"]
  lines += [f"| {m} | {a} | {va:.4f} | {b} | {vb:.4f} |" for m, a, va, b, vb in rows]
  if dense["retrieval_exact"] == 0 and sparse["retrieval_exact"] == 0:
    lines += ["", "Retrieval exact match is 0 for both: neither model learned the lookup in this run (too short), so "
              "the rows show that the evaluator runs, not how DSA retrieves; experiments/long_context_study.py "
              "trains and measures that."]
  return "\n".join(lines)
