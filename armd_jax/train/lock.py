"""One trainer per workdir: `<workdir>/train.lock`, which cannot be won twice.

The lock file holds {'pid', 'host', 'started', 'heartbeat', 'token'} (JSON). It is
created complete and atomically, so a contender either wins it whole or sees the
winner's:
  - local folders: the content goes to a temporary file first, which is then
    `os.link`ed to the lock name (fails if the name exists);
  - `gs://`: the object is uploaded with the precondition `ifGenerationMatch=0`;
  - other fsspec URLs (s3://, az://, hf://): exists-then-write, then a read-back of the
    token. Best effort only: two contenders within one round trip can both win there.

The holder refreshes `heartbeat` from a daemon thread every `timeout_s / 4`, rewriting
the lock only while it is still its own (local: the inode it created; `gs://`: the
generation it wrote, as a precondition). A lock is stale, and is taken over with a
printed note, when
  - its heartbeat is older than `timeout_s` (`config.checkpoint.lock_timeout_s`),
    whatever host wrote it (a requeued job on another node resumes by itself);
  - it was written on this host by a pid that is no longer running;
  - it has no readable content and was last modified `grace_s` (60 s) ago or more (a
    younger unreadable lock may be a trainer that is starting: busy).
Taking over is race-free: it replaces exactly the version that was judged stale (local:
the inode read is moved aside under a takeover claim that only one contender can create,
then the lock is created as above; `gs://`: one upload with `ifGenerationMatch` of the
generation read); of two contenders that judged one lock stale, the loser sees the
winner's fresh lock and stops busy.

Several processes: only process 0 touches the lock (`hold_workdir`); the outcome is
broadcast (`armd_jax.train.agree`) and every process raises the same `WorkdirBusyError`,
naming the holder.
`force_unlock` (`python -m armd_jax.main ... --force_unlock`) removes a lock by hand.
How each kind of storage creates and replaces the lock: `armd_jax.train.lock_stores`.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
import uuid
from typing import Any, Callable, Iterator, Optional

from armd_jax import storage
from armd_jax.train import agree
from armd_jax.train.lock_stores import Snapshot, encode, store_of

LOCK_FILE = "train.lock"
DEFAULT_TIMEOUT_S = 600.0
GRACE_S = 60.0  # an unreadable lock younger than this is busy (its writer may be starting)
ATTEMPTS = 20  # create / judge / take over rounds before giving up as contended


class WorkdirBusyError(RuntimeError):
  """Another live trainer holds the workdir's lock."""


def describe(content: Optional[dict], now: Optional[float] = None) -> str:
  """'pid 12 on host 'h', heartbeat 3 s ago' (what a busy message names)."""
  if content is None:
    return "no readable content"
  now = time.time() if now is None else now
  text = f"pid {content.get('pid')} on host {content.get('host')!r}"
  beat = _heartbeat(content)
  if beat is not None:
    text += f", heartbeat {now - beat:.0f} s ago"
  return text


def stale_reason(snapshot: Snapshot, now: float, host: str, timeout_s: float,
                 grace_s: float = GRACE_S) -> Optional[str]:
  """Why the lock in `snapshot` is stale, or None when it is live (busy).

  Args:
    snapshot: the lock as read.
    now: the current time (seconds since the epoch).
    host: this machine's host name.
    timeout_s: a heartbeat older than this is stale, whatever host wrote it.
    grace_s: an unreadable lock is busy until it is this old (by modification time).
  """
  content = snapshot.content
  beat = None if content is None else _heartbeat(content)
  if beat is None:
    if snapshot.age_s >= grace_s:
      return f"no readable content, last written {snapshot.age_s:.0f} s ago"
    return None
  if now - beat > timeout_s:
    return f"its heartbeat is {now - beat:.0f} s old (timeout {timeout_s:g} s)"
  if content.get("host") == host and not _pid_alive(content.get("pid")):
    return f"pid {content.get('pid')} on this host is not running"
  return None


def _heartbeat(content: dict) -> Optional[float]:
  """The lock's last heartbeat (its start time for a lock written before heartbeats)."""
  value = content.get("heartbeat", content.get("started"))
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _pid_alive(pid: Any) -> bool:
  """False only when `pid` is known not to run on this host."""
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True
  return True


def lock_path(workdir: storage.PathLike):
  """`<workdir>/train.lock` as an `epath.Path`."""
  return storage.path(workdir) / LOCK_FILE


# ---------------------------------------------------------------------------------------


