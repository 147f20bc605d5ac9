"""Optimizers of the three stages, with freezing and per-group learning rates through `optax.multi_transform`.

Parameter groups: "indexer" (every parameter under an `indexer` module: wq_b, wk, k_norm, weights_proj)
and "main" (everything else). Stage -> what trains (spec section 2):
  dense   main at lr_main; indexer frozen          (ordinary dense pre-training)
  warmup  indexer at lr_indexer_warmup; main frozen  (paper: lr 1e-3, 1000 steps)
  sparse  main at lr_main, indexer at lr_indexer     (paper: main lr 7.3e-6; the indexer's is not published)
Defaults follow DeepSeek-V3 section 4.2: AdamW b1 0.9, b2 0.95, weight decay 0.1, gradient clipping at
norm 1.0 (applied per group), linear learning-rate warm-up.
"""

import dataclasses

import jax
import optax

STAGES = ("dense", "warmup", "sparse")
GROUPS = ("main", "indexer")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  lr_main: float = 3e-4  # small-scale value; the paper's 7.3e-6 belongs to a 671B model at 943B tokens
  lr_indexer: float = 1e-4
  lr_indexer_warmup: float = 1e-3  # paper section 2.1.1
  warmup_steps: int = 20
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  clip_norm: float = 1.0

  def __post_init__(self):
    for name in ("lr_main", "lr_indexer", "lr_indexer_warmup", "clip_norm"):
      if not getattr(self, name) > 0:
        raise ValueError(f"OptimizerConfig.{name}={getattr(self, name)!r} is invalid; allowed: > 0.")
    if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps!r} is invalid; allowed: an int >= 0.")


def group_labels(params) -> dict:
  """A pytree like `params` naming each leaf's group: "indexer" or "main"."""
  def label(path, _):
    return "indexer" if any(getattr(k, "key", None) == "indexer" for k in path) else "main"
  return jax.tree_util.tree_map_with_path(label, params)


def _adamw(cfg: OptimizerConfig, lr: float) -> optax.GradientTransformation:
  schedule = optax.linear_schedule(0.0, lr, cfg.warmup_steps) if cfg.warmup_steps else lr
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                     optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


def learning_rates(cfg: OptimizerConfig, stage: str) -> dict[str, float]:
  """Peak learning rate of each group in a stage (0: frozen)."""
  if stage not in STAGES:
    raise ValueError(f"stage={stage!r} is invalid; allowed: {STAGES}.")
  return {"dense": {"main": cfg.lr_main, "indexer": 0.0},
          "warmup": {"main": 0.0, "indexer": cfg.lr_indexer_warmup},
          "sparse": {"main": cfg.lr_main, "indexer": cfg.lr_indexer}}[stage]


def build(cfg: OptimizerConfig, stage: str) -> optax.GradientTransformation:
  """The stage's optimizer: AdamW per trained group, `set_to_zero` for frozen ones (no moments kept)."""
  transforms = {group: _adamw(cfg, lr) if lr else optax.set_to_zero()
                for group, lr in learning_rates(cfg, stage).items()}
  return optax.multi_transform(transforms, group_labels)
