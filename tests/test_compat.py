"""Users' checkpoints survive the package's reorganisation: a `tiny` workdir written by
commit 18ea58a (before the modules moved; tests/fixtures/make_tiny_before_moves.py)
restores with today's code, samples exactly the tokens that commit sampled, and resumes
training."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from armd_jax import sampling, train
from armd_jax.train.defaults import config_from_file

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "tiny_before_moves")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def old_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(FIXTURE, workdir)  # tests never write into the fixture
  return workdir


def expected():
  with open(os.path.join(FIXTURE, "expected_samples.json"), encoding="utf-8") as f:
    return json.load(f)


def test_an_older_checkpoint_restores_and_samples_the_tokens_it_sampled_then(old_workdir):
  trained = train.load_trained(old_workdir)
  assert trained.step == expected()["step"] == 20
  for streams in (1, 4):
    tokens = sampling.generate(trained.model, trained.params, jax.random.PRNGKey(7),
                               batch_size=2, length=16, streams=streams).tokens
    np.testing.assert_array_equal(np.asarray(tokens), expected()[f"streams_{streams}"])


@pytest.mark.slow
def test_an_older_workdir_resumes_training_where_it_stopped(old_workdir, capsys):
  config = config_from_file(os.path.join(REPO, "configs", "tiny.py"))
  config.train.num_steps = 22
  config.train.eval_every = 0
  config.train.log_every = 1
  config.eval.num_batches = 1
  metrics = train.train_and_evaluate(config, old_workdir)
  assert np.isfinite(metrics["eval/nll"])
  steps = [r["step"] for r in train.read_metrics(old_workdir) if "train/loss" in r]
  assert steps == [21, 22]  # steps 1..20 ran in the old commit
  assert "resuming from step 20" in capsys.readouterr().out
