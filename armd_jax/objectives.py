"""The per-kind objectives: training losses, validation sums and per-sequence NLLs.

`armd_jax.registry.KINDS` names one function of each sort per model kind; the train
step, the trainer's validation and `armd_jax.eval` reach them through that table.

- 'armd' (`ordered_loss`): draws the block ids of the typed order settings for this
  step (inside jit, from the step's rng; `armd_jax.orders.draw_block_ids`), moves
  padding into a last block (`orders.padding_last`), runs the network once, and returns
  the per-token cross-entropy given earlier blocks (`armd_jax.losses.cross_entropy`).
  With singleton orders this is the exact NLL of the drawn order; with masked-diffusion
  blocks it estimates an upper bound (docs/method.md, section 3).
- 'ar' (`ar_loss`): the same loss under the left-to-right order only (exact NLL).
- 'mdlm' (`mdlm_loss`): the one-sample continuous-time negative ELBO (an upper bound).

Validation ('nll_sum', 'correct_sum', 'num_tokens', 'num_scored') is the exact
left-to-right NLL for 'ar' and 'armd' (`ordered_validation`) and the mean negative ELBO
of `MDLM_EVAL_DRAWS` draws for 'mdlm' (`mdlm_validation`).
"""

from __future__ import annotations

from typing import Dict, Optional

import jax
import jax.numpy as jnp

from armd_jax import losses, orders
from armd_jax.models import mdlm as mdlm_lib

Batch = Dict[str, jax.Array]
MDLM_EVAL_DRAWS = 4  # Monte Carlo draws of the MDLM validation ELBO per batch


def ordered_loss(model, params, batch: Batch, rng, step, order, deterministic: bool,
                 fixed_order: Optional[str] = None):
  """Cross-entropy given earlier blocks, ids drawn from `order` (or `fixed_order`)."""
  tokens, mask = batch["tokens"], batch["mask"]  # [B, N], [B, N]
  order_rng, dropout_rng = jax.random.split(rng)
  if fixed_order is not None:
    block_ids, order_metrics = orders.ORDERS[fixed_order].draw(order, order_rng, step,
                                                               *tokens.shape)
  else:
    block_ids, order_metrics = orders.draw_block_ids(order, order_rng, step, *tokens.shape)
  block_ids = orders.padding_last(block_ids, mask)  # no real token conditions on padding
  logits = model.apply(params, tokens, block_ids, deterministic=deterministic,
                       rngs=None if deterministic else {"dropout": dropout_rng})
  loss, metrics = losses.cross_entropy(logits, tokens, block_ids, mask=mask)
  return loss, {**metrics, **order_metrics}


def ar_loss(model, params, batch, rng, step, order, deterministic):
  """The GPT baseline only has the left-to-right order (`config.order` unused)."""
  return ordered_loss(model, params, batch, rng, step, order, deterministic,
                      fixed_order="left_to_right")


def mdlm_loss(model, params, batch, rng, step, order, deterministic):
  """One-sample negative ELBO (`config.order` unused: masks from the linear schedule)."""
  del step, order
  order_rng, dropout_rng = jax.random.split(rng)
  return mdlm_lib.diffusion_loss(model, params, batch["tokens"], order_rng, batch["mask"],
                                 deterministic, dropout_rng)


def ordered_validation(model, params, batch: Batch, rng) -> Dict[str, jax.Array]:
  """Exact left-to-right sums of one batch: nll_sum, correct_sum, num_tokens, num_scored."""
  del rng
  tokens, mask = batch["tokens"], batch["mask"]
  block_ids = orders.padding_last(orders.left_to_right(*tokens.shape), mask)
  logits = model.apply(params, tokens, block_ids, deterministic=True)
  _, m = losses.cross_entropy(logits, tokens, block_ids, mask=mask)
  return {"nll_sum": m["nll_sum"], "correct_sum": m["correct_sum"],
          "num_tokens": m["num_tokens"], "num_scored": m["num_tokens"]}


def mdlm_validation(model, params, batch: Batch, rng) -> Dict[str, jax.Array]:
  """Negative-ELBO sums: the mean of `MDLM_EVAL_DRAWS` draws of (t, masks) from `rng`
  (the 1/t weight is heavy-tailed); accuracy counts masked tokens only, so
  'num_scored' is the number of masked tokens."""
  keys = jax.random.split(rng, MDLM_EVAL_DRAWS)
  sums = {"nll_sum": 0.0, "correct_sum": 0.0, "num_tokens": 0.0, "num_scored": 0.0}
  for key in keys:
    _, m = mdlm_lib.diffusion_loss(model, params, batch["tokens"], key, batch["mask"])
    for k, v in (("nll_sum", m["nll_sum"]), ("correct_sum", m["correct_sum"]),
                 ("num_tokens", m["num_tokens"]), ("num_scored", m["num_masked"])):
      sums[k] = sums[k] + v / MDLM_EVAL_DRAWS
  return sums


def ordered_sequence_nll(model, params, tokens, mask, key, order) -> jax.Array:
  """Per-sequence NLL sums [B] under an evaluation order (one draw)."""
  block_ids, _ = orders.draw_block_ids(order, key, jnp.zeros((), jnp.int32), *tokens.shape)
  logits = model.apply(params, tokens, orders.padding_last(block_ids, mask))
  return -(losses.token_log_probs(logits, tokens) * mask).sum(-1)


def mdlm_sequence_nll(model, params, tokens, mask, key, order) -> jax.Array:
  """Per-sequence negative-ELBO estimates [B] (one draw of t and masks)."""
  del order
  t = mdlm_lib.stratified_times(jax.random.fold_in(key, 0), tokens.shape[0])
  noisy, is_masked = mdlm_lib.corrupt(jax.random.fold_in(key, 1), tokens, t, model.config,
                                      mask)
  return mdlm_lib.elbo_terms(model.apply(params, noisy), tokens, is_masked, t)
