"""Orbax checkpoints holding the train state and the grain iterator together.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the `TrainState` pytree
(orbax `StandardSave`), `data` is the training iterator's state (grain's
`CheckpointSave`, one JSON file per process). The run's config is saved beside it as
`<workdir>/config.json`.

Resume order (`train_and_evaluate`): the latest checkpoint in the workdir (state and
data iterator), else `config.checkpoint.init_from` (parameters and EMA only; fresh
optimiser, step 0, fresh data order), else scratch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(workdir: str) -> str:
  """<workdir>/checkpoints (absolute; orbax wants absolute paths)."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, max_to_keep: int, async_save: bool,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over <workdir>/checkpoints with items 'state' and 'data'."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         enable_async_checkpointing=async_save,
                                         read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, train_iter: Any) -> None:
  """Saves the state and the data iterator under `step` (async when the manager is)."""
  import grain  # pylint: disable=g-import-not-at-top

  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(train_iter)))


def restore(manager: ocp.CheckpointManager, step: int, target: Any, train_iter: Any) -> Any:
  """Restores the state (into `target`'s shapes and shardings) and the iterator in place."""
  import grain  # pylint: disable=g-import-not-at-top

  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target),
      data=grain.checkpoint.CheckpointRestore(train_iter)))
  return restored["state"]


def restore_state_arrays(workdir: str, step: Optional[int] = None) -> tuple[Any, int]:
  """The saved state tree of a workdir on this process's first device, and its step.

  The restore target is built from the checkpoint's own metadata, so a checkpoint
  written on any mesh (e.g. 8 devices) loads on one device. Raises FileNotFoundError
  naming the directory when it holds no checkpoint.
  """
  directory = workdir
  if os.path.basename(os.path.normpath(workdir)) != CHECKPOINT_DIR:
    directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory {directory!r}: train a model there "
                            "first (python -m armd_jax.main --workdir=...).")
  import grain  # pylint: disable=g-import-not-at-top

  # Both saved items are registered (an unregistered 'data' item makes orbax warn at
  # every access); only 'state' is restored.
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory!r} holds no finished checkpoint.")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)["state"], is_leaf=is_array)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
      target)))
  manager.close()
  return restored["state"], int(step)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the (filled) experiment config to <workdir>/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The experiment config saved in a workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path!r} does not exist: {workdir!r} is not a training workdir.")
  with open(path, encoding="utf-8") as f:
    values = json.load(f)
  return ml_collections.ConfigDict(_tuples(values))


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (configs use tuples for shapes, rules and sets)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def tree_to_numpy(tree: Any) -> Any:
  """Host copies of every array leaf."""
  return jax.tree.map(np.asarray, tree)
