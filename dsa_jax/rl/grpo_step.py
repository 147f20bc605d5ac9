"""One GRPO update with DeepSeek-V3.2's stabilisers, as a pure `step(state, batch) -> (state, metrics)`.

DeepSeek-V3.2 §3.1 "Scaling GRPO" (spec §3). Three policies are carried explicitly:
  μ      the sampler: `batch.sampler_logp`, recorded at rollout time (possibly another dtype);
  π_old  the trainer's log-probs with the parameters that sampled: on the first (on-policy) update of a
         batch these are the current parameters, so old_logp = stop_gradient(logp) of the same forward and
         the ratio is exactly 1; for further updates on one batch `score(with_old=True)` records them first;
  π_θ    the current parameters, the only ones differentiated;
and π_ref, frozen reference parameters in the state (never updated).
Keep Routing (`keep_routing`): the training forward replays the sampler's experts at every slot (gates
recomputed from live router scores, `model.moe`). Keep Sampling Mask (`keep_sampling_mask`): π_θ and π_old
are renormalised over the sampler's kept set (`kept_log_softmax`); π_ref always uses the full softmax, and
runs its own routing: it is the fixed reference model, not a policy that sampled.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsa_jax.model import functional, moe
from dsa_jax.model.config import ModelConfig
from dsa_jax.rl.grpo_loss import grpo_loss
from dsa_jax.rl.rollout import RolloutBatch
from dsa_jax.sampling.sampling_mask import kept_log_softmax, kept_probability_mass, token_log_softmax


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Loss and stabiliser switches (ε, β, δ are not published for V3.2; these suit the tiny tasks)."""
  eps: float = 0.2
  beta: float = 0.01
  delta: float = 0.5
  token_mean: bool = False
  keep_routing: bool = True
  keep_sampling_mask: bool = True
  temperature: float = 1.0
  attention: str = "sparse"


@dataclasses.dataclass(frozen=True)
class GRPOState:
  """Everything a run needs to resume exactly (one pytree, checkpointed whole by `rl.loop`)."""
  params: nnx.State
  opt_state: optax.OptState
  ref_params: nnx.State
  rng: jax.Array
  step: jax.Array  # int32 scalar: updates done
  cursor: jax.Array  # int32 scalar: rollout batches drawn from the task (the data cursor)


jax.tree_util.register_dataclass(GRPOState, data_fields=["params", "opt_state", "ref_params", "rng", "step", "cursor"],
                                 meta_fields=[])


def init_state(params: nnx.State, optimizer: optax.GradientTransformation, seed: int) -> GRPOState:
  """Copies `params` (the update donates the state) and freezes another copy as the reference.

  Router biases are in the state too; they get zero gradient (they steer selection only).
  """
  params = jax.tree.map(jnp.copy, params)
  return GRPOState(params, optimizer.init(params), jax.tree.map(jnp.copy, params), jax.random.PRNGKey(seed),
                   jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def _route_agreement(cfg: ModelConfig, params: nnx.State, out, batch: RolloutBatch, mask_bt: jax.Array) -> jax.Array:
  """Fraction of the sampler's experts that the trainer's own router would also pick (generated tokens)."""
  agree = []
  for i, sampler_experts in batch.experts.items():
    scores = out.layer_aux[i].moe.scores
    own = moe.route(scores.reshape(-1, scores.shape[-1]), params["layers"][i]["ffn"]["bias"][...], cfg.moe)
    own = own.reshape(sampler_experts.shape)
    hit = (sampler_experts[..., :, None] == own[..., None, :]).any(-1).mean(-1)  # [B, L]
    agree.append((hit[:, 1:] * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0))
  return jnp.mean(jnp.stack(agree)) if agree else jnp.ones(())


def policy_logp(cfg: ModelConfig, gcfg: GRPOConfig, params: nnx.State, batch: RolloutBatch, *,
                reference: bool = False) -> tuple[jax.Array, dict]:
  """log π(token) [B, L-1] of the token at slot j+1 given slots <= j, and diagnostics.

  A policy (reference=False) replays routes and truncation as configured; the reference never does.
  """
  replay = gcfg.keep_routing and not reference
  out = functional.apply(cfg, params, batch.tokens, attention=gcfg.attention, positions=batch.positions,
                         segment_ids=batch.segment_ids, forced_experts=batch.experts if replay else None)
  logits_btv = out.logits[:, :-1] / gcfg.temperature
  targets_bt, kept_btk = batch.tokens[:, 1:], batch.kept_ids[:, 1:]
  mask_bt = batch.mask[:, 1:].astype(jnp.float32)
  if gcfg.keep_sampling_mask and not reference:
    logp_bt = kept_log_softmax(logits_btv, kept_btk, targets_bt)
  else:
    logp_bt = token_log_softmax(logits_btv, targets_bt)
  stats = {}
  if not reference:
    mass_bt = kept_probability_mass(jax.lax.stop_gradient(logits_btv), kept_btk)
    stats["kept_mass"] = (mass_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)
    stats["route_agreement"] = _route_agreement(cfg, params, jax.lax.stop_gradient(out), batch, mask_bt)
  return logp_bt, stats


@functools.partial(jax.jit, static_argnames=("cfg", "gcfg", "with_old"))
def score(cfg: ModelConfig, gcfg: GRPOConfig, params: nnx.State, ref_params: nnx.State, batch: RolloutBatch,
          with_old: bool = False) -> RolloutBatch:
  """The batch with ref_logp (π_ref) and, when `with_old`, old_logp (π_old: `params` sampled it)."""
  old_logp = policy_logp(cfg, gcfg, params, batch)[0] if with_old else None
  return dataclasses.replace(batch, old_logp=old_logp,
                             ref_logp=policy_logp(cfg, gcfg, ref_params, batch, reference=True)[0])


def step(state: GRPOState, batch: RolloutBatch, *, cfg: ModelConfig, gcfg: GRPOConfig,
         optimizer: optax.GradientTransformation) -> tuple[GRPOState, dict]:
  """One optimizer update on the negated GRPO objective (`rl.grpo_loss`) for a `score`d batch."""
  def loss_fn(params):
    logp_bt, stats = policy_logp(cfg, gcfg, params, batch)
    old_logp = jax.lax.stop_gradient(logp_bt) if batch.old_logp is None else batch.old_logp
    loss, aux = grpo_loss(logp_bt, old_logp, batch.ref_logp, batch.sampler_logp[:, 1:], batch.advantages,
                          batch.mask[:, 1:], eps=gcfg.eps, beta=gcfg.beta, delta=gcfg.delta,
                          token_mean=gcfg.token_mean)
    return loss, (aux, stats)

  (loss, (aux, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {k: v for k, v in aux.items() if k != "seq_mask"}
  metrics.update(stats, loss=loss, grad_norm=optax.global_norm(grads), seq_mask_mean=aux["seq_mask"].mean())
  return dataclasses.replace(state, params=params, opt_state=opt_state, step=state.step + 1), metrics


def make_step(cfg: ModelConfig, gcfg: GRPOConfig, optimizer: optax.GradientTransformation):
  """`step` under one jit with the configs bound and the state donated."""
  return jax.jit(functools.partial(step, cfg=cfg, gcfg=gcfg, optimizer=optimizer), donate_argnums=(0,))
