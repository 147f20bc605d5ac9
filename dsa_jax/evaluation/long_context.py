"""Long-context evaluation of any model state (a checkpoint's `TrainState`): does DSA keep long-range ability?

- `retrieval_grid`: a RULER-style grid (Hsieh et al., 2024) of synthetic key-value lookups
  (`dsa_jax.data.retrieval`) over context length x needle depth x number of pairs x hops; exact match per cell.
  Scored by teacher forcing: one batched forward per batch, the argmax at each answer position compared with the
  answer; an example counts only when every answer token matches, which is exactly greedy decoding's exact match
  (`retrieval.exact_matches` gives the induction), so no sampling loop is needed.
- `topk_sweep`: a DSA model with sparse attention at evaluation-time top-k = each of `ks` and all visible keys
  (computed as dense attention, which equals sparse attention over every visible key):
  exact match per k, the smallest k down to which retrieval holds (`holds_down_to`), and the share of the dense
  attention at the answer query (the question's last token, which predicts the first answer token) that the
  indexer's top-k set captures, per needle depth, averaged over layers and heads (`evaluation.selected_mass`).
- `heldout_loss`: LM loss over held-out batches (>= 50 for the study) with a 95% t-interval over the batch means
  (batches are i.i.d. draws of documents; tokens within a batch are not independent, so the batch is the unit),
  and the loss by position bucket (position within its document: does DSA lose at long range?).

Every function takes the model config, a state with `.params` and `.model_state` (`training.state.TrainState`),
and held-out documents; results are plain dicts for JSON. `dsa_jax.evaluation.plots` draws them.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dsa_jax.data import retrieval
from dsa_jax.data.corpus import clip
from dsa_jax.data.tokenizer import Tokenizer
from dsa_jax.model import functional
from dsa_jax.model.config import ModelConfig
from dsa_jax.model.indexer import IndexerInputs, select
from dsa_jax.training import evaluation, losses
from dsa_jax.training.state import model_state
from dsa_jax.validation import check_field, check_positive


@dataclasses.dataclass(frozen=True)
class GridConfig:
  """The grid's axes, `examples` per cell (each on its own held-out document window), `digits`-digit values and
  `key_letters`-letter keys. Depth: where the asked key's needle sits, as a fraction of the filler; the other
  needles fall uniformly in the first `max_depth`. Cells with fewer pairs than hops do not exist and are left
  out (`cells`)."""
  lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
  depths: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
  pairs: tuple[int, ...] = (1, 4, 16)
  hops: tuple[int, ...] = (1, 2)
  examples: int = 8
  batch_size: int = 8
  digits: int = 3
  key_letters: int = 3
  max_depth: float = 0.9
  seed: int = 1234

  def __post_init__(self):
    for name in ("lengths", "depths", "pairs", "hops"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
      check_field(len(getattr(self, name)) > 0, f"GridConfig.{name}", getattr(self, name), "at least one value")
    check_field(all(0.0 <= d <= 1.0 for d in self.depths), "GridConfig.depths", self.depths, "fractions in [0, 1]")
    check_field(max(self.pairs) >= min(self.hops), "GridConfig.pairs", self.pairs,
                f"a pair count >= the fewest hops, {min(self.hops)} (a lookup of h hops reads h needles)")
    check_positive(self, "examples", "batch_size", "digits", "key_letters")

  def cells(self, length: int) -> list[tuple[float, int, int]]:
    """(depth, pairs, hops) of the cells at one length."""
    return [(d, p, h) for d in self.depths for p in self.pairs for h in self.hops if p >= h]

  def retrieval(self, pairs: int, hops: int) -> retrieval.RetrievalConfig:
    return retrieval.RetrievalConfig(num_pairs=pairs, hops=hops, digits=self.digits, key_letters=self.key_letters,
                                     max_depth=self.max_depth)


def cell_examples(grid: GridConfig, docs: list[str], tokenizer: Tokenizer, length: int, depth: float, pairs: int,
                  hops: int) -> list[retrieval.Example]:
  """One cell's examples: the same seed for every model, so two models are scored on the same examples."""
  if not docs:
    raise ValueError("docs is empty; allowed: held-out documents to hide the needles in.")
  key = [grid.seed, length, round(depth * 1000), pairs, hops]
  rng = np.random.default_rng(key)
  cfg = grid.retrieval(pairs, hops)
  return [retrieval.make_example(rng, tokenizer.encode(clip(docs[int(rng.integers(len(docs)))], length)), length,
                                 tokenizer, cfg, depth) for _ in range(grid.examples)]


