"""The training objective: the one loss the train step computes.

`compute_loss` draws the block ids of `config.order` for this step (inside jit, from
the step's rng), moves padding into a last block (`orders.padding_last`), runs the
network once, and returns the per-token cross-entropy given earlier blocks
(`armd_jax.losses.cross_entropy`). With singleton orders this is the exact NLL of the
drawn order; with masked-diffusion blocks it estimates an upper bound (spec section 3).

Baselines (dispatch on `config.model.kind`, `config.order` unused): 'ar' is the same
cross-entropy with left-to-right ids (exact NLL); 'mdlm' is the one-sample continuous-time
negative ELBO of `armd_jax.models.mdlm.diffusion_loss` (an upper bound on the NLL).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from armd_jax import losses, orders
from armd_jax.models import mdlm
from armd_jax.train.typed import OrderConfig, order_config_from

Batch = Dict[str, jax.Array]
_MDLM_EVAL_DRAWS = 4  # Monte Carlo draws of the MDLM validation ELBO per batch


def draw_block_ids(order: OrderConfig, rng: jax.Array, step: jax.Array, batch: int,
                   length: int) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Block ids [B, N] int32 of `order` at training step `step`, plus what was drawn.

  Returns the ids and a dict of scalar order metrics ('order/num_shuffled' or
  'order/streams').
  """
  if order.kind == "left_to_right":
    return orders.left_to_right(batch, length), {}
  if order.kind == "progressive_permutation":
    k = orders.num_shuffled_schedule(step, order.i_ar, order.i_perm, order.rho)
    ids = orders.progressive_permutation(rng, batch, length, k)
    return ids, {"order/num_shuffled": k}
  if order.kind == "strided":
    candidates = jnp.stack([orders.strided(batch, length, s) for s in order.streams])
    choice = jax.random.randint(rng, (), 0, len(order.streams))  # S uniform over the set
    streams = jnp.asarray(order.streams, jnp.int32)[choice]
    return candidates[choice], {"order/streams": streams}
  if order.kind == "masked_diffusion":
    return orders.masked_diffusion(rng, batch, length, order.num_steps, order.schedule), {}
  raise ValueError(f"config.order.kind={order.kind!r} is not supported.")


def compute_loss(model: Any, params: Any, batch: Batch, rng: jax.Array, step: jax.Array,
                 config: ml_collections.ConfigDict,
                 deterministic: bool) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The training loss of one batch.

  Args:
    model: the Flax module (`armd_jax.models.build_model`).
    params: its variables ({'params': ...}).
    batch: 'tokens' int32 [B, N] and 'mask' int32 [B, N] (1 = real token).
    rng: this step's key (already folded with the step); split into order and dropout.
    step: the training step (int32 scalar), which drives the order schedule.
    config: the experiment ConfigDict (reads `config.order`).
    deterministic: False enables dropout.

  Returns:
    (loss, metrics) with the metrics of `losses.cross_entropy` plus order metrics.
  """
  tokens, mask = batch["tokens"], batch["mask"]  # [B, N], [B, N]
  order_rng, dropout_rng = jax.random.split(rng)
  if model.config.kind == "mdlm":  # baseline: masks drawn from the linear schedule
    return mdlm.diffusion_loss(model, params, tokens, order_rng, mask, deterministic,
                               dropout_rng)
  if model.config.kind == "ar":  # baseline: a GPT only has the left-to-right order
    block_ids, order_metrics = orders.left_to_right(*tokens.shape), {}
  else:
    block_ids, order_metrics = draw_block_ids(order_config_from(config), order_rng, step,
                                              *tokens.shape)
  block_ids = orders.padding_last(block_ids, mask)  # no real token conditions on padding
  logits = model.apply(params, tokens, block_ids, deterministic=deterministic,
                       rngs=None if deterministic else {"dropout": dropout_rng})
  loss, metrics = losses.cross_entropy(logits, tokens, block_ids, mask=mask)
  return loss, {**metrics, **order_metrics}


def eval_metrics(model: Any, params: Any, batch: Batch) -> Dict[str, jax.Array]:
  """Exact left-to-right NLL sums of one held-out batch: 'nll_sum', 'correct_sum',
  'num_tokens' (padding excluded). For 'mdlm' the NLL is a bound: the negative ELBO with
  the mean of `_MDLM_EVAL_DRAWS` fixed-seed draws of (t, masks) per batch; 'correct_sum'
  counts masked tokens only."""
  tokens, mask = batch["tokens"], batch["mask"]
  if model.config.kind == "mdlm":  # mean of 4 fixed draws: the 1/t weight is heavy-tailed
    draws = [mdlm.diffusion_loss(model, params, tokens, jax.random.PRNGKey(i), mask)[1]
             for i in range(_MDLM_EVAL_DRAWS)]
    return {k: sum(d[k] for d in draws) / _MDLM_EVAL_DRAWS
            for k in ("nll_sum", "correct_sum", "num_tokens")}
  block_ids = orders.padding_last(orders.left_to_right(*tokens.shape), mask)
  logits = model.apply(params, tokens, block_ids, deterministic=True)
  _, metrics = losses.cross_entropy(logits, tokens, block_ids, mask=mask)
  return {k: metrics[k] for k in ("nll_sum", "correct_sum", "num_tokens")}


def eval_description(kind: str) -> str:
  """What `eval_metrics` measures for a model kind, for progress lines and logs."""
  return "ELBO, an upper bound" if kind == "mdlm" else "left-to-right, exact"
