"""Training: typed configs, the pure sharded train step, checkpoints, the training loop.

Public API:
  `train_and_evaluate(config, workdir)`: the one call `python -m armd_jax.main` makes.
  `load_trained(workdir, use_ema=True) -> Trained`: a trained model back from a workdir.
  `model_config_from(config) -> ModelConfig`: the typed model config of `config.model`.
  `compute_loss` (in `objective`): the loss of one batch under `config.order`.
  `TrainState`, `train_state_layout`, `create_train_state`, `make_train_step`: the step.
"""

from armd_jax.train.loading import Trained, load_trained
from armd_jax.train.loop import train_and_evaluate
from armd_jax.train.objective import compute_loss, draw_block_ids
from armd_jax.train.observe import NonFiniteError, read_metrics
from armd_jax.train.state import (TrainState, create_train_state, make_eval_step,
                                  make_optimizer, make_train_step, train_state_layout)
from armd_jax.train.typed import model_config_from, order_config_from, settings_from

__all__ = [
    "NonFiniteError", "Trained", "TrainState", "compute_loss", "create_train_state",
    "draw_block_ids", "load_trained", "make_eval_step", "make_optimizer", "make_train_step",
    "model_config_from", "order_config_from", "read_metrics", "settings_from",
    "train_and_evaluate", "train_state_layout",
]
