"""Training: typed settings, the pure sharded train step, checkpoints, the training loop.

Public API:
  `train_and_evaluate(config, workdir)`: the one call `python -m armd_jax.main` makes.
  `load_trained(workdir, use_ema=True) -> Trained`: a trained model back from a workdir.
  `model_config_from(config) -> ModelConfig`: the typed model config of `config.model`.
  `compute_loss` (in `state`): the loss of one batch under the typed order settings.
  `TrainState`, `train_state_layout`, `create_train_state`, `make_train_step`: the step.

The names are imported on first use (PEP 562), so `armd_jax.train.defaults` and
`armd_jax.train.settings`, which config files import, stay light (no orbax, grain, optax).
"""

from armd_jax._lazy import lazy_exports

_EXPORTS = {
    "Trained": "loading", "load_trained": "loading",
    "train_and_evaluate": "loop",
    "WorkdirBusyError": "lock", "ResumeError": "checkpoints",
    "NonFiniteError": "observe", "read_metrics": "observe", "Preempted": "preemption",
    "TrainState": "state", "compute_loss": "state", "create_train_state": "state",
    "make_eval_step": "state", "make_optimizer": "state", "make_train_step": "state",
    "train_state_layout": "state",
    "model_config_from": "settings", "order_config_from": "settings",
    "settings_from": "settings",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = sorted(_EXPORTS)
