"""Process 0 decides, every process acts on the same decision (one JSON broadcast).

Decisions that read shared storage (which checkpoint to restore, whether the workdir's
lock was won) are taken once, on process 0, so that processes never act on different
views of a folder that changes under them. `agree(decide, what)` runs `decide()` on
process 0 and returns its JSON-able result on every process; when `decide` raises there,
every process raises too (process 0 its own error), so no process waits at a collective
the others never reach.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Type

import numpy as np

BROADCAST_BYTES = 1 << 14  # the largest decision, as utf-8 JSON


def first_line(e: BaseException) -> str:
  """The first line of an error's message (at most 300 characters), or its type's name."""
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else type(e).__name__


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-able `value` on every process (a fixed-size uint8 broadcast that
  every process takes part in; the others' `value` is ignored).

  A value longer than `BROADCAST_BYTES` arrives as {'error': ...} (never cut JSON).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  buffer = np.zeros(BROADCAST_BYTES, np.uint8)  # [BROADCAST_BYTES]
  if jax.process_index() == 0:
    data = json.dumps(value).encode()
    if len(data) > BROADCAST_BYTES:
      data = json.dumps({"error": f"decision too long to broadcast: {data[:200]!r}"}).encode()
    buffer[:len(data)] = np.frombuffer(data, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
  return json.loads(bytes(out).rstrip(b"\0").decode())


def agree(decide: Callable[[], Any], what: str,
          failure: Type[Exception] = RuntimeError) -> Any:
  """Process 0's `decide()` (JSON-able), the same value on every process.

  Args:
    decide: called on process 0 only.
    what: what deciding is doing, for the other processes' error ('reading the
      checkpoints').
    failure: the error the other processes raise when `decide` raises on process 0.

  Raises:
    On process 0, whatever `decide` raised; on the others, `failure` naming `what` and
    process 0's error.
  """
  import jax  # pylint: disable=g-import-not-at-top

  error, decision = None, None
  if jax.process_index() == 0:
    try:
      decision = {"ok": decide()}
    except Exception as e:  # pylint: disable=broad-except  (re-raised below)
      error, decision = e, {"error": f"{type(e).__name__}: {first_line(e)}"}
  if jax.process_count() > 1:
    decision = broadcast_json(decision)
  if "error" in decision:
    if error is not None:
      raise error
    raise failure(f"process 0 failed while {what}: {decision['error']}")
  return decision["ok"]
