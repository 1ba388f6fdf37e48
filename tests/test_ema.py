"""The parameter EMA is bias-corrected: after step t it is the debiased average
sum_i d^(t-i) (1-d) p_i / (1 - d^t) of the parameters seen, and the initial parameters have
no weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax.train import partitioning, settings
from armd_jax.train import state as state_lib
from conftest import tiny_config


def debiased_average(decay, values):
  """The closed form, in float64: sum_{i<=t} d^(t-i) (1-d) p_i / (1 - d^t), t = len."""
  t = len(values)
  weights = np.array([decay ** (t - i) * (1.0 - decay) for i in range(1, t + 1)])
  return np.tensordot(weights, np.asarray(values, np.float64), axes=1) / (1.0 - decay ** t)


def run_ema(decay, values, start):
  """The EMA tree ({'w': [3]}) after feeding `values[t-1]` as the params of step t."""
  update = jax.jit(state_lib.ema_update, static_argnums=2)
  ema = {"w": jnp.asarray(start, jnp.float32)}
  history = []
  for t, p in enumerate(values, start=1):
    ema = update(ema, {"w": jnp.asarray(p, jnp.float32)}, decay, jnp.int32(t))
    history.append(np.asarray(ema["w"]))
  return history


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.9999])
def test_a_constant_sequence_has_that_constant_as_its_ema_at_every_step(decay):
  """The starting value (here far from the constant) gets no weight at all."""
  c = np.array([1.5, -2.0, 3.25], np.float32)
  for ema in run_ema(decay, [c] * 50, start=np.full(3, 100.0)):
    np.testing.assert_allclose(ema, c, rtol=1e-6)


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_the_ema_of_p_t_equals_t_matches_the_closed_form_at_every_step(decay):
  values = [np.array([t, -t, 0.5 * t], np.float32) for t in range(1, 201)]
  history = run_ema(decay, values, start=np.full(3, 7.0))
  for t in range(1, len(values) + 1):
    np.testing.assert_allclose(history[t - 1], debiased_average(decay, values[:t]),
                               rtol=2e-5, atol=1e-5, err_msg=f"step {t}")


def test_the_effective_decay_is_zero_at_step_one_and_tends_to_the_configured_decay():
  decays = [float(state_lib.ema_decay_at(0.9999, jnp.int32(t))) for t in (1, 2, 10**7)]
  assert decays[0] == 0.0
  np.testing.assert_allclose(decays[1], 0.9999 / 1.9999, rtol=1e-6)  # d (1 - d) / (1 - d^2)
  np.testing.assert_allclose(decays[2], 0.9999, rtol=1e-7)


def test_a_decay_outside_zero_one_is_an_error_naming_the_config_field():
  with pytest.raises(ValueError, match="config.optim.ema_decay=0.0"):
    state_lib.ema_decay_at(0.0, jnp.int32(1))


def test_the_train_step_keeps_the_debiased_ema_so_after_one_step_it_equals_the_params():
  """And after two steps it is the closed-form average of the two steps' parameters."""
  decay = 0.9
  model = armd_jax.build_model(tiny_config(vocab_size=259))
  mesh = partitioning.make_mesh(settings.MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
  rules = partitioning.DEFAULT_RULES
  optim = settings.OptimConfig(ema_decay=decay, warmup_steps=0, learning_rate=1e-2)
  state, shardings = state_lib.create_train_state(model, optim, 10, 8, 0, mesh, rules)
  shard = partitioning.batch_sharding(mesh, rules)
  step = state_lib.make_train_step(model, settings.OrderConfig(kind="left_to_right"), optim, 10,
                                   shardings, shard)
  batch = partitioning.global_batch({"tokens": np.ones((2, 8), np.int32),
                                     "mask": np.ones((2, 8), np.int32)}, shard)
  initial = jax.tree.map(np.asarray, state.params)
  state, _ = step(state, batch)
  first = jax.tree.map(np.asarray, state.params)
  jax.tree.map(lambda e, p: np.testing.assert_allclose(e, p, rtol=1e-6, atol=1e-7),
               jax.tree.map(np.asarray, state.ema_params), first)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial),
                                                      jax.tree.leaves(first)))
  state, _ = step(state, batch)
  second = jax.tree.map(np.asarray, state.params)
  expected = jax.tree.map(lambda a, b: debiased_average(decay, [a, b]), first, second)
  jax.tree.map(lambda e, x: np.testing.assert_allclose(e, x, rtol=1e-5, atol=1e-6),
               jax.tree.map(np.asarray, state.ema_params), expected)
