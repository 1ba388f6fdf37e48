"""A run killed with SIGKILL mid-training and restarted ends bitwise where an
uninterrupted run ends: same per-step losses, same parameters, same EMA (on CPU). The
killed run and its restart are the command; the uninterrupted run, the same config and
programs, trains in the test process."""

import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from armd_jax import train
from armd_jax.train import checkpoints

from conftest import tiny_command, train_like_tiny_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Left-to-right for 10 steps, k ramping to rho by step 30, uniform orders after it: the
# steps redone after the restart (from step 20) cross the ramp and the uniform phase.
NUM_STEPS = 40
KILL_AFTER = 25  # the progress line of this step triggers the SIGKILL


OVERRIDES = {"train.num_steps": NUM_STEPS, "train.log_every": 1, "train.checkpoint_every": 10,
             "train.eval_every": 0, "order.i_perm": 30}  # on configs/tiny.py


def command(workdir):
  return tiny_command(workdir, OVERRIDES)


def run_to_end(workdir):
  result = subprocess.run(command(workdir), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def run_and_kill(workdir):
  """Starts the run, SIGKILLs it right after the progress line of step KILL_AFTER."""
  proc = subprocess.Popen(command(workdir), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  try:
    for line in proc.stdout:
      if line.startswith(f"step {KILL_AFTER}/"):
        proc.send_signal(signal.SIGKILL)
        break
  finally:
    proc.wait(timeout=600)
  return proc.returncode


def last_loss_per_step(workdir):
  """{step: train loss}; a step redone after the restart keeps its last record."""
  return {r["step"]: r["train/loss"] for r in train.read_metrics(workdir) if "train/loss" in r}


@pytest.mark.slow
def test_a_sigkilled_and_restarted_run_matches_an_uninterrupted_run_bitwise(tmp_path):
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert run_and_kill(killed) == -signal.SIGKILL
  saved = os.listdir(checkpoints.checkpoint_dir(killed))
  assert str(NUM_STEPS) not in saved  # it really stopped mid-run
  resumed_output = run_to_end(killed)
  resumed_from = int(resumed_output.split("resuming from step ")[1].split()[0])
  assert 10 <= resumed_from < NUM_STEPS  # it restored a checkpoint, not scratch
  train_like_tiny_command(straight, OVERRIDES)

  expected, got = last_loss_per_step(straight), last_loss_per_step(killed)
  assert sorted(got) == list(range(1, NUM_STEPS + 1)) == sorted(expected)
  assert got == expected  # every step's loss, bit for bit (JSON keeps float32 exactly)

  for use_ema in (False, True):
    a = train.load_trained(straight, use_ema=use_ema, with_vocab=False)
    b = train.load_trained(killed, use_ema=use_ema, with_vocab=False)
    assert a.step == b.step == NUM_STEPS
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_array_equal(x, y)
