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

One trainer per workdir: `WorkdirLock` holds `<workdir>/train.lock` (pid, host, start
time) for the run; a second trainer stops with `WorkdirBusyError` naming the holder. A
lock left by a dead process on this host is taken over (stale); a lock from another
host cannot be checked and must be removed by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
LOCK_FILE = "train.lock"


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
      target = os.path.join(os.path.abspath(workdir), DAMAGED_DIR, str(step))
      log(f"checkpoint at step {step} is damaged ({type(e).__name__}: {first_line}); "
          f"moved aside to {target}, trying the previous one")
      if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.exists(target):
          target = f"{target}.{int(time.time())}"
        shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), target)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        multihost_utils.sync_global_devices(f"armd_damaged_checkpoint_{step}")
      manager.reload()
  return None


class WorkdirBusyError(RuntimeError):
  """Another live trainer holds the workdir's lock."""


class WorkdirLock:
  """`<workdir>/train.lock` held for one training run (process 0 only; a context manager).

  The file holds {'pid', 'host', 'started'}. Taking a lock that exists raises
  `WorkdirBusyError` naming its holder, unless the holder is a dead process on this
  host (a stale lock, which is taken over with a note).
  """

  def __init__(self, workdir: str, log: Callable[[str], None] = print):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.log = log
    self.held = False

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read_lock(self.path)
        if not _is_stale(holder):
          raise WorkdirBusyError(
              f"{os.path.dirname(self.path)} is in use by another trainer (pid "
              f"{holder.get('pid')} on host {holder.get('host')!r}, lock {self.path}). "
              "Wait for it, use another --workdir, or delete the lock file if that trainer "
              "is gone.") from None
        self.log(f"removing a stale lock {self.path} (pid {holder.get('pid')} on this host "
                 "is not running)")
        os.remove(self.path)
        continue
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(mine, f)
      self.held = True
      return self
    raise WorkdirBusyError(f"could not take the lock {self.path}.")

  def __exit__(self, *exc) -> None:
    if self.held and _read_lock(self.path).get("pid") == os.getpid():
      os.remove(self.path)
    self.held = False


def _read_lock(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _is_stale(holder: dict) -> bool:
  """True when the lock's process is known to be gone (same host, pid not running)."""
  if not holder:
    return True  # unreadable / half-written lock
  if holder.get("host") != socket.gethostname():
    return False  # cannot check another host's processes
  try:
    os.kill(int(holder["pid"]), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, KeyError, ValueError, TypeError):
    return False
  return False
