"""Orbax checkpoints holding the train state and the grain iterator together.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the `TrainState` pytree
(orbax `StandardSave`), `data` is the training iterator's state (grain's
`CheckpointSave`, one JSON file per process). The run's config is saved beside it as
`<workdir>/config.json`.

Resume order (`train_and_evaluate`): the latest checkpoint in the workdir (state and
data iterator), else `config.checkpoint.init_from` (parameters and EMA only; fresh
optimiser, step 0, fresh data order), else scratch. `restore_newest_good` takes one
decision on process 0 that every process obeys: a checkpoint of another model (vs
config.json) stops with a ValueError and moves nothing; one saved by another process
count restores the state and restarts the data iterator at its step; only read damage
(`read_damage`) moves a step to `<workdir>/checkpoints_damaged/<step>`, and the same
damage in the next older step stops (`ResumeError`); any other restore error propagates.

Also importable from here: the run's config.json (`armd_jax.train.run_config`) and the
damage checks (`armd_jax.train.damage`).

Every path goes through `armd_jax.storage.path`, so a workdir may be a local folder or
a URL such as `gs://bucket/run` (orbax and tensorstore take the URL as is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from armd_jax import storage
from armd_jax.train import agree
from armd_jax.train.damage import CheckpointDamage, data_state_files, read_damage
from armd_jax.train.run_config import (CONFIG_FILE, EXECUTION_FIELDS, config_differences,
                                       identity_fields, load_config, save_config)

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "CheckpointDamage", "DAMAGED_DIR",
           "EXECUTION_FIELDS", "ResumeError", "Restored", "checkpoint_dir",
           "config_differences", "config_mismatch", "data_state_files", "identity_fields",
           "load_config", "make_manager", "read_damage", "restore", "restore_newest_good",
           "restore_state_arrays", "save", "save_config"]


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


def restore(workdir: storage.PathLike, step: int, target: Any,
            train_iter: Any = None) -> Any:
  """Restores the state of `step` into `target`'s shapes and shardings; with `train_iter`,
  also sets the iterator's position in place (state first, so a failed state restore
  never moves the iterator).

  Runs the orbax and grain handlers directly, without `CheckpointManager.restore`'s
  closing barrier: a process whose restore raises must not leave the others waiting at
  a barrier it never reaches (`restore_newest_good` makes them agree instead).

  Raises:
    Whatever orbax, tensorstore or grain raise (see `read_damage` for telling damage
    from other failures).
  """
  import grain  # pylint: disable=g-import-not-at-top

  step_dir = checkpoint_dir(workdir) / str(step)
  handler = ocp.StandardCheckpointHandler()
  try:
    state = handler.restore(step_dir / "state", args=ocp.args.StandardRestore(target))
  finally:
    handler.close()
  if train_iter is not None:
    grain.checkpoint.CheckpointHandler().restore(
        step_dir / "data", args=grain.checkpoint.CheckpointRestore(train_iter))
  return state


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
  # every access); only 'state' is restored. Nothing is written: create=False, and this
  # manager never saves or deletes (read_only=True would log three warnings per restore).
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
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


def config_mismatch(workdir: storage.PathLike, config: ml_collections.ConfigDict
                    ) -> Optional[str]:
  """The error message when <workdir>/config.json describes another model than `config`
  (see `identity_fields`), else None (also when there is no config.json).

  Compare like with like: `config.model.vocab_size` must already be filled from the
  data, as it was when config.json was written.
  """
  path = storage.path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  saved = json.loads(path.read_text(encoding="utf-8"))
  now = json.loads(config.to_json_best_effort())
  differences = config_differences(saved, now)
  if not differences:
    return None
  listed = "; ".join(f"config.{k}: saved {a!r}, now {b!r}" for k, a, b in differences)
  return (f"the checkpoints in {checkpoint_dir(workdir)} were written for another model "
          f"({listed}). Nothing was moved or overwritten. Resume with the saved values, start "
          "a fresh run in another --workdir, or start one there with "
          f"--config.checkpoint.init_from={storage.path(workdir)} (parameters only) if the "
          "shapes still fit.")


class ResumeError(RuntimeError):
  """The resume stopped: the same damage in two checkpoints in a row, or a restore that
  failed on another process (the message says which; nothing more was moved)."""


def _all_failed(failed: bool) -> list[int]:
  """The processes whose `failed` is True (an all-gather every process takes part in)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  flags = np.asarray(multihost_utils.process_allgather(np.array([int(failed)], np.int32)))
  return [int(i) for i in np.flatnonzero(flags.reshape(-1))]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `restore_newest_good` restored: the state, its step, and whether the data
  iterator's saved position was restored (False: it was set to batch `step` instead)."""

  state: Any
  step: int
  data_restored: bool


