"""Metric writers, the progress line and finite checks.

Metrics go to three places: CLU's writers (console logging and, when `tensorboard` is
installed, TensorBoard summaries under <workdir>), and `<workdir>/metrics.jsonl` (one
JSON object per write; what tests and scripts read). The workdir may be a URL
(`armd_jax.storage`): an object store cannot append, so on `gs://` each write reads
metrics.jsonl and writes it again whole (one object write, never a half line; a few
hundred KB for a long run); TensorBoard reaches `gs://` through TensorFlow's own file
system. CLU's `metric_writers` package
imports TensorFlow, so it is imported lazily here and only when
`config.train.tensorboard` is on; without it the console + JSONL writers still work.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np
from absl import logging

from armd_jax import storage

METRICS_FILE = "metrics.jsonl"


class NonFiniteError(FloatingPointError):
  """Training produced a non-finite loss or gradient norm."""


class Writer:
  """Writes scalar dicts to CLU (when available) and to <workdir>/metrics.jsonl."""

  def __init__(self, workdir: storage.PathLike, tensorboard: bool):
    self.is_main = jax.process_index() == 0
    directory = storage.path(workdir)
    self.path = directory / METRICS_FILE
    self.clu = None
    if self.is_main and tensorboard:
      try:
        from clu import metric_writers  # pylint: disable=g-import-not-at-top
        self.clu = metric_writers.create_default_writer(os.fspath(directory),
                                                        asynchronous=False)
      except ImportError as e:
        logging.warning("TensorBoard summaries off (%s); writing %s only.", e, self.path)
    if self.is_main:
      directory.mkdir(parents=True, exist_ok=True)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes scalars at `step` (process 0 only)."""
    if not self.is_main:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self.clu is not None:
      self.clu.write_scalars(step, values)
    storage.append_text(self.path, json.dumps({"step": int(step), **values}) + "\n")

  def close(self) -> None:
    """Flushes and closes the CLU writers."""
    if self.clu is not None:
      self.clu.flush()
      self.clu.close()


def read_metrics(workdir: storage.PathLike) -> list[Dict[str, float]]:
  """All records of <workdir>/metrics.jsonl (a local folder or URL), in write order."""
  path = storage.path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
          if line.strip()]


class Progress:
  """The progress line: step, loss, tokens/s and ETA over the last interval."""

  def __init__(self, num_steps: int, tokens_per_step: int, start_step: int):
    self.num_steps = num_steps
    self.tokens_per_step = tokens_per_step
    self.last_step = start_step
    self.last_time = time.perf_counter()

  def restart(self, step: int, _: Any = None) -> None:
    """Restarts the clock at `step` (e.g. after the first, compiling step)."""
    self.last_step, self.last_time = step, time.perf_counter()

  def line(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, float]:
    """Prints the progress line for `step` and returns its rate metrics."""
    now = time.perf_counter()
    if step <= self.last_step:  # nothing timed yet (the compiling step)
      self.last_time = now - 1e-9
    steps = max(step - self.last_step, 1)
    seconds_per_step = (now - self.last_time) / steps
    self.last_step, self.last_time = step, now
    tokens_per_s = self.tokens_per_step / max(seconds_per_step, 1e-9)
    eta = seconds_per_step * (self.num_steps - step)
    loss = float(np.asarray(metrics["loss"]))
    text = (f"step {step}/{self.num_steps}  loss {loss:.4f}  "
            f"tokens/s {tokens_per_s:,.0f}  step {seconds_per_step * 1e3:.0f} ms  "
            f"ETA {_hms(eta)}")
    if jax.process_index() == 0:
      print(text, flush=True)
    return {"perf/tokens_per_s": tokens_per_s, "perf/step_ms": seconds_per_step * 1e3}


def check_finite(step: int, metrics: Mapping[str, Any], last_good: Optional[int]) -> None:
  """Raises NonFiniteError naming `step` when loss or grad_norm is NaN or infinite."""
  for name in ("loss", "grad_norm"):
    if name in metrics and not np.isfinite(np.asarray(metrics[name])):
      kept = (f"the last good checkpoint (step {last_good}) is kept" if last_good is not None
              else "no checkpoint was written")
      raise NonFiniteError(f"Non-finite {name}={float(np.asarray(metrics[name]))} at train "
                           f"step {step}; training stopped and {kept}. Lower "
                           "config.optim.learning_rate or check the data.")


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
