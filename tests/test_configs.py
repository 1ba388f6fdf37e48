"""Every shipped config loads, validates, and traces its train step (jax.eval_shape), so
configs cannot drift from the code. Full sizes are traced abstractly (no memory, no
compute); only the vocabulary size, which comes from the data, is filled in here."""

import dataclasses
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from armd_jax.data import DataConfig
from armd_jax.models import build_model
from armd_jax.train import partitioning
from armd_jax.train import state as state_lib
from armd_jax.train.settings import model_config_from, settings_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs",
                                                                         "*.py")))
# What the data vocabularies of the hub-backed tasks hold (+ our special ids is the data
# package's business; any size >= theirs traces the same program shape-wise).
VOCAB_SIZE = {"lm1b": 30_522 + 2, "openwebtext": 50_257 + 2}
BYTE_VOCAB = 259


def load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_expected_configs_are_shipped():
  for name in ("quickstart", "tiny", "shakespeare", "lm1b_small", "owt_small", "owt_medium",
               "sbp_finetune"):
    assert name in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_documents_its_purpose_result_and_exact_command(name):
  module = load(name)
  doc = module.__doc__ or ""
  assert f"python -m armd_jax.main --config=configs/{name}.py" in doc
  assert "Expected result" in doc


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_its_train_step_traces(name):
  config = load(name).get_config()
  settings = settings_from(config)
  data = DataConfig.from_config(config.data)
  if config.model.vocab_size is None:
    config.model.vocab_size = VOCAB_SIZE.get(data.task, BYTE_VOCAB)
  model_config = model_config_from(config)
  tc = settings.train
  assert tc.seq_len <= model_config.max_len
  if settings.sample.num_samples:
    assert settings.sample.length <= model_config.max_len
  model = build_model(model_config)

  # Trace on a 1-device mesh of the config's axes (the shape is checked separately).
  one_device = dataclasses.replace(settings.mesh, shape=(1,) * len(settings.mesh.shape))
  mesh = partitioning.make_mesh(one_device, jax.devices()[:1])
  rules = partitioning.rules_of(settings.mesh)
  _, abstract, shardings = state_lib.train_state_layout(
      model, settings.optim, tc.num_steps, tc.seq_len, tc.seed, mesh, rules)
  batch_shard = partitioning.batch_sharding(mesh, rules)
  step = state_lib.make_train_step(model, settings.order, settings.optim, tc.num_steps, shardings,
                                   batch_shard)
  batch = {k: jax.ShapeDtypeStruct((tc.global_batch_size, tc.seq_len), jnp.int32)
           for k in ("tokens", "mask")}
  new_state, metrics = jax.eval_shape(step, abstract, batch)
  assert metrics["loss"].shape == () and metrics["loss"].dtype == jnp.float32
  assert jax.tree.structure(new_state) == jax.tree.structure(abstract)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(abstract)):
    assert a.shape == b.shape and a.dtype == b.dtype
