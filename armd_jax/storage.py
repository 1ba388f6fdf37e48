"""Where a run's files live: one path type for local folders, `gs://` buckets and the
other URLs fsspec reaches.

Every file a run reads or writes (config.json, checkpoints, metrics, samples, the
vocabulary, the token cache, the lock, sweep roots) goes through `storage.path(...)`,
an `etils.epath.Path`. Local paths become absolute; URLs are kept as given (orbax and
tensorstore take them as is). A URL whose scheme no installed client handles is a
one-line `ValueError` at start, never a local folder named `gs:`.

Cloud Storage goes through gcsfs (fsspec) in our code and through tensorstore under
orbax. `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` (the variable Google's own
clients read) points both at a local emulator: `configure_emulator()` sets what each
client needs, and is called by `path()` (and on import) so no other variable is needed.

Object stores have no append and no rename: `append_text` rewrites the whole object
(metrics files are small), `write_atomic` is one object write (atomic on Cloud
Storage) or a local temporary file renamed into place. Libraries that need a local file
(SentencePiece, numpy's mmap) get one from `local_copy`, a mirror under
`local_cache_root()`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import time
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]

# URL schemes epath routes through fsspec, and the package each needs (pip name, module).
CLIENTS = {
    "gs": ("gcsfs", "gcsfs"),
    "s3": ("s3fs", "s3fs"),
    "az": ("adlfs", "adlfs"),
    "hf": ("huggingface_hub", "huggingface_hub"),
}
CLOUD_SCHEMES = tuple(CLIENTS)
# Where `local_copy` mirrors remote files; override with this variable.
LOCAL_CACHE_VARIABLE = "ARMD_JAX_LOCAL_CACHE"
_COPY_CHUNK = 16 << 20


def scheme_of(location: PathLike) -> str | None:
  """'gs' for 'gs://b/x', None for a local path."""
  text = os.fspath(location)
  if "://" not in text:
    return None
  return text.split("://", 1)[0].lower()


def is_local(location: PathLike) -> bool:
  """True for a path on this machine's file system."""
  return scheme_of(location) in (None, "file")


def path(location: PathLike) -> epath.Path:
  """The `epath.Path` of a workdir or file: local paths absolute, URLs as given.

  Raises:
    ValueError: `location` is a URL whose scheme no installed client handles, or looks
      like a URL with one slash ('gs:/b/x').
  """
  text = os.fspath(location)
  scheme = scheme_of(text)
  if scheme is None:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", text):
      raise ValueError(f"{text!r} looks like a URL with one slash; write "
                       f"{text.split(':', 1)[0]}://... (or ./{text} for a local folder).")
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if scheme == "file":
    return epath.Path(os.path.abspath(text[len("file://"):]))
  if scheme not in CLIENTS:
    raise ValueError(f"{text!r}: no installed storage client handles {scheme}:// URLs "
                     f"(supported: local paths, {', '.join(s + '://' for s in CLOUD_SCHEMES)}).")
  package, module = CLIENTS[scheme]
  if importlib.util.find_spec(module) is None:
    extra = " (pip install 'armd-jax[gcs]')" if scheme == "gs" else ""
    raise ValueError(f"{text!r}: {scheme}:// URLs need the {package} package: "
                     f"pip install {package}{extra}.")
  configure_emulator()
  return epath.Path(text)


def configure_emulator(environ=None) -> None:
  """Points gcsfs (epath) and tensorstore (orbax) at `STORAGE_EMULATOR_HOST` when set.

  Also makes epath use fsspec, not TensorFlow's file system, for URLs (TensorFlow is
  only a dependency of the data layer and must not decide where checkpoints go), and
  turns off gcsfs's listing cache (other processes write the same bucket). Variables a
  user set are kept. Idempotent; cheap (imports no storage client).

  Args:
    environ: the environment to fill (default `os.environ`, which also configures fsspec
      in this process).
  """
  own = environ is None
  environ = os.environ if environ is None else environ
  environ.setdefault("EPATH_USE_TF", "false")
  host = environ.get("STORAGE_EMULATOR_HOST", "")
  if host and host != "default":
    if not host.startswith(("http://", "https://")):
      host = "http://" + host
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # Otherwise gcsfs probes each bucket's type over gRPC, which an emulator never answers
    # (60 s per bucket).
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  if own:
    _configure_fsspec(emulated=bool(host and host != "default"))
    _forget_epath_backend_choice()