class WorkdirLock:
  """`<workdir>/train.lock` held for one training run (a context manager, one process).

  Args:
    workdir: a local folder or a URL (`storage.path`).
    timeout_s: a lock whose heartbeat is older than this is stale (also sets the
      heartbeat interval, `timeout_s / 4`).
    log: where notes go (taking over a stale lock, losing the lock).
    grace_s: an unreadable lock is busy until it is this old.

  Attributes:
    held: True between a successful `acquire` and `release`.
    lost: True when the heartbeat found the lock no longer ours (taken over or removed).

  Raises (from `acquire` / `__enter__`):
    WorkdirBusyError: a live trainer holds the lock; the message names it.
  """

  def __init__(self, workdir: storage.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S,
               log: Callable[[str], None] = print, grace_s: float = GRACE_S):
    if not timeout_s > 0:
      raise ValueError(f"config.checkpoint.lock_timeout_s={timeout_s} must be > 0.")
    self.workdir = os.fspath(storage.path(workdir))
    self.path = os.fspath(lock_path(workdir))
    self.timeout_s, self.grace_s, self.log = float(timeout_s), float(grace_s), log
    self.host, self.token = socket.gethostname(), uuid.uuid4().hex
    self.held = self.lost = False
    self._store = store_of(lock_path(workdir))
    self._version = None
    self._started = 0.0
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _content(self) -> dict:
    return {"pid": os.getpid(), "host": self.host, "started": self._started,
            "heartbeat": time.time(), "token": self.token}

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (taking over a stale one) and starts the heartbeat.

    Raises:
      WorkdirBusyError: a live trainer holds it, or contenders kept it changing.
    """
    self._started = time.time()
    for _ in range(ATTEMPTS):
      version = self._store.create(encode(self._content(), size=512))
      if version is not None:
        self._version, self.held = version, True
        self._start_heartbeat()
        return self
      snapshot = self._store.read()
      if snapshot is None:
        continue  # released meanwhile
      reason = stale_reason(snapshot, time.time(), self.host, self.timeout_s, self.grace_s)
      if reason is None:
        raise WorkdirBusyError(self._busy_message(snapshot))
      version = self._store.take_over(snapshot, encode(self._content(), size=512))
      if version is not None:
        self.log(f"took over a stale lock {self.path} ({describe(snapshot.content)}): "
                 f"{reason}.")
        self._version, self.held = version, True
        self._start_heartbeat()
        return self
      time.sleep(random.uniform(0.01, 0.1))  # another contender was first: look again
    snapshot = self._store.read()
    raise WorkdirBusyError(
        f"could not take the lock {self.path} after {ATTEMPTS} attempts (other trainers "
        f"kept changing it; now {describe(snapshot.content if snapshot else None)}).")

  def _busy_message(self, snapshot: Snapshot) -> str:
    if snapshot.content is None:
      holder = (f"its lock has no readable content yet, written {snapshot.age_s:.0f} s ago; "
                f"a trainer may be starting, and it goes stale at {self.grace_s:g} s")
    else:
      holder = describe(snapshot.content)
    return (f"{self.workdir} is in use by another trainer ({holder}; lock {self.path}). "
            "Wait for it, use another --workdir, or rerun with --force_unlock if that "
            f"trainer is gone (a lock also goes stale {self.timeout_s:g} s after its last "
            "heartbeat, config.checkpoint.lock_timeout_s).")

  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="armd-lock-heartbeat",
                                    daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    interval = self.timeout_s / 4
    while not self._stop.wait(interval):
      try:
        version = self._store.rewrite(self._version, encode(self._content(), size=512))
      except Exception as e:  # pylint: disable=broad-except
        self.log(f"warning: could not refresh the lock {self.path}: {e}")
        continue
      if version is None:
        self.lost = True
        self.log(f"warning: the lock {self.path} is no longer ours (taken over or "
                 "removed); another trainer may now write to this workdir.")
        return
      self._version = version

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.held:
      self.held = False
      self._store.release(self._version)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def force_unlock(workdir: storage.PathLike, log: Callable[[str], None] = print) -> bool:
  """Removes `<workdir>/train.lock` whoever holds it (for a person who knows); True if
  there was one. Prints what it removed."""
  path = lock_path(workdir)
  store = store_of(path)
  snapshot = store.read()
  store.force_remove()
  if snapshot is None:
    log(f"--force_unlock: no lock at {os.fspath(path)}.")
    return False
  log(f"--force_unlock: removed the lock {os.fspath(path)} "
      f"({describe(snapshot.content)}).")
  return True


@contextlib.contextmanager
def hold_workdir(workdir: storage.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S,
                 log: Callable[[str], None] = print) -> Iterator[Optional[WorkdirLock]]:
  """Holds the workdir's lock for a run of one or several processes.

  Process 0 takes the lock (yielding it; the others yield None) and the outcome is
  broadcast (`agree.agree`), so every process goes on, or every process raises.

  Raises:
    WorkdirBusyError: on every process, naming the holder.
    RuntimeError: on processes > 0 when process 0 failed otherwise (process 0 raises its
      own error).
  """
  lock: Optional[WorkdirLock] = None

  def take() -> dict:
    nonlocal lock
    try:
      lock = WorkdirLock(workdir, timeout_s, log=log).acquire()
    except WorkdirBusyError as e:
      return {"busy": str(e)}
    return {"busy": None}

  outcome = agree.agree(take, "taking the workdir lock")
  if outcome["busy"] is not None:
    raise WorkdirBusyError(outcome["busy"])
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
