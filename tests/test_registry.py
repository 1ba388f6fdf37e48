"""The kind and order registries, typed settings into the step, defaults, MDLM validation."""

import dataclasses
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax import orders, registry
from armd_jax.eval import perplexity
from armd_jax.train import defaults, loop
from armd_jax.train import settings as settings_lib
from armd_jax.train import state as state_lib
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _init(kind, length=8):
  model = armd_jax.build_model(tiny_config(kind=kind))
  tokens = jnp.zeros((1, length), jnp.int32)
  return model, nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens,
                                         orders.left_to_right(1, length)))


def test_every_kind_has_one_module_and_one_registry_row_and_unknown_kinds_name_the_known_ones():
  assert tuple(registry.KINDS) == armd_jax.models.MODEL_KINDS == tuple(armd_jax.models.MODULES)
  for name, spec in registry.KINDS.items():
    assert isinstance(armd_jax.build_model(tiny_config(kind=name)), armd_jax.models.MODULES[name])
    assert spec.eval_orders and all(o in orders.EVAL_ORDERS for o in spec.eval_orders)
  with pytest.raises(ValueError, match=r"'armd', 'ar', 'mdlm'"):
    tiny_config(kind="gpt")


def test_importing_the_models_imports_no_registry_sampler_trainer_or_data_layer():
  """Models sit at the bottom of the import graph: no circle can run through them."""
  code = ("import sys, armd_jax.models; "
          "print(sorted(m for m in sys.modules if m.split('.')[:2] in ("
          "['armd_jax', 'registry'], ['armd_jax', 'sampling'], ['armd_jax', 'train'], "
          "['armd_jax', 'data'])))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]", out.stdout


def test_training_and_evaluation_validate_orders_against_the_one_order_registry():
  for name in orders.TRAIN_ORDERS:
    settings_lib.OrderConfig(kind=name)
  for name in orders.EVAL_ORDERS:
    perplexity.EvalOrder(name)
  with pytest.raises(ValueError, match="config.order.kind"):
    settings_lib.OrderConfig(kind="random")  # an evaluation-only order
  with pytest.raises(ValueError, match="EvalOrder.name"):
    perplexity.EvalOrder("progressive_permutation")  # a training-only schedule
  assert perplexity.likelihood_label("armd", perplexity.EvalOrder("strided", streams=2)) == \
      "exact"
  assert perplexity.likelihood_label("armd", perplexity.EvalOrder("random")) == "bound"
  with pytest.raises(ValueError, match="cannot be evaluated"):
    perplexity.likelihood_label("ar", perplexity.EvalOrder("random"))


def test_training_and_evaluation_draw_the_same_strided_ids():
  train_ids, info = orders.draw_block_ids(settings_lib.OrderConfig(kind="strided", streams=(4,)),
                                          jax.random.PRNGKey(0), jnp.int32(0), 2, 16)
  eval_ids, _ = orders.draw_block_ids(perplexity.EvalOrder("strided", streams=4),
                                      jax.random.PRNGKey(1), jnp.int32(0), 2, 16)
  chex.assert_trees_all_equal(train_ids, eval_ids, orders.strided(2, 16, 4))
  assert int(info["order/streams"]) == 4


@pytest.mark.parametrize("length, streams, steps", [(16, 1, 16), (16, 4, 7), (12, 2, 7)])
def test_mdlm_generation_has_one_step_rule_matching_armds_call_count(monkeypatch, length,
                                                                     streams, steps):
  """Every entry point (trainer samples, `sample`, `evaluate`, compare.py) calls the
  registry's generator, so one recorded call covers them all."""
  from armd_jax.sampling import mdlm as mdlm_sampling
  seen = {}
  monkeypatch.setattr(mdlm_sampling, "generate", lambda *a, **k: seen.update(k))
  registry.get_kind("mdlm").generate(None, None, jax.random.PRNGKey(0), batch_size=1,
                                     length=length, streams=streams)
  assert seen["num_steps"] == steps == orders.strided(1, length, streams).max()
  assert registry.get_kind("mdlm").sampler_name(length, streams).startswith(f"ancestral T={steps}")


def test_the_ar_generator_refuses_streams():
  with pytest.raises(ValueError, match="streams must be 1"):
    registry.get_kind("ar").generate(None, None, jax.random.PRNGKey(0), batch_size=1,
                                     length=8, streams=2)


def test_compute_loss_and_make_train_step_take_typed_order_settings_not_the_config_dict():
  model, params = _init("armd")
  batch = {"tokens": jnp.ones((2, 8), jnp.int32), "mask": jnp.ones((2, 8), jnp.int32)}
  config = defaults.base_config()
  with pytest.raises(TypeError, match="OrderConfig"):
    state_lib.compute_loss(model, params, batch, jax.random.PRNGKey(0), jnp.int32(0),
                           config, deterministic=True)
  with pytest.raises(TypeError, match="OrderConfig"):
    state_lib.make_train_step(model, config, settings_lib.OptimConfig(), 10, None, None)
  loss, metrics = state_lib.compute_loss(model, params, batch, jax.random.PRNGKey(0),
                                         jnp.int32(0),
                                         settings_lib.OrderConfig(kind="left_to_right"),
                                         deterministic=True)
  chex.assert_shape(loss, ())
  chex.assert_tree_all_finite(metrics)


def test_the_train_step_recompile_guard_rejects_a_batch_of_another_shape():
  from armd_jax.train import partitioning
  model = armd_jax.build_model(tiny_config(vocab_size=259))
  mesh = partitioning.make_mesh(settings_lib.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
  rules = partitioning.DEFAULT_RULES
  optim = settings_lib.OptimConfig(ema_decay=0.5)
  state, shardings = state_lib.create_train_state(model, optim, 10, 8, 0, mesh, rules)
  shard = partitioning.batch_sharding(mesh, rules)
  step = state_lib.make_train_step(model, settings_lib.OrderConfig(kind="left_to_right"), optim,
                                   10, shardings, shard)

  def batch(n):
    return partitioning.global_batch({"tokens": np.ones((2, n), np.int32),
                                      "mask": np.ones((2, n), np.int32)}, shard)

  before = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state)
  state, _ = step(state, batch(8))
  state, _ = step(state, batch(8))
  chex.assert_trees_all_equal_shapes_and_dtypes(before, state)
  with pytest.raises(AssertionError, match="trace"):
    step(state, batch(6))  # would silently recompile without the guard


def test_train_steps_built_in_turn_lower_to_one_program_and_keep_their_own_guards():
  """Identical steps made one after another in a process lower to the same program text
  (the persistent compilation cache keys on it, module name included), while each step's
  recompile guard counts only its own traces."""
  from armd_jax.train import partitioning
  model = armd_jax.build_model(tiny_config(vocab_size=259))
  mesh = partitioning.make_mesh(settings_lib.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
  rules = partitioning.DEFAULT_RULES
  optim = settings_lib.OptimConfig()
  state, shardings = state_lib.create_train_state(model, optim, 10, 8, 0, mesh, rules)
  shard = partitioning.batch_sharding(mesh, rules)
  batch = partitioning.global_batch({"tokens": np.ones((2, 8), np.int32),
                                     "mask": np.ones((2, 8), np.int32)}, shard)
  order = settings_lib.OrderConfig(kind="left_to_right")
  steps = [state_lib.make_train_step(model, order, optim, 10, shardings, shard)
           for _ in range(2)]
  texts = [step.lower(state, batch).as_text() for step in steps]  # one trace each
  assert "@jit_train_step" in texts[0] and texts[0] == texts[1]


def test_base_config_is_derived_from_the_typed_defaults():
  config = defaults.base_config()
  for name, cls in defaults.SECTION_TYPES.items():
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert set(config[name].keys()) == set(fields), name
    for key, f in fields.items():
      if f.default is not dataclasses.MISSING and f.default is not None:
        assert config[name][key] == f.default, (name, key)
  assert config.model.vocab_size is None and config.model.num_two_stream_layers is None
  settings = settings_lib.settings_from(config)  # every section validates at its defaults
  assert settings.order == settings_lib.OrderConfig()
  assert settings_lib.model_config_from(config, 7) == armd_jax.ModelConfig(vocab_size=7)


def test_a_config_file_imports_no_orbax_grain_or_optax():
  code = ("import sys\nfrom armd_jax.train.defaults import config_from_file\n"
          "config_from_file('configs/shakespeare.py')\n"
          "heavy = sorted(m for m in ('orbax', 'grain', 'optax', 'tensorflow', 'seqio') "
          "if m in sys.modules)\nassert not heavy, heavy\n")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)


def test_mdlm_validation_accuracy_is_over_masked_tokens_and_each_key_draws_anew():
  model, params = _init("mdlm", 16)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, 13, (4, 16)), jnp.int32),
           "mask": jnp.ones((4, 16), jnp.int32)}
  a = state_lib.eval_metrics(model, params, batch, jax.random.PRNGKey(1))
  b = state_lib.eval_metrics(model, params, batch, jax.random.PRNGKey(2))
  assert float(a["nll_sum"]) != float(b["nll_sum"])  # the key drives the draws
  chex.assert_trees_all_close(a, state_lib.eval_metrics(model, params, batch,
                                                        jax.random.PRNGKey(1)))
  assert float(a["num_tokens"]) == 64
  assert 0 < float(a["num_scored"]) < 64  # masked tokens only (means of 4 draws)
  assert float(a["correct_sum"]) <= float(a["num_scored"])


