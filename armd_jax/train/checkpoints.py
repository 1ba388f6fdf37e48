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

Every path goes through `armd_jax.storage.path`, so a workdir may be a local folder or
a URL such as `gs://bucket/run` (orbax and tensorstore take the URL as is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
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


def save_config(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> None:
  """Writes the (filled) experiment config to <workdir>/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  # Atomic: a reader never sees half a file (a renamed temporary file, or one object).
  storage.write_atomic(storage.path(workdir) / CONFIG_FILE,
                       config.to_json_best_effort(indent=2, sort_keys=True))


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


# config.model fields that say how the network computes, not what it is: a run may
# resume with other values. Every other model field (shapes, vocab_size, kind) must match.
EXECUTION_FIELDS = ("dropout_rate", "dtype", "attention", "pallas_block_q", "pallas_block_kv",
                    "pallas_interpret", "remat", "prefix_aggregation", "prefix_chunk")


def identity_fields(config: dict) -> dict:
  """{'model.d_model': 32, ..., 'data.vocab': ...}: what a checkpoint must agree with.

  Every `config.model` field but `EXECUTION_FIELDS`, and the tokenizer (`data.vocab`
  and the fields of that tokenizer: `sentencepiece_*` or `hf_tokenizer`). `config` is
  the plain dict of an experiment config (as in config.json).
  """
  fields = {f"model.{k}": v for k, v in (config.get("model") or {}).items()
            if k not in EXECUTION_FIELDS}
  data = config.get("data") or {}
  if "vocab" in data:
    fields["data.vocab"] = data["vocab"]
  if data.get("vocab") == "sentencepiece":
    for k in ("sentencepiece_model", "sentencepiece_vocab_size", "sentencepiece_model_type"):
      fields[f"data.{k}"] = data.get(k)
  if data.get("vocab") == "hf" or (data.get("vocab") is None and data.get("hf_tokenizer")):
    fields["data.hf_tokenizer"] = data.get("hf_tokenizer")
  return fields


def config_differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, value now)] of the `identity_fields` that differ.

  A field the saved config does not have (written by an older version) is not compared.
  """
  old, new = identity_fields(saved), identity_fields(now)
  return [(k, old[k], new.get(k)) for k in sorted(old) if k in new and old[k] != new[k]]


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


_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")


def data_state_files(step_dir: epath.Path, process_count: int) -> tuple[bool, str]:
  """(True, '') when `step_dir/data` holds a readable iterator state for each of
  `process_count` processes; (False, note) when it holds complete states written by
  another process count only (the data iterator must be restarted).

  Raises:
    CheckpointDamage: a state file of this process count is missing while others of it
      exist, none is there at all, or one is not JSON.
  """
  data_dir = step_dir / "data"
  names = [p.name for p in data_dir.iterdir()] if data_dir.is_dir() else []
  counts: dict[int, set] = {}
  for name in names:
    match = _DATA_FILE.match(name)
    if match:
      counts.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
  mine = counts.get(process_count, set())
  if mine == set(range(process_count)):
    for i in sorted(mine):
      name = f"process_{i}-of-{process_count}.json"
      try:
        json.loads((data_dir / name).read_text())
      except (OSError, ValueError) as e:
        raise CheckpointDamage("unreadable data-iterator state", f"{data_dir / name}: {e}")
    return True, ""
  complete = sorted(n for n, ids in counts.items() if ids == set(range(n)))
  if not mine and complete:
    return False, (f"its data-iterator state was saved by {complete[-1]} process(es), this "
                   f"run has {process_count}")
  raise CheckpointDamage("missing data-iterator state",
                         f"{data_dir} holds {sorted(names)}, needs process_i-of-"
                         f"{process_count}.json for i < {process_count}")


class CheckpointDamage(Exception):
  """What `read_damage` found: `reason` (a short category, the same for the same kind of
  damage in any step) and `detail` (the file and the error)."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


_ZARR_METADATA = (".zarray", ".zattrs", ".zgroup", "zarr.json")


def read_damage(step_dir: epath.Path) -> Optional[CheckpointDamage]:
  """The read damage of a saved state, or None when every file of it reads back whole.

  How damage is told from other failures: by reading the files, not by the exception a
  restore raised (orbax and tensorstore raise ValueError, JSONDecodeError or a bare
  Exception for damage, and the same types for a wrong target or out of memory). It is
  damage when `state/_METADATA` is missing or not JSON ('unreadable metadata'), the
  OCDBT index `state/manifest.ocdbt` is missing or its b-tree fails to list ('unreadable
  array index (CODE)'), a value of the index fails to read ('unreadable array data
  (CODE)'; CODE is the tensorstore status, e.g. OUT_OF_RANGE for a truncated file),
  reads back empty (a missing array file: 'missing array data'), or an array's zarr
  metadata is not JSON.
  This reads the whole saved state once (on one process, only after a failed restore).
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  state_dir = step_dir / "state"
  try:
    json.loads((state_dir / "_METADATA").read_text())
  except (OSError, ValueError) as e:
    return CheckpointDamage("unreadable metadata", f"{state_dir / '_METADATA'}: {e}")
  if not (state_dir / "manifest.ocdbt").exists():
    return CheckpointDamage("unreadable array index",
                            f"{state_dir / 'manifest.ocdbt'} is missing")
  url = os.fspath(state_dir)
  url = (url if "://" in url else "file://" + url).rstrip("/") + "/"
  try:
    store = ts.KvStore.open({"driver": "ocdbt", "base": url}).result()
    keys = store.list().result()
  except Exception as e:  # pylint: disable=broad-except  (tensorstore raises ValueError)
    return CheckpointDamage(f"unreadable array index ({_status(e)})", f"{url}: {_first_line(e)}")
  for key in keys:
    name = key.decode(errors="replace")
    try:
      value = store.read(key).result().value
    except Exception as e:  # pylint: disable=broad-except
      return CheckpointDamage(f"unreadable array data ({_status(e)})", f"{name}: {_first_line(e)}")
    if name.endswith(_ZARR_METADATA):
      try:
        json.loads(bytes(value))
      except ValueError as e:
        return CheckpointDamage("unreadable metadata", f"{name}: {e}")
    elif not value:
      return CheckpointDamage("missing array data", f"{name} reads back empty")
  return None


def _status(e: BaseException) -> str:
  """'OUT_OF_RANGE' for a tensorstore error 'OUT_OF_RANGE: ...', else the type's name."""
  head = str(e).split(":", 1)[0]
  return head if re.fullmatch(r"[A-Z_]+", head) else type(e).__name__


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def _agree(decide: Callable[[], dict], what: str) -> dict:
  """Process 0's `decide()`, the same dict on every process (JSON over a broadcast).

  When `decide` raises on process 0, process 0 re-raises it and every other process
  raises `ResumeError` with its message, so no process waits for the others.
  """
  error, decision = None, None
  if jax.process_index() == 0:
    try:
      decision = {"ok": decide()}
    except Exception as e:  # pylint: disable=broad-except  (re-raised below)
      error, decision = e, {"error": f"{type(e).__name__}: {_first_line(e)}"}
  if jax.process_count() > 1:
    decision = _broadcast_json(decision)
  if "error" in decision:
    if error is not None:
      raise error
    raise ResumeError(f"process 0 failed while {what}: {decision['error']}")
  return decision["ok"]


_BROADCAST_BYTES = 1 << 14


def _broadcast_json(value: Optional[dict]) -> dict:
  """Process 0's JSON-able `value` on every process (a fixed-size uint8 broadcast)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  buffer = np.zeros(_BROADCAST_BYTES, np.uint8)
  if jax.process_index() == 0:
    data = json.dumps(value).encode()
    if len(data) > _BROADCAST_BYTES:
      data = json.dumps({"error": f"decision too long to broadcast: {data[:200]!r}"}).encode()
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return json.loads(bytes(out).rstrip(b"\0").decode())


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

  steps = _agree(survey, "reading the checkpoints")
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

    decision = _agree(plan, f"inspecting the checkpoint at step {step}")
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

      damage = _agree(verdict, f"checking the checkpoint at step {step} for damage")["damage"]
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