def _logits_fn(cfg: ModelConfig, state, attention: str, implementation: str | None):
  return lambda ids: evaluation.logits(cfg, state, evaluation.unpacked(ids), attention, implementation)


def retrieval_grid(cfg: ModelConfig, state, docs: list[str], tokenizer: Tokenizer, grid: GridConfig,
                   attention: str, implementation: str | None = None) -> list[dict]:
  """Exact match and per-token accuracy of every cell (length, depth, pairs, hops) -> one dict per cell."""
  cells = []
  for length in grid.lengths:
    for depth, pairs, hops in grid.cells(length):
      examples = cell_examples(grid, docs, tokenizer, length, depth, pairs, hops)
      exact, tokens = retrieval.exact_matches(_logits_fn(cfg, state, attention, implementation), examples,
                                              grid.batch_size)
      cells.append({"length": length, "depth": depth, "pairs": pairs, "hops": hops, "exact": float(exact.mean()),
                    "token": float(tokens.sum() / sum(e.answer_len for e in examples))})
  return cells


def mean_exact(cells: list[dict], **where) -> float:
  """Mean exact match over the cells whose fields equal `where` (e.g. length=8192), or NaN when none do."""
  chosen = [c["exact"] for c in cells if all(c[k] == v for k, v in where.items())]
  return float(np.mean(chosen)) if chosen else float("nan")


