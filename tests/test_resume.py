"""Resume decisions: a checkpoint of another model is a stop that moves nothing, one
saved by another process count restores with a restarted data iterator, only read
damage moves a step aside (and the same damage twice stops), any other restore failure
propagates (two real processes agree on all of it without hanging:
tests/test_multiprocess.py).

Each behaviour test fails on the code before process 0's resume decision: that code
called every restore failure damage, moved every step aside and started over.
"""

import glob
import json
import os
import shutil

import pytest

from armd_jax import train
from armd_jax.train import checkpoints

from test_checkpoints import short_tiny


def test_identity_fields_skip_how_the_network_computes_and_name_what_differs():
  """Shapes, vocabulary size, kind and tokenizer are compared; attention, remat, dtype
  and dropout may change between resumes; a field an older config.json lacks is skipped."""
  saved = {"model": {"d_model": 32, "kind": "armd", "vocab_size": 259, "remat": "none",
                     "attention": "xla"},
           "data": {"vocab": None, "task": "synthetic"}}
  now = {"model": {"d_model": 64, "kind": "armd", "vocab_size": 259, "remat": "full",
                   "attention": "pallas", "rope_base": 1e4},
         "data": {"vocab": "byte", "task": "lm1b"}}
  assert checkpoints.config_differences(saved, now) == [
      ("data.vocab", None, "byte"), ("model.d_model", 32, 64)]
  assert checkpoints.config_differences(saved, saved) == []


def test_one_process_agrees_with_itself_and_raises_its_own_error_not_the_failure_type():
  """`agree` on one process: the decision comes back as decided, and a decider's error
  propagates as itself (only the other processes of a run raise `failure`)."""
  from armd_jax.train import agree  # pylint: disable=import-outside-toplevel

  assert agree.agree(lambda: {"steps": [20, 10]}, "reading") == {"steps": [20, 10]}
  with pytest.raises(KeyError, match="gone"):
    agree.agree(lambda: {}["gone"], "reading", failure=checkpoints.ResumeError)
  assert agree.first_line(ValueError("first\nsecond")) == "first"
  assert agree.first_line(ValueError()) == "ValueError"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 20 steps with checkpoints at steps 10 and 20 (copied by each test)."""
  workdir = str(tmp_path_factory.mktemp("resume") / "trained")
  train.train_and_evaluate(short_tiny(20), workdir)
  return workdir


def copy_of(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def listing(workdir):
  """{relative path: size} of every file under the workdir's checkpoint folders."""
  out = {}
  for folder in (checkpoints.CHECKPOINT_DIR, checkpoints.DAMAGED_DIR):
    for path in glob.glob(os.path.join(workdir, folder, "**"), recursive=True):
      if os.path.isfile(path):
        out[os.path.relpath(path, workdir)] = os.path.getsize(path)
  return out


def truncate_arrays(workdir, step):
  """Cuts every array data file of the checkpoint at `step` to 8 bytes."""
  files = glob.glob(os.path.join(checkpoints.checkpoint_dir(workdir), str(step), "state", "**",
                                 "d", "*"), recursive=True)
  assert files
  for name in files:
    with open(name, "r+b") as f:
      f.truncate(8)


@pytest.mark.slow
def test_a_changed_d_model_stops_naming_the_field_and_moves_nothing(trained, tmp_path):
  """Old code: both steps 'damaged', moved aside, training from step 0, config.json
  overwritten."""
  workdir = copy_of(trained, tmp_path)
  before = listing(workdir)
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    saved_config = f.read()
  config = short_tiny(30)
  config.model.d_model = 64
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert "config.model.d_model: saved 32, now 64" in message
  assert "another --workdir" in message and "config.checkpoint.init_from" in message
  assert listing(workdir) == before  # every checkpoint where it was, nothing damaged
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    assert f.read() == saved_config


