"""Where the workdir lock lives: one small store per kind of storage.

Each store creates, reads, conditionally removes and rewrites one lock object, with the
guarantees `armd_jax.train.lock` builds on:
  - `LocalStore` (a local folder or a shared mount): the complete content is written to
    a temporary file, then `os.link`ed to the lock name (fails if it exists); a version
    is the inode, mtime, size and token read; a takeover moves exactly that version aside
    under a claim file only one contender can create.
  - `GcsStore` (`gs://`): multipart uploads with `ifGenerationMatch` (0 to create, the
    generation read to take over or rewrite); a version is the object's generation.
  - `FsspecStore` (s3://, az://, hf://): exists-then-write and a read-back of the token;
    best effort only (two contenders within one round trip can both win).
`store_of(path)` picks one. `Snapshot` is what a contender read of an existing lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import time
import uuid
from typing import Any, Optional

from armd_jax import storage

TAKEOVER_SUFFIX = ".takeover"  # local only: the claim of the one contender taking over


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """What a contender read of an existing lock.

  Attributes:
    content: the decoded JSON dict, or None when the lock has no readable content.
    version: what identifies this very lock (local: inode, mtime, size and token;
      gs://: generation).
    age_s: seconds since the lock was last modified (its mtime).
  """

  content: Optional[dict]
  version: Any
  age_s: float


def encode(content: dict, size: int = 0) -> bytes:
  """The lock's JSON bytes, padded with spaces to `size` (a local rewrite keeps one size)."""
  data = json.dumps(content, sort_keys=True).encode("utf-8")
  return data + b" " * max(0, size - len(data) - 1) + b"\n"


def decode(data: bytes) -> Optional[dict]:
  """The lock's dict, or None when `data` is empty, truncated or not a JSON object."""
  try:
    content = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, ValueError):
    return None
  return content if isinstance(content, dict) else None


# ---------------------------------------------------------------------------------------
# Stores: atomic create, read, conditional remove and rewrite of one lock object.