@functools.partial(jax.jit, static_argnames=("cfg", "ks", "implementation"))
def _answer_mass(cfg: ModelConfig, params: dict, other: dict, batch: dict, query: jax.Array, ks: tuple[int, ...],
                 implementation: str | None) -> jax.Array:
  """Dense attention mass at query position `query` [B] captured by the indexer's top-k for each k -> [len(ks), B],
  averaged over layers (and heads)."""
  out = functional.apply(cfg, model_state(cfg, params, other), batch["ids"], attention="dense", mla_mode="mqa",
                         implementation=implementation, positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
  at = lambda x: jnp.take_along_axis(x, query.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)  # [B, 1, ...]
  masses = []
  for k in ks:
    per_layer = []
    for aux in (layer.attention for layer in out.layer_aux):
      inputs = IndexerInputs(q=at(aux.indexer.q), k=aux.indexer.k, w=at(aux.indexer.w))
      idx = select(inputs, k, q_positions=at(batch["positions"]), kv_positions=batch["positions"],
                   q_segment_ids=at(batch["segment_ids"]), kv_segment_ids=batch["segment_ids"],
                   implementation=implementation)
      mqa = dataclasses.replace(aux.mqa, q=at(aux.mqa.q))
      per_layer.append(evaluation.selected_mass(cfg, mqa, at(aux.lse), idx)[:, 0])
    masses.append(jnp.stack(per_layer).mean(0))
  return jnp.stack(masses)


def with_topk(cfg: ModelConfig, k: int) -> ModelConfig:
  return cfg.replace(indexer=dataclasses.replace(cfg.indexer, topk=k))


def holds_down_to(ks: list[int], exact: list[float], reference: float, tolerance: float) -> int | None:
  """The smallest k such that every k' >= k in the sweep scores at least `reference - tolerance` (None: not even
  the largest)."""
  held = None
  for k, e in sorted(zip(ks, exact), reverse=True):
    if e < reference - tolerance:
      break
    held = k
  return held


def topk_sweep(cfg: ModelConfig, state, docs: list[str], tokenizer: Tokenizer, grid: GridConfig, ks: tuple[int, ...],
               length: int, tolerance: float = 0.05, implementation: str | None = None) -> dict:
  """Sparse attention at each evaluation-time top-k of `ks` and at all visible keys (k = length), on the grid's
  cells at `length` (every depth, pair count and hop count): exact match per k; the smallest k down to which it
  stays within `tolerance` of the all-keys score; the dense attention mass in the top-k at the answer query,
  per depth (mean over that depth's examples)."""
  if cfg.indexer is None:
    raise ValueError("topk_sweep: the model has no indexer; allowed: a DSA model (ModelConfig.indexer set).")
  ks = tuple(sorted({k for k in ks if k < length} | {length}))
  cells = {cell: cell_examples(grid, docs, tokenizer, length, *cell) for cell in grid.cells(length)}
  exact = []
  for k in ks:  # all visible keys: dense attention, the same function without a [B, T, length] index tensor
    fn = _logits_fn(with_topk(cfg, k), state, "sparse", implementation) if k < length else _logits_fn(
        cfg, state, "dense", implementation)
    hits = [retrieval.exact_matches(fn, examples, grid.batch_size)[0] for examples in cells.values()]
    exact.append(float(np.concatenate(hits).mean()))
  mass = {}
  for depth in grid.depths:
    examples = [e for (d, _, _), chunk in cells.items() if d == depth for e in chunk]
    per_k = []
    for i in range(0, len(examples), grid.batch_size):
      chunk = examples[i:i + grid.batch_size]
      query = jnp.asarray([e.answer_start - 1 for e in chunk], jnp.int32)
      batch = evaluation.unpacked(np.stack([e.ids for e in chunk]))
      per_k.append(np.asarray(_answer_mass(cfg, state.params, state.model_state, batch, query, ks, implementation)))
    mass[str(depth)] = np.concatenate(per_k, axis=1).mean(1).tolist()
  return {"length": length, "ks": list(ks), "exact": exact, "tolerance": tolerance,
          "holds_down_to": holds_down_to(list(ks), exact, exact[-1], tolerance), "mass_by_depth": mass}


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "implementation"))
def _token_nll(cfg: ModelConfig, params: dict, other: dict, batch: dict, attention: str,
               implementation: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-position next-token loss [B, T] float32 and whether it counts [B, T] bool (`losses.shifted_labels`)."""
  logits = functional.apply(cfg, model_state(cfg, params, other), batch["ids"], attention=attention,
                            implementation=implementation, positions=batch["positions"],
                            segment_ids=batch["segment_ids"]).logits.astype(jnp.float32)
  labels, mask = losses.shifted_labels(batch["ids"], batch["loss_mask"], batch["segment_ids"])
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return nll, mask


def heldout_loss(cfg: ModelConfig, state, batches: list[dict], attention: str, buckets: int = 8,
                 implementation: str | None = None) -> dict:
  """Mean LM loss over `batches` with a 95% t-interval over the batch means, and the loss by position bucket:
  `buckets` equal ranges of the position within its document over [0, seq_len) (None where no token falls: no
  document that long)."""
  if len(batches) < 2:
    raise ValueError(f"heldout_loss: {len(batches)} batches; allowed: at least 2 (an interval needs a spread).")
  means, sums, counts = [], np.zeros(buckets), np.zeros(buckets)
  for batch in batches:
    inputs = {k: jnp.asarray(batch[k]) for k in ("ids", "positions", "segment_ids", "loss_mask")}
    nll, mask = map(np.asarray, _token_nll(cfg, state.params, state.model_state, inputs, attention, implementation))
    means.append(float(nll[mask].mean()))
    bucket = np.minimum(np.asarray(batch["positions"]) * buckets // batch["ids"].shape[1], buckets - 1)
    sums += np.bincount(bucket[mask], weights=nll[mask], minlength=buckets)
    counts += np.bincount(bucket[mask], minlength=buckets)
  mean, sem = float(np.mean(means)), float(stats.sem(means))
  half = float(stats.t.ppf(0.975, len(means) - 1) * sem)
  edges = [int(i * batches[0]["ids"].shape[1] // buckets) for i in range(buckets + 1)]
  return {"loss": mean, "ci95": [mean - half, mean + half], "batches": len(means), "batch_means": means,
          "bucket_edges": edges, "loss_by_bucket": [float(a / n) if n else None for a, n in zip(sums, counts)],
          "tokens_by_bucket": counts.astype(int).tolist()}
