"""The train state, the optimiser, the loss of one batch, and the pure, sharded, jitted
train and eval steps."""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Dict, Tuple

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from armd_jax import orders, registry
from armd_jax.train import partitioning
from armd_jax.train.settings import OptimConfig, OrderConfig

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]
_STEP_IDS = itertools.count()  # names each train step for its recompile guard


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as one pytree.

  Attributes:
    step: int32 scalar, the number of optimiser steps taken.
    params: model variables {'params': ...} (float32).
    opt_state: optax state.
    ema_params: bias-corrected EMA of `params` (same tree; `ema_update`), or None
      without EMA.
    rng: base PRNG key (uint32 [2]); step s uses `fold_in(rng, s)`.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


def learning_rate_schedule(optim: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay (to end_lr_factor * peak) or constant."""
  peak = optim.learning_rate
  warmup = optax.linear_schedule(0.0, peak, max(optim.warmup_steps, 1))
  if optim.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    after = optax.cosine_decay_schedule(peak, max(num_steps - optim.warmup_steps, 1),
                                        alpha=optim.end_lr_factor)
  return optax.join_schedules([warmup, after], [optim.warmup_steps])


def make_optimizer(optim: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) after global-norm clipping."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  adamw = optax.adamw(learning_rate_schedule(optim, num_steps), b1=optim.b1, b2=optim.b2,
                      eps=optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
  return adamw


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """The per-step decay that makes a running EMA the bias-corrected (debiased) average.

  With the plain EMA e_t = d e_{t-1} + (1 - d) p_t from e_0 = 0, the debiased average is
  m_t = e_t / (1 - d^t) = sum_{i<=t} d^(t-i) (1 - d) p_i / (1 - d^t). It obeys
  m_t = d_t m_{t-1} + (1 - d_t) p_t with 1 - d_t = (1 - d) / (1 - d^t), so d_1 = 0: the
  value held before step 1 (the initial parameters) gets no weight, and d_t -> d.

  Args:
    decay: the configured EMA decay d (`config.optim.ema_decay`), in (0, 1).
    step: int scalar t >= 1, the number of optimiser steps taken *including* this one.

  Returns:
    float32 scalar d_t.

  Raises:
    ValueError: `decay` is not in (0, 1).
  """
  if not 0.0 < decay < 1.0:
    raise ValueError(f"config.optim.ema_decay={decay} must be in (0, 1) to keep an EMA.")
  log_d = jnp.float32(math.log(decay))  # taken in float64: d = 0.9999 keeps its digits
  t = jnp.asarray(step, jnp.float32)
  # d_t = d (1 - d^(t-1)) / (1 - d^t); expm1 keeps 1 - d^k accurate for d near 1, and
  # d_1 is exactly 0.
  return jnp.float32(decay) * jnp.expm1((t - 1.0) * log_d) / jnp.expm1(t * log_d)


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
  """The bias-corrected EMA after optimiser step `step` (see `ema_decay_at`).

  Args:
    ema: the EMA tree after step `step - 1` (at step 1 any value: it gets no weight).
    params: the parameters after step `step` (same tree).
    decay: `config.optim.ema_decay`, in (0, 1).
    step: int scalar t >= 1 (a traced `state.step + 1` in the train step).

  Returns:
    the tree d_t * ema + (1 - d_t) * params, in the dtypes of `ema`.
  """
  d = ema_decay_at(decay, step)
  return jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), ema, params)


def init_variables(model: nn.Module, batch_size: int, seq_len: int, rng: jax.Array) -> Any:
  """Boxed (logically partitioned) model variables for a [batch, seq_len] input."""
  tokens = jnp.zeros((batch_size, seq_len), jnp.int32)
  return model.init(rng, tokens, orders.left_to_right(batch_size, seq_len))


def train_state_layout(model: nn.Module, optim: OptimConfig, num_steps: int, seq_len: int,
                       seed: int, mesh: Mesh, rules) -> Tuple[Callable[[], TrainState],
                                                              TrainState, TrainState]:
  """How a fresh train state is made and laid out on `mesh`, without making it.

  `jax.eval_shape` gives the logical partition specs of the parameters; they become
  mesh shardings (optimiser moments and EMA follow the parameters), and the returned
  `init()` is `jax.jit(init, out_shardings=...)`: every array is born in its shards.

  Returns:
    (init, abstract, shardings): `init()` -> a fresh TrainState; `abstract`, the state's
    ShapeDtypeStructs carrying their shardings (the restore target of a checkpoint);
    `shardings`, the TrainState of NamedShardings.
  """
  tx = make_optimizer(optim, num_steps)
  use_ema = optim.ema_decay > 0
  rng = jax.random.PRNGKey(seed)

  def init(rng):
    params = nn.meta.unbox(init_variables(model, 1, seq_len, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None,
                      rng=jax.random.fold_in(rng, 1))

  boxed = jax.eval_shape(lambda r: init_variables(model, 1, seq_len, r), rng)
  param_shardings = partitioning.shardings_of(boxed, mesh, rules)
  shapes = jax.eval_shape(init, rng)
  shardings = state_shardings(shapes, param_shardings, mesh)
  jitted = jax.jit(init, out_shardings=shardings)
  return (lambda: jitted(rng)), abstract_state(shapes, shardings), shardings


def create_train_state(model: nn.Module, optim: OptimConfig, num_steps: int, seq_len: int,
                       seed: int, mesh: Mesh, rules) -> Tuple[TrainState, TrainState]:
  """A fresh train state born sharded on `mesh`, and its tree of shardings."""
  init, _, shardings = train_state_layout(model, optim, num_steps, seq_len, seed, mesh, rules)
  return init(), shardings


def state_shardings(abstract: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
  """Shardings of a TrainState: optimiser moments and EMA shard like the parameters."""
  replicated = partitioning.replicated(mesh)
  params_def = jax.tree.structure(abstract.params)

  def opt_sharding(x):
    # optax states hold trees shaped like params (moments) and scalars (counts).
    if jax.tree.structure(x) == params_def:
      return param_shardings
    return jax.tree.map(lambda _: replicated, x)

  opt = jax.tree.map(opt_sharding, abstract.opt_state,
                     is_leaf=lambda x: jax.tree.structure(x) == params_def)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                    ema_params=None if abstract.ema_params is None else param_shardings,
                    rng=replicated)


def compute_loss(model: Any, params: Any, batch: Batch, rng: jax.Array, step: jax.Array,
                 order: OrderConfig,
                 deterministic: bool) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The training loss of one batch: the model kind's loss (`armd_jax.registry.KINDS`,
  defined in `armd_jax.objectives`).

  Args:
    model: the Flax module (`armd_jax.models.build_model`).
    params: its variables ({'params': ...}).
    batch: 'tokens' int32 [B, N] and 'mask' int32 [B, N] (1 = real token).
    rng: this step's key (already folded with the step); split into order and dropout.
    step: the training step (int32 scalar), which drives the order schedule.
    order: the typed order settings (`settings.order`, an `OrderConfig`).
    deterministic: False enables dropout.

  Returns:
    (loss, metrics) with the metrics of `losses.cross_entropy` plus order metrics.
  """
  if not isinstance(order, OrderConfig):
    raise TypeError(f"compute_loss takes the typed order settings (an OrderConfig, e.g. "
                    f"settings_from(config).order), got {type(order).__name__}.")
  return registry.kind_of(model).loss(model, params, batch, rng, step, order, deterministic)


def eval_metrics(model: Any, params: Any, batch: Batch,
                 rng: jax.Array) -> Dict[str, jax.Array]:
  """Validation sums of one held-out batch: 'nll_sum', 'correct_sum', 'num_tokens'
  (padding excluded) and 'num_scored' (the tokens 'correct_sum' counts over).

  'ar'/'armd': the exact left-to-right NLL (`rng` unused). 'mdlm': a bound, the mean
  negative ELBO of `objectives.MDLM_EVAL_DRAWS` draws from `rng` (give each batch its
  own key); 'correct_sum' and 'num_scored' count masked tokens only.
  """
  return registry.kind_of(model).validation(model, params, batch, rng)


def make_train_step(model: nn.Module, order: OrderConfig, optim: OptimConfig,
                    num_steps: int, shardings: TrainState, batch_shard: NamedSharding,
                    rules=None, max_traces: int = 1
                    ) -> Callable[[TrainState, Dict[str, jax.Array]],
                                  Tuple[TrainState, Metrics]]:
  """The jitted `train_step(state, batch) -> (state, metrics)`; the state is donated.

  Pure: the step's rng is `fold_in(state.rng, state.step)`, so a run restored from a
  checkpoint at step s replays exactly the same randomness from s on. `order` is the
  typed order settings (`settings.order`), fixed before tracing. Activations are
  constrained by the logical `rules` (default `partitioning.DEFAULT_RULES`) on the
  batch sharding's mesh. Recompile guard: the step may be traced at most `max_traces`
  times (`chex.assert_max_traces`); a batch of another shape or dtype, which would
  silently recompile, raises an AssertionError instead.
  """
  if not isinstance(order, OrderConfig):
    raise TypeError(f"make_train_step takes the typed order settings (an OrderConfig, e.g. "
                    f"settings_from(config).order), got {type(order).__name__}.")
  tx = make_optimizer(optim, num_steps)
  schedule = learning_rate_schedule(optim, num_steps)
  mesh = batch_shard.mesh
  rules = partitioning.DEFAULT_RULES if rules is None else rules
  replicated = partitioning.replicated(mesh)

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
      with partitioning.activation_sharding(mesh, rules):
        return compute_loss(model, params, batch, rng, state.step, order,
                            deterministic=False)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      ema = ema_update(ema, params, optim.ema_decay, state.step + 1)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), "learning_rate": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  batch_shardings = {"tokens": batch_shard, "mask": batch_shard}
  # chex counts traces per function footprint (its source and name, read when it wraps): a
  # unique name gives every step made here its own counter (a process may build several
  # steps in turn). The compiled program keeps the one name `train_step`: the persistent
  # compilation cache keys on it, so identical steps built in turn share one entry.
  train_step.__name__ = f"train_step_{next(_STEP_IDS)}"
  guarded = chex.assert_max_traces(train_step, n=max_traces)
  train_step.__name__ = guarded.__name__ = "train_step"
  return jax.jit(guarded, in_shardings=(shardings, batch_shardings),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_eval_step(model: nn.Module, param_shardings: Any, batch_shard: NamedSharding,
                   rules=None) -> Callable[[Any, Dict[str, jax.Array], jax.Array], Metrics]:
  """The jitted `eval_step(params, batch, rng) -> sums` (`eval_metrics`: exact
  left-to-right for 'ar'/'armd'; for 'mdlm' an ELBO whose draws come from `rng`)."""
  mesh = batch_shard.mesh
  rules = partitioning.DEFAULT_RULES if rules is None else rules
  replicated = partitioning.replicated(mesh)

  def eval_step(params, batch, rng):
    with partitioning.activation_sharding(mesh, rules):
      return eval_metrics(model, params, batch, rng)

  return jax.jit(eval_step,
                 in_shardings=(param_shardings, {"tokens": batch_shard, "mask": batch_shard},
                               replicated),
                 out_shardings=replicated)


def eval_params(state: TrainState, use_ema: bool) -> Any:
  """The parameters to evaluate: EMA when kept and asked for, else the raw ones."""
  return state.ema_params if use_ema and state.ema_params is not None else state.params


def abstract_state(state_shape: TrainState, shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state_shape, shardings)

