"""A SIGTERM saves a checkpoint at the step it arrived, the trainer exits with status 143,
and a rerun of the same config resumes from that step: no step is lost
(`armd_jax.train.preemption`). The SIGTERMed run is the command; the rerun trains in the
test process (the command resuming a workdir is test_train_resume's).
A SIGTERM to one of two processes (both save one agreed step) is tested in
test_multiprocess.py, on the run whose damaged step both skip."""

import os
import re
import signal
import subprocess
import time

import pytest

from armd_jax.train import checkpoints, preemption

from conftest import tiny_command, train_like_tiny_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_sigterm_flag_is_seen_at_the_next_step_and_the_old_handler_comes_back():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Watch() as watch:
    assert not watch.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled: the test process goes on
    assert watch.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before
  assert preemption.EXIT_STATUS == 143


# On configs/tiny.py: a progress line every step, no periodic checkpoint before step 1000.
OVERRIDES = {"train.log_every": 1, "train.checkpoint_every": 1000, "train.eval_every": 0,
             "eval.num_batches": 1, "sample.num_samples": 0}


def _command(workdir, steps):
  return tiny_command(workdir, {"train.num_steps": steps, **OVERRIDES})


def _rerun(workdir, steps):
  """What `_command(workdir, steps)` trains, in this process (the same programs)."""
  train_like_tiny_command(workdir, {"train.num_steps": steps, **OVERRIDES})


@pytest.mark.slow
def test_a_sigterm_mid_run_saves_that_step_exits_143_and_the_rerun_resumes_from_it(tmp_path,
                                                                                  capsys):
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(_command(workdir, 400), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  for line in proc.stdout:  # progress lines: "step 5/400 ..."
    if re.match(r"step\s+5\b", line.strip()):
      proc.send_signal(signal.SIGTERM)
      break
    assert time.time() < deadline, "no step 5 within 300 s"
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-2000:]
  saved = [int(s.name) for s in checkpoints.checkpoint_dir(workdir).iterdir() if s.name.isdigit()]
  assert len(saved) == 1 and 5 <= saved[0] < 400, saved  # checkpoint_every=1000: only the SIGTERM's
  assert f"saved a checkpoint at step {saved[0]}" in err
  assert "eval at step" not in out  # it stopped: no final evaluation

  capsys.readouterr()
  _rerun(workdir, saved[0] + 2)  # the same run (the command's own resume: test_train_resume)
  rerun = capsys.readouterr().out
  assert f"resuming from step {saved[0]}" in rerun
  assert f"training steps {saved[0] + 1}..{saved[0] + 2}" in rerun
