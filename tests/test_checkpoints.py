"""Checkpoint recovery (a damaged newest checkpoint) and the one-trainer-per-workdir lock."""

import json
import os
import socket
import subprocess
import sys

import pytest

from armd_jax import train
from armd_jax.train import checkpoints
from armd_jax.train.defaults import config_from_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_tiny(num_steps):
  config = config_from_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.train.num_steps = num_steps
  config.train.checkpoint_every = 10
  config.train.eval_every = 0
  config.eval.num_batches = 1
  config.checkpoint.async_save = False
  return config


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_reported_moved_aside_and_training_resumes(tmp_path,
                                                                                  capsys):
  workdir = str(tmp_path)
  train.train_and_evaluate(short_tiny(20), workdir)
  directory = checkpoints.checkpoint_dir(workdir)
  assert sorted(os.listdir(directory)) == ["10", "20"]
  truncated = 0
  for root, _, files in os.walk(os.path.join(directory, "20", "state")):
    if os.path.basename(root) == "d":  # the array data files of the ocdbt store
      for name in files:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(8)
        truncated += 1
  assert truncated
  capsys.readouterr()
  out = train.train_and_evaluate(short_tiny(30), workdir)
  printed = capsys.readouterr().out
  assert "checkpoint at step 20 is damaged" in printed
  assert "resuming from step 10" in printed
  assert os.path.isdir(os.path.join(workdir, checkpoints.DAMAGED_DIR, "20"))
  assert sorted(os.listdir(directory)) == ["10", "20", "30"]  # 20 rewritten by the rerun
  assert out["eval/num_tokens"] > 0
  assert not os.path.exists(os.path.join(workdir, checkpoints.LOCK_FILE))  # released


def _write_lock(workdir, pid, host=None):
  with open(os.path.join(workdir, checkpoints.LOCK_FILE), "w", encoding="utf-8") as f:
    json.dump({"pid": pid, "host": host or socket.gethostname(), "started": 0}, f)


def test_a_second_trainer_on_a_busy_workdir_stops_with_a_clear_error(tmp_path):
  _write_lock(str(tmp_path), os.getppid())  # a live process on this host
  with pytest.raises(checkpoints.WorkdirBusyError,
                     match=rf"in use by another trainer \(pid {os.getppid()} on host"):
    train.train_and_evaluate(short_tiny(5), str(tmp_path))
  _write_lock(str(tmp_path), 1, host="another-host")  # cannot be checked: busy
  with pytest.raises(checkpoints.WorkdirBusyError, match="another-host"):
    with checkpoints.WorkdirLock(str(tmp_path)):
      pass


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lock(str(tmp_path), dead.pid)
  notes = []
  with checkpoints.WorkdirLock(str(tmp_path), log=notes.append):
    with open(os.path.join(tmp_path, checkpoints.LOCK_FILE), encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()
  assert notes and "stale lock" in notes[0]
  assert not os.path.exists(os.path.join(tmp_path, checkpoints.LOCK_FILE))