@pytest.mark.slow
def test_a_checkpoint_of_another_process_count_restores_the_state_and_restarts_the_data(
    trained, tmp_path, capsys):
  """Step 20's iterator state as two processes would have saved it, resumed by one:
  the state comes back, the iterator restarts at global batch 20 with a warning.
  Old code: grain raised for the missing process_0-of-1.json, step 20 was moved aside."""
  workdir = copy_of(trained, tmp_path)
  data = os.path.join(checkpoints.checkpoint_dir(workdir), "20", "data")
  os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
  shutil.copy(os.path.join(data, "process_0-of-2.json"), os.path.join(data, "process_1-of-2.json"))
  capsys.readouterr()
  train.train_and_evaluate(short_tiny(30), workdir)
  printed = capsys.readouterr().out
  assert ("warning: checkpoint at step 20: its data-iterator state was saved by 2 process(es), "
          "this run has 1") in printed
  assert "restarts at global batch 20" in printed
  assert "resuming from step 20" in printed
  assert not os.path.exists(os.path.join(workdir, checkpoints.DAMAGED_DIR))
  with open(os.path.join(checkpoints.checkpoint_dir(workdir), "30", "data",
                         "process_0-of-1.json")) as f:
    assert json.load(f)["next_index"] == 30  # batches 20..29 read after the restart


@pytest.mark.slow
def test_truncated_arrays_move_the_newest_step_aside_and_resume_from_the_older(
    trained, tmp_path, capsys):
  """The damaged newest step is reported, the reason naming what the file check found (a
  truncated file: OUT_OF_RANGE), and moved aside; training resumes from the older step,
  saves step 20 anew, evaluates at the end and releases the workdir lock."""
  from armd_jax.train import lock  # pylint: disable=import-outside-toplevel
  workdir = copy_of(trained, tmp_path)
  truncate_arrays(workdir, 20)
  capsys.readouterr()
  out = train.train_and_evaluate(short_tiny(30), workdir)
  printed = capsys.readouterr().out
  assert "checkpoint at step 20 is damaged (unreadable array" in printed
  assert "(OUT_OF_RANGE): " in printed
  assert "resuming from step 10" in printed
  assert os.path.isdir(os.path.join(workdir, checkpoints.DAMAGED_DIR, "20"))
  assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == ["10", "20", "30"]
  assert out["eval/num_tokens"] > 0
  assert not lock.lock_path(workdir).exists()  # released


@pytest.mark.slow
def test_the_same_damage_in_the_next_older_step_stops_and_moves_only_the_first(
    trained, tmp_path):
  """Old code: both moved aside, training restarted from step 0."""
  workdir = copy_of(trained, tmp_path)
  truncate_arrays(workdir, 20)
  truncate_arrays(workdir, 10)
  with pytest.raises(checkpoints.ResumeError,
                     match=r"step 10 is damaged the same way as step 20 \(unreadable array"):
    train.train_and_evaluate(short_tiny(30), workdir)
  assert os.listdir(checkpoints.checkpoint_dir(workdir)) == ["10"]
  assert os.listdir(os.path.join(workdir, checkpoints.DAMAGED_DIR)) == ["20"]


@pytest.mark.slow
@pytest.mark.parametrize("error", [MemoryError("out of memory"),
                                   RuntimeError("RESOURCE_EXHAUSTED: out of memory while "
                                                "allocating 3.2G")])
def test_a_restore_failure_that_is_not_damage_propagates_and_moves_nothing(
    trained, tmp_path, monkeypatch, error):
  """The files read back whole, so the error is the restore's own. Old code: both steps
  moved aside as 'damaged', training restarted from step 0."""
  workdir = copy_of(trained, tmp_path)
  before = listing(workdir)

  def failing_restore(*args, **kwargs):
    raise error

  monkeypatch.setattr(checkpoints, "restore", failing_restore)
  with pytest.raises(type(error), match="out of memory"):
    train.train_and_evaluate(short_tiny(30), workdir)
  assert listing(workdir) == before
