"""Read damage of a saved checkpoint step, told from other restore failures.

`data_state_files` checks a step's data-iterator files for this process count;
`read_damage` reads a step's saved state back whole. Both name what they found as a
`CheckpointDamage` (`reason`: the same for the same kind of damage in any step), which
`armd_jax.train.checkpoints.restore_newest_good` acts on.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from etils import epath

from armd_jax.train.agree import first_line

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
    return CheckpointDamage(f"unreadable array index ({_status(e)})", f"{url}: {first_line(e)}")
  for key in keys:
    name = key.decode(errors="replace")
    try:
      value = store.read(key).result().value
    except Exception as e:  # pylint: disable=broad-except
      return CheckpointDamage(f"unreadable array data ({_status(e)})", f"{name}: {first_line(e)}")
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