def _forget_epath_backend_choice() -> None:
  """epath caches, at its first URL, whether TensorFlow serves URLs (`_is_tf_installed`,
  read from EPATH_USE_TF then). Anything that touched a URL before this module was
  imported (a library, a test) would pin TensorFlow's file system for the process;
  clearing the cache makes the variable above count."""
  gpath = sys.modules.get("etils.epath.gpath")
  cached = getattr(gpath, "_is_tf_installed", None)
  if cached is not None and hasattr(cached, "cache_clear"):
    cached.cache_clear()


def _configure_fsspec(emulated: bool) -> None:
  import fsspec  # pylint: disable=g-import-not-at-top  (light: no gcsfs)
  options = fsspec.config.conf.setdefault("gs", {})
  options.setdefault("use_listings_cache", False)
  if emulated:
    options.setdefault("token", "anon")
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None and gcsfs.GCSFileSystem is not gcsfs.core.GCSFileSystem:
      # gcsfs was imported before the variable above: register its plain client.
      for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


def local_cache_root() -> str:
  """The local folder that mirrors remote files: $ARMD_JAX_LOCAL_CACHE or ~/.cache/armd_jax."""
  return os.path.abspath(os.path.expanduser(
      os.environ.get(LOCAL_CACHE_VARIABLE) or os.path.join("~", ".cache", "armd_jax")))


def local_mirror(location: PathLike) -> str:
  """Where `local_copy` puts a remote file: <local_cache_root()>/<scheme>/<bucket>/<key>."""
  text = os.fspath(location)
  if is_local(text):
    return os.fspath(path(text))
  scheme, rest = text.split("://", 1)
  return os.path.join(local_cache_root(), scheme.lower(), *rest.strip("/").split("/"))


def local_copy(location: PathLike) -> str:
  """A local file with the content of `location`: the file itself when it is local,
  else a mirror copy (downloaded when missing or of another size).

  Raises:
    FileNotFoundError: `location` does not exist.
  """
  source = path(location)
  if is_local(location):
    if not source.is_file():
      raise FileNotFoundError(f"No file at {location}.")
    return os.fspath(source)
  target = local_mirror(location)
  size = source.stat().length  # raises FileNotFoundError
  if os.path.isfile(target) and os.path.getsize(target) == size:
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  tmp = f"{target}.tmp-{uuid.uuid4().hex}"
  try:
    with source.open("rb") as src, open(tmp, "wb") as dst:
      shutil.copyfileobj(src, dst, _COPY_CHUNK)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def upload(local_file: str, location: PathLike) -> None:
  """Copies a local file to `location` (a local path or URL), atomically."""
  target = path(location)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_local(location):
    tmp = f"{os.fspath(target)}.tmp-{uuid.uuid4().hex}"
    shutil.copyfile(local_file, tmp)
    os.replace(tmp, os.fspath(target))
    return
  with open(local_file, "rb") as src, target.open("wb") as dst:  # one object: atomic
    shutil.copyfileobj(src, dst, _COPY_CHUNK)


def write_atomic(location: PathLike, data: Union[str, bytes]) -> None:
  """Writes a whole file that readers see complete or not at all.

  Local: a temporary file renamed into place. Object stores: one object write.
  """
  target = path(location)
  target.parent.mkdir(parents=True, exist_ok=True)
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if is_local(location):
    tmp = f"{os.fspath(target)}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
      f.write(raw)
    os.replace(tmp, os.fspath(target))
  else:
    target.write_bytes(raw)


def append_text(location: PathLike, text: str) -> None:
  """Appends `text` to a file. Object stores cannot append: the object is read and
  written again whole (one writer at a time; fine for small logs like metrics.jsonl)."""
  target = path(location)
  if is_local(location):
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(os.fspath(target), "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = target.read_text(encoding="utf-8") if target.exists() else ""
  write_atomic(target, old + text)


def wait_for(location: PathLike, wait_s: float, what: str, poll_s: float = 2.0) -> None:
  """Waits until `location` exists (written by another process).

  Raises:
    TimeoutError: naming `what` and `location`, after `wait_s` seconds.
  """
  target = path(location)
  deadline = time.time() + wait_s
  while not target.exists():
    if time.time() > deadline:
      raise TimeoutError(f"Waited {wait_s:.0f}s for {what} at {location} (written by "
                         "process 0); is process 0 running, with the same workdir?")
    time.sleep(poll_s)


configure_emulator()