def restore_newest_good(manager: ocp.CheckpointManager, workdir: storage.PathLike,
                        config: ml_collections.ConfigDict, target: Any, train_iter: Any,
                        log: Callable[[str], None] = print) -> Optional[Restored]:
  """Restores the newest good checkpoint of `workdir` into `target` and `train_iter`;
  None when there is none (or every one was damaged and moved aside).

  One decision for all processes: process 0 inspects the files and broadcasts what to
  do, every process acts on it, and a stop raises the same error on every process.
  1. config.json vs `config` (`config_mismatch`): a different model or vocabulary is a
     ValueError; nothing is moved, config.json is kept.
  2. Newest step first: its data-iterator files (`data_state_files`). Saved by another
     process count: the state is restored and the iterator is set to global batch
     `step` (the global stream does not depend on the process count; with
     `config.data.seqio_shard_by_process` it does, and the warning says so).
  3. Every process restores; an all-gather of per-process failures follows. When any
     failed, process 0 checks the files (`read_damage`): damage moves the step to
     `<workdir>/checkpoints_damaged/<step>` (process 0, the others wait) and the next
     older step is tried, unless it is damaged for the same reason as the step before
     it (then `ResumeError`, nothing more moved). A failure that is not damage (out of
     memory, a wrong target) propagates on the processes where it happened (the others
     raise `ResumeError`) and moves nothing.

  Raises:
    ValueError: the checkpoints were written for another model (names the fields).
    ResumeError: see 3.
  """
  process_count = jax.process_count()
  def survey():
    saved = sorted(manager.all_steps(), reverse=True)
    return {"steps": saved, "mismatch": config_mismatch(workdir, config) if saved else None}

  steps = agree.agree(survey, "reading the checkpoints", failure=ResumeError)
  if steps["mismatch"]:
    raise ValueError(steps["mismatch"])
  start = train_iter.get_state()
  previous = None  # (step, reason) of the last step moved aside
  for step in steps["steps"]:
    step_dir = checkpoint_dir(workdir) / str(step)

    def plan(step_dir=step_dir):
      try:
        with_data, note = data_state_files(step_dir, process_count)
      except CheckpointDamage as e:
        return {"damage": [e.reason, e.detail]}
      return {"damage": None, "with_data": with_data, "note": note}

    decision = agree.agree(plan, f"inspecting the checkpoint at step {step}",
                           failure=ResumeError)
    damage = decision["damage"]
    if damage is None:
      error = None
      try:
        state = restore(workdir, step, target, train_iter if decision["with_data"] else None)
      except Exception as e:  # pylint: disable=broad-except  (classified below)
        error = e
      failed = _all_failed(error is not None)
      if not failed:
        if not decision["with_data"]:
          _restart_iterator(train_iter, step)
          log(f"warning: checkpoint at step {step}: {decision['note']}; the state is "
              f"restored and the data iterator restarts at global batch {step} (the same "
              "batches as before unless config.data.seqio_shard_by_process)")
        return Restored(state, int(step), bool(decision["with_data"]))
      train_iter.set_state(start)

      def verdict(step_dir=step_dir):
        found = read_damage(step_dir)
        return {"damage": None if found is None else [found.reason, found.detail]}

      damage = agree.agree(verdict, f"checking the checkpoint at step {step} for damage",
                           failure=ResumeError)["damage"]
      if damage is None:
        if error is not None:
          raise error
        raise ResumeError(f"restoring the checkpoint at step {step} failed on process(es) "
                          f"{failed} (its files read back whole, so it is not damage); nothing "
                          "was moved: see the log of those processes.")
    reason, detail = damage
    if previous is not None and reason == previous[1]:
      raise ResumeError(
          f"checkpoint at step {step} is damaged the same way as step {previous[0]} "
          f"({reason}: {detail}); stopping and moving nothing more (step {previous[0]} is in "
          f"{storage.path(workdir) / DAMAGED_DIR}). Check the storage, then resume or start "
          "a fresh run in another --workdir.")
    target_dir = storage.path(workdir) / DAMAGED_DIR / str(step)
    if target_dir.exists():
      target_dir = target_dir.parent / f"{step}.{int(time.time())}"
    log(f"checkpoint at step {step} is damaged ({reason}: {detail}); moved aside to "
        f"{target_dir}, trying the previous one")
    if jax.process_index() == 0:
      _move_dir(step_dir, target_dir)
    _sync(f"armd_damaged_checkpoint_{step}")
    manager.reload()
    previous = (step, reason)
  return None


def _restart_iterator(train_iter: Any, batch: int) -> None:
  """Sets a fresh grain iterator of the global stream to yield global batch `batch` next."""
  state = train_iter.get_state()
  if not isinstance(state, dict) or "next_index" not in state:
    raise ValueError(f"cannot position the data iterator: unexpected state {state!r}")
  train_iter.set_state({**state, "next_index": int(batch)})


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
