"""Orbax checkpoints holding the train state and the grain iterator together.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the `TrainState` pytree
(orbax `StandardSave`), `data` is the training iterator's state (grain's
`CheckpointSave`, one JSON file per process). The run's config is saved beside it as
`<workdir>/config.json`.

Resume order (`train_and_evaluate`): the latest checkpoint in the workdir (state and
data iterator), else `config.checkpoint.init_from` (parameters and EMA only; fresh
optimiser, step 0, fresh data order), else scratch. A checkpoint that fails to restore
(e.g. truncated array files) is reported by step, moved aside to
`<workdir>/checkpoints_damaged/<step>` and the next older one is tried
(`restore_newest_good`).

Every path goes through `armd_jax.storage.path`, so a workdir may be a local folder or
a URL such as `gs://bucket/run` (orbax and tensorstore take the URL as is).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from armd_jax import storage

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"


def checkpoint_dir(workdir: storage.PathLike) -> epath.Path:
  """<workdir>/checkpoints: absolute when local, the URL as given otherwise.

  Raises:
    ValueError: `workdir` is a URL whose scheme no installed client handles.
  """
  return storage.path(workdir) / CHECKPOINT_DIR


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
  directory = storage.path(workdir)
  if directory.name != CHECKPOINT_DIR:
    directory = directory / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"No checkpoint directory '{directory}': train a model there "
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
    raise FileNotFoundError(f"'{directory}' holds no finished checkpoint.")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)["state"], is_leaf=is_array)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
      target)))
  manager.close()
  return restored["state"], int(step)


def save_config(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> None:
  """Writes the (filled) experiment config to <workdir>/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  directory = storage.path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if storage.is_local(directory):  # atomic: a reader never sees half a file
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, directory / CONFIG_FILE)
  else:  # an object store writes an object whole
    (directory / CONFIG_FILE).write_text(text, encoding="utf-8")


def load_config(workdir: storage.PathLike) -> ml_collections.ConfigDict:
  """The experiment config saved in a workdir."""
  path = storage.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"'{path}' does not exist: {workdir!r} is not a training workdir.")
  values = json.loads(path.read_text(encoding="utf-8"))
  return ml_collections.ConfigDict(_tuples(values))


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (configs use tuples for shapes, rules and sets)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def restore_newest_good(manager: ocp.CheckpointManager, workdir: str,
                        restore_step: Callable[[int], Any],
                        log: Callable[[str], None] = print) -> Optional[Any]:
  """`restore_step(step)` of the newest checkpoint that restores, or None if none does.

  A checkpoint whose restore raises is reported by step (with the error), moved to
  `<workdir>/checkpoints_damaged/<step>` (process 0; the others wait for it), and the
  next older one is tried.
  """
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_step(step)
    except Exception as e:  # pylint: disable=broad-except  (orbax/TensorStore errors vary)
      first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
      target = storage.path(workdir) / DAMAGED_DIR / str(step)
      log(f"checkpoint at step {step} is damaged ({type(e).__name__}: {first_line}); "
          f"moved aside to {target}, trying the previous one")
      if jax.process_index() == 0:
        if target.exists():
          target = target.parent / f"{step}.{int(time.time())}"
        _move_dir(checkpoint_dir(workdir) / str(step), target)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"armd_damaged_checkpoint_{step}")
      manager.reload()
  return None


def _move_dir(source: epath.Path, target: epath.Path) -> None:
  """Moves the folder `source` to `target` (a rename on local disk, copy + delete on an
  object store, whose 'folders' are name prefixes that need not exist beforehand)."""
  if storage.is_local(source):
    os.makedirs(target.parent, exist_ok=True)
    shutil.move(os.fspath(source), os.fspath(target))
    return
  import fsspec  # pylint: disable=g-import-not-at-top

  fs, _ = fsspec.core.url_to_fs(os.fspath(source))
  fs.mv(os.fspath(source), os.fspath(target), recursive=True)
