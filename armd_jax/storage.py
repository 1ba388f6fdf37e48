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
client needs, and is called by `path()` so no other variable is needed.
"""

from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]

# Schemes we route through fsspec (epath's own URL schemes).
CLOUD_SCHEMES = ("gs", "s3", "az", "hf")


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
    ValueError: `location` is a URL whose scheme no installed client handles.
  """
  text = os.fspath(location)
  scheme = scheme_of(text)
  if scheme is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if scheme == "file":
    return epath.Path(os.path.abspath(text[len("file://"):]))
  if scheme not in CLOUD_SCHEMES:
    raise ValueError(f"{text!r}: no installed storage client handles {scheme}:// URLs "
                     f"(supported: local paths, {', '.join(s + '://' for s in CLOUD_SCHEMES)}).")
  configure_emulator()
  return epath.Path(text)


def configure_emulator(environ=None) -> None:
  """Points gcsfs (epath) and tensorstore (orbax) at `STORAGE_EMULATOR_HOST` when set.

  Also makes epath use fsspec, not TensorFlow's file system, for URLs (TensorFlow is
  only a dependency of the data layer and must not decide where checkpoints go).
  """
  environ = os.environ if environ is None else environ
  environ.setdefault("EPATH_USE_TF", "false")
