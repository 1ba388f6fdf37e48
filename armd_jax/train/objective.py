"""The training objective and the trainer's validation sums, through the kind registry.

`compute_loss` asks `armd_jax.registry` for the model kind's loss: for 'armd' it draws
the block ids of the typed order settings for this step (inside jit, from the step's
rng), moves padding into a last block (`orders.padding_last`), runs the network once,
and returns the per-token cross-entropy given earlier blocks
(`armd_jax.losses.cross_entropy`). With singleton orders this is the exact NLL of the
drawn order; with masked-diffusion blocks it estimates an upper bound (spec section 3).
Baselines ignore the order: 'ar' uses left-to-right ids (exact NLL); 'mdlm' is the
one-sample continuous-time negative ELBO (an upper bound on the NLL).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax

from armd_jax import registry
from armd_jax.registry import draw_block_ids  # re-exported: the order registry's draw
from armd_jax.train.typed import OrderConfig

Batch = Dict[str, jax.Array]


def compute_loss(model: Any, params: Any, batch: Batch, rng: jax.Array, step: jax.Array,
                 order: OrderConfig,
                 deterministic: bool) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The training loss of one batch.

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
  negative ELBO of `registry.MDLM_EVAL_DRAWS` draws from `rng` (give each batch its own
  key); 'correct_sum' and 'num_scored' count masked tokens only.
  """
  return registry.kind_of(model).validation(model, params, batch, rng)


def eval_description(kind: str) -> str:
  """What `eval_metrics` measures for a model kind, for progress lines and logs."""
  return registry.get_kind(kind).validation_label


__all__ = ["compute_loss", "draw_block_ids", "eval_description", "eval_metrics"]