class _FakeDatasets:

  def __init__(self, batches):
    self.batches = batches

  def eval_batches(self, max_batches=None):
    return iter(self.batches[:max_batches])


def test_run_eval_gives_each_batch_its_own_key_and_divides_hits_by_scored_tokens():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  shard = NamedSharding(mesh, PartitionSpec("data", None))
  keys = []

  def eval_step(params, batch, rng):
    keys.append(np.asarray(jax.random.key_data(rng) if jnp.issubdtype(rng.dtype,
                                                                      jax.dtypes.prng_key)
                           else rng))
    return {"nll_sum": 10.0, "correct_sum": 3.0, "num_tokens": 20.0, "num_scored": 6.0}

  class State:
    params, ema_params = {}, None

  config = defaults.base_config()
  config.eval.num_batches = 3
  batch = {"tokens": np.zeros((2, 4), np.int32), "mask": np.ones((2, 4), np.int32)}
  out = loop.run_eval(eval_step, State, _FakeDatasets([batch] * 5), shard,
                      settings_lib.settings_from(config))
  assert len(keys) == 3 and len({k.tobytes() for k in keys}) == 3
  assert out["eval/accuracy"] == pytest.approx(9.0 / 18.0)  # hits / scored, not / tokens
  assert out["eval/nll"] == pytest.approx(30.0 / 60.0)