class LocalStore:
  """The lock as a file on this machine's file system (or a shared mount)."""

  def __init__(self, path: str):
    self.path = path
    self._fd: Optional[int] = None
    self._size = 0

  def create(self, data: bytes) -> Any:
    """Creates the lock with `data` (complete) unless one exists; its inode, or None."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    temp = f"{self.path}.{uuid.uuid4().hex}.tmp"
    fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
      os.write(fd, data)
      os.fsync(fd)
      os.link(temp, self.path)
    except BaseException as e:
      os.close(fd)
      if isinstance(e, FileExistsError):
        return None
      raise
    finally:
      os.unlink(temp)
    self._fd, self._size = fd, len(data)
    return os.fstat(fd).st_ino

  def read(self) -> Optional[Snapshot]:
    """The lock as it is now, or None when there is none."""
    try:
      with open(self.path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    except FileNotFoundError:
      return None
    content = decode(data)
    return Snapshot(content, _identity(st, content), max(0.0, time.time() - st.st_mtime))

  def remove(self, snapshot: Snapshot) -> bool:
    """Removes the lock if it is still the one in `snapshot`; True when this call did.

    Only the contender that creates the takeover claim moves the lock aside; it checks
    the inode it moved and puts back one that is not the stale lock.
    """
    claim = self.path + TAKEOVER_SUFFIX
    try:
      fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False  # another contender is taking over
    os.close(fd)
    aside = f"{self.path}.{uuid.uuid4().hex}.stale"
    try:
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        return False
      with open(aside, "rb") as f:
        moved = _identity(os.fstat(f.fileno()), decode(f.read()))
      if moved == snapshot.version:
        os.unlink(aside)
        return True
      try:  # a fresh lock replaced the stale one meanwhile: put it back
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.unlink(aside)
      return False
    finally:
      os.unlink(claim)

  def take_over(self, snapshot: Snapshot, data: bytes) -> Any:
    """Replaces the stale lock in `snapshot` with `data`; the new inode, or None when
    another contender was first (it then holds a fresh lock, or is taking over)."""
    if not self.remove(snapshot):
      return None
    return self.create(data)

  def rewrite(self, version: Any, data: bytes) -> Any:
    """Rewrites our lock in place (same inode) while it is still ours; None when lost."""
    try:
      if os.stat(self.path).st_ino != version:
        return None
    except FileNotFoundError:
      return None
    os.pwrite(self._fd, data.ljust(self._size), 0)
    return version

  def release(self, version: Any) -> None:
    """Removes the lock if it is still ours."""
    try:
      if os.stat(self.path).st_ino == version:
        os.unlink(self.path)
    except FileNotFoundError:
      pass
    finally:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None

  def force_remove(self) -> None:
    """Removes the lock and any takeover claim, whoever holds them."""
    for name in (self.path, self.path + TAKEOVER_SUFFIX):
      with contextlib.suppress(FileNotFoundError):
        os.unlink(name)


def _identity(st: os.stat_result, content: Optional[dict]) -> tuple:
  """What tells one local lock file from a later one: inode numbers are reused once a
  file is deleted, so the modification time and the token count too."""
  return (st.st_ino, st.st_mtime_ns, st.st_size, (content or {}).get("token"))


class GcsStore:
  """The lock as a Cloud Storage object, with generation preconditions (through gcsfs).

  Every conditional write is a multipart upload with `ifGenerationMatch` (0: the object
  must not exist; g: it must still be generation g), which Cloud Storage and
  fake-gcs-server both check. A takeover is one such compare-and-swap on the stale
  generation, not a delete then a create (emulators ignore preconditions on DELETE).
  """

  BOUNDARY = "armd_lock_boundary"

  def __init__(self, url: str):
    import fsspec  # pylint: disable=g-import-not-at-top
    self.path = url
    self.fs = fsspec.filesystem("gs")
    self.bucket, self.key, _ = self.fs.split_path(url)

  def _upload(self, data: bytes, if_generation: Any) -> Any:
    """Uploads `data` if the object's generation is `if_generation` (0: absent); the new
    generation, or None when the precondition failed."""
    head = (f"--{self.BOUNDARY}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            f"{json.dumps({'name': self.key})}\r\n--{self.BOUNDARY}\r\n"
            "Content-Type: application/json\r\n\r\n").encode("utf-8")
    body = head + data + f"\r\n--{self.BOUNDARY}--\r\n".encode("utf-8")
    try:
      out = self.fs.call(
          "POST", f"{self.fs._location}/upload/storage/v1/b/{self.bucket}/o",  # pylint: disable=protected-access
          uploadType="multipart", ifGenerationMatch=str(if_generation),
          headers={"Content-Type": f'multipart/related; boundary="{self.BOUNDARY}"'},
          data=body, json_out=True)
    except FileExistsError:  # HTTP 412: the precondition failed
      return None
    return int(out["generation"])

  def _metadata(self) -> Optional[dict]:
    try:
      return self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
    except FileNotFoundError:
      return None

  def create(self, data: bytes) -> Any:
    """Creates the object unless it exists (`ifGenerationMatch=0`); its generation, or None."""
    return self._upload(data, 0)

  def read(self) -> Optional[Snapshot]:
    """The lock as it is now, or None when there is none."""
    meta = self._metadata()
    if meta is None:
      return None
    generation = int(meta["generation"])
    try:
      _, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media",
                             generation=str(generation))
    except FileNotFoundError:
      return None  # replaced or removed since: the caller reads again
    updated = datetime.datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
    return Snapshot(decode(data), generation, max(0.0, time.time() - updated.timestamp()))

  def take_over(self, snapshot: Snapshot, data: bytes) -> Any:
    """Replaces the stale lock with `data` if it is still the generation read (one
    compare-and-swap); the new generation, or None when another contender was first."""
    return self._upload(data, snapshot.version)

  def rewrite(self, version: Any, data: bytes) -> Any:
    """Rewrites the object if it is still generation `version`; the new one, or None."""
    return self._upload(data, version)

  def release(self, version: Any) -> None:
    """Deletes the object if it is still generation `version`."""
    meta = self._metadata()  # also for servers that ignore preconditions on DELETE
    if meta is not None and int(meta["generation"]) == version:
      with contextlib.suppress(FileExistsError, FileNotFoundError):
        self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key,
                     ifGenerationMatch=str(version))

  def force_remove(self) -> None:
    """Deletes the object, whoever holds it."""
    with contextlib.suppress(FileNotFoundError):
      self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key)


class FsspecStore:
  """Any other fsspec file system: exists-then-write and a token read-back (best effort;
  not race-free within one round trip)."""

  def __init__(self, path: Any):
    self.path = path  # an epath.Path

  def create(self, data: bytes) -> Any:
    """Writes the lock unless one exists; its token, or None."""
    if self.path.exists():
      return None
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_bytes(data)
    token = (decode(data) or {}).get("token")
    snapshot = self.read()
    if snapshot is None or (snapshot.content or {}).get("token") != token:
      return None
    return token

  def read(self) -> Optional[Snapshot]:
    """The lock as it is now, or None when there is none."""
    try:
      data = self.path.read_bytes()
    except FileNotFoundError:
      return None
    content = decode(data)
    age = 0.0
    with contextlib.suppress(Exception):
      age = max(0.0, time.time() - self.path.stat().mtime)
    return Snapshot(content, (content or {}).get("token"), age)

  def remove(self, snapshot: Snapshot) -> bool:
    """Removes the lock if it still holds the token read."""
    now = self.read()
    if now is None or now.version != snapshot.version:
      return False
    self.path.unlink(missing_ok=True)
    return True

  def take_over(self, snapshot: Snapshot, data: bytes) -> Any:
    """Replaces the stale lock (if it still holds the token read) with `data`."""
    if not self.remove(snapshot):
      return None
    return self.create(data)

  def rewrite(self, version: Any, data: bytes) -> Any:
    """Rewrites the lock while it still holds our token; None when lost."""
    now = self.read()
    if now is None or now.version != version:
      return None
    self.path.write_bytes(data)
    return version

  def release(self, version: Any) -> None:
    """Removes the lock if it still holds our token."""
    self.remove(Snapshot(None, version, 0.0))

  def force_remove(self) -> None:
    """Removes the lock, whoever holds it."""
    self.path.unlink(missing_ok=True)


def store_of(lock_path: Any):
  """The store for the lock at `lock_path` (an `epath.Path` from `storage.path`)."""
  text = os.fspath(lock_path)
  scheme = storage.scheme_of(text)
  if storage.is_local(text):
    return LocalStore(os.fspath(storage.path(text)))
  if scheme == "gs":
    return GcsStore(text)
  return FsspecStore(lock_path)
