"""Preemption: a SIGTERM saves a checkpoint at a step every process agrees on, then stops.

Cloud TPU maintenance and preemption, `gcloud ... --stop`, `launch/tpu_vm.sh --stop`, SLURM
(`scancel`, requeue) and Kubernetes all send SIGTERM before they kill a job. Without a
handler the steps since the last periodic checkpoint are lost. With it:

- one process (no `jax.distributed`): a SIGTERM handler sets a flag; the loop sees it
  after the current step, saves that step and raises `Preempted`;
- several processes: jax's preemption service (on by default with
  `jax.distributed.initialize`) turns a SIGTERM on any host into one agreed step (the
  maximum step any host reached, plus one); `multihost_utils.reached_preemption_sync_point`
  is True on every host at that step, so all save the same checkpoint and stop together.

Rerunning the same command resumes from that checkpoint. `Preempted` is an ordinary stop:
`python -m armd_jax.main` prints one line and exits with status 143 (128 + SIGTERM), as a
process killed by SIGTERM would, so schedulers that requeue on that status still do.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional

import jax

EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Preempted(RuntimeError):
  """Training stopped on a preemption notice after saving a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"preempted (SIGTERM): saved a checkpoint at step {step}; run the same "
                     "command again to resume from it.")
    self.step = step


class Watch:
  """Answers, once per step, whether this step is the agreed preemption point.

  Use as a context manager around the training loop: on one process it installs a SIGTERM
  handler (restored on exit; only from the main thread, elsewhere it watches nothing);
  on several it asks jax's preemption service.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._notice = threading.Event()
    self._previous: Optional[Any] = None

  def __enter__(self) -> "Watch":
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._notice.set()

  def reached(self, step: int) -> bool:
    """True when the checkpoint of `step` is the one to save before stopping. Every
    process must call this at every step (the multi-process protocol needs it)."""
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
        return False
    return self._notice.is_set()


__all__ = ["EXIT_STATUS", "Preempted", "Watch"]
