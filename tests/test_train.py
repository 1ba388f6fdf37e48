"""End-to-end training on the `tiny` config, and the trainer's guards."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from armd_jax import orders, train
from armd_jax.train import checkpoints, observe
from armd_jax.train import state as state_lib
from armd_jax.train.settings import OrderConfig, order_config_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# `tiny_run` (tests/conftest.py): the session's one 60-step run of configs/tiny.py.


def test_tiny_run_lowers_the_loss_writes_checkpoints_and_evaluates(tiny_run):
  workdir, final = tiny_run
  records = observe.read_metrics(workdir)
  losses = [r["train/loss"] for r in records if "train/loss" in r]
  assert len(losses) == 6  # log_every 10 over 60 steps
  assert losses[-1] < losses[0] - 1.0, losses  # from ~4.8 (step 10) to ~3
  assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == ["20", "40", "60"]
  evals = [r for r in records if "eval/nll" in r]
  assert [r["step"] for r in evals] == [30, 60]  # mid-run and final
  assert np.isfinite(final["eval/nll"]) and final["eval/nll"] < np.log(259)
  assert final["eval/num_tokens"] == 4 * 8 * 16  # eval.num_batches x batch x seq_len
  assert final["eval/perplexity"] == pytest.approx(np.exp(final["eval/nll"]))


def test_load_trained_returns_the_saved_config_model_ema_params_and_vocab(tiny_run):
  workdir, final = tiny_run
  trained = train.load_trained(workdir)
  raw = train.load_trained(workdir, use_ema=False)
  assert trained.step == 60 and trained.model_config.vocab_size == trained.vocab.vocab_size
  assert trained.config.train.num_steps == 60
  ema_leaf = jax.tree.leaves(trained.params)[0]
  raw_leaf = jax.tree.leaves(raw.params)[0]
  assert ema_leaf.shape == raw_leaf.shape and not np.array_equal(ema_leaf, raw_leaf)
  # The final eval used the EMA params: recompute its NLL from the loaded model.
  tokens = jnp.asarray([trained.vocab.encode("the cat sat on the mat.")[:16]])
  logits = jax.jit(trained.model.apply)(trained.params, tokens,
                                        orders.left_to_right(*tokens.shape))
  assert np.isfinite(np.asarray(logits)).all()


def test_load_trained_raises_a_clear_error_for_a_workdir_without_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    train.load_trained(str(tmp_path))
  checkpoints.save_config(load_config("tiny"), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="checkpoint"):
    train.load_trained(str(tmp_path), with_vocab=False)


def test_restarting_a_finished_run_resumes_at_its_last_step_and_trains_further(tiny_run,
                                                                              tmp_path):
  workdir, _ = tiny_run
  other = str(tmp_path / "copy")
  subprocess.run(["cp", "-r", workdir, other], check=True)
  config = load_config("tiny")
  config.train.num_steps = 65
  train.train_and_evaluate(config, other)
  steps = [r["step"] for r in observe.read_metrics(other) if "train/loss" in r]
  assert steps[-1] == 65 and steps.count(60) == 1  # steps 1-60 were not redone
  assert "65" in os.listdir(checkpoints.checkpoint_dir(other))


def test_init_from_starts_a_fresh_run_from_the_saved_parameters(tiny_run, tmp_path):
  workdir, _ = tiny_run
  config = load_config("tiny")
  config.checkpoint.init_from = workdir
  config.train.num_steps = 1  # warmup: the learning rate of step 0 is exactly 0
  train.train_and_evaluate(config, str(tmp_path))
  source = train.load_trained(workdir, use_ema=False, with_vocab=False)
  started = train.load_trained(str(tmp_path), use_ema=False, with_vocab=False)
  assert started.step == 1
  for a, b in zip(jax.tree.leaves(source.params), jax.tree.leaves(started.params)):
    np.testing.assert_array_equal(a, b)


def test_a_nonfinite_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch):
  real = state_lib.compute_loss

  def poisoned(model, params, batch, rng, step, order, deterministic):
    loss, metrics = real(model, params, batch, rng, step, order, deterministic)
    loss = jnp.where(step >= 24, jnp.nan, loss)  # state.step 24 = the 25th step
    return loss, {**metrics, "loss": loss}

  monkeypatch.setattr(state_lib, "compute_loss", poisoned)
  workdir = str(tmp_path)
  with pytest.raises(observe.NonFiniteError, match=r"at train step 25;.*step 20\) is kept"):
    train.train_and_evaluate(load_config("tiny"), workdir)
  assert sorted(os.listdir(checkpoints.checkpoint_dir(workdir))) == ["20"]


@pytest.mark.parametrize("overrides, message", [
    ({"order.kind": "random"}, "config.order.kind"),
    ({"order.kind": "strided", "order.streams": (1, 3)}, "config.order.streams"),
    ({"optim.schedule": "linear"}, "config.optim.schedule"),
    ({"train.seq_len": 64}, "config.train.seq_len=64 exceeds config.model.max_len"),
    ({"train.global_batch_size": 0}, "config.train.global_batch_size"),
    ({"mesh.shape": (2, 4)}, "config.mesh.shape"),
    ({"model.num_heads": 3}, "ModelConfig.num_heads"),
    ({"model.vocab_size": 10}, "config.model.vocab_size=10 is smaller"),
    ({"sample.num_samples": 1, "sample.streams": 3}, "config.sample.streams"),
])
def test_bad_config_values_raise_an_error_naming_the_field(tmp_path, overrides, message):
  config = load_config("tiny")
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    train.train_and_evaluate(config, str(tmp_path))


def test_unknown_config_fields_raise_an_error_naming_them(tmp_path):
  config = load_config("tiny")
  config.unlock()
  config.optim.momentum = 0.9
  with pytest.raises(ValueError, match=r"\['momentum'\] in config\.optim"):
    train.train_and_evaluate(config, str(tmp_path))


def test_the_main_command_names_an_unknown_config_override(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "armd_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--config.train.num_stepz=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "--config.train.num_stepz" in result.stderr, result.stderr[-2000:]


def test_left_to_right_training_loss_equals_the_exact_eval_nll(tiny_run):
  workdir, _ = tiny_run
  trained = train.load_trained(workdir, with_vocab=False)
  config = trained.config
  config.order.kind = "left_to_right"
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, 259, (2, 16)), jnp.int32),
           "mask": jnp.asarray([[1] * 16, [1] * 10 + [0] * 6], jnp.int32)}
  order = order_config_from(config)

  @jax.jit  # one compile, not one per primitive of the eager forward passes
  def loss_and_sums(params, batch, rng):
    loss, _ = state_lib.compute_loss(trained.model, params, batch, rng, jnp.int32(0), order,
                                     deterministic=True)
    return loss, state_lib.eval_metrics(trained.model, params, batch, rng)

  loss, sums = loss_and_sums(trained.params, batch, jax.random.PRNGKey(0))
  assert float(sums["num_tokens"]) == 26
  np.testing.assert_allclose(loss, sums["nll_sum"] / sums["num_tokens"], rtol=1e-6)


@pytest.mark.parametrize("order, metric", [
    (OrderConfig(kind="left_to_right"), None),
    (OrderConfig(kind="progressive_permutation", i_ar=2, i_perm=10, rho=5), "num_shuffled"),
    (OrderConfig(kind="strided", streams=(1, 2, 4)), "streams"),
    (OrderConfig(kind="masked_diffusion", num_steps=4), None),
])
def test_drawn_block_ids_are_dense_and_follow_the_schedule(order, metric):
  draw = jax.jit(lambda rng, step: orders.draw_block_ids(order, rng, step, 3, 16))
  for step in (0, 5, 20):
    ids, info = draw(jax.random.PRNGKey(step), jnp.int32(step))
    orders.check_block_ids(ids)
    if metric == "num_shuffled":
      assert int(info["order/num_shuffled"]) == int(orders.num_shuffled_schedule(step, 2, 10, 5))
    if metric == "streams":
      s = int(info["order/streams"])
      assert s in (1, 2, 4)
      np.testing.assert_array_equal(ids, orders.strided(3, 16, s))
  if order.kind == "masked_diffusion":
    assert int(ids.max()) <= 4


def test_the_train_step_compiles_once_and_advances_the_step():
  from armd_jax.models import build_model
  from armd_jax.train import partitioning
  from armd_jax.train.settings import MeshConfig, model_config_from, settings_from

  config = load_config("tiny")
  config.model.vocab_size = 259
  settings = settings_from(config)
  model = build_model(model_config_from(config))
  mesh = partitioning.make_mesh(MeshConfig(shape=(1, 1, 1)), jax.devices()[:1])
  rules = partitioning.DEFAULT_RULES
  state, shardings = state_lib.create_train_state(model, settings.optim, 60, 16, 0, mesh, rules)
  batch_shard = partitioning.batch_sharding(mesh, rules)
  step = state_lib.make_train_step(model, settings.order, settings.optim, 60, shardings, batch_shard)
  rng = np.random.default_rng(0)
  losses = []
  for i in range(3):
    batch = {"tokens": rng.integers(0, 259, (8, 16)).astype(np.int32),
             "mask": np.ones((8, 16), np.int32)}
    state, metrics = step(state, partitioning.global_batch(batch, batch_shard))
    losses.append(float(metrics["loss"]))
    assert int(state.step) == i + 1
  assert step._cache_size() == 1  # no silent recompiles between steps
  assert len(set(losses)) == 3


@pytest.mark.slow
def test_the_readme_quickstart_command_runs_end_to_end_and_prints_samples(tmp_path):
  # The README's command with its own overrides for fewer steps, a smaller batch and
  # shorter samples: same corpus (the stdlib), model and sampler.
  result = subprocess.run(
      [sys.executable, "-m", "armd_jax.main", "--config=configs/quickstart.py",
       f"--workdir={tmp_path}", "--config.train.num_steps=2", "--config.train.log_every=2",
       "--config.train.global_batch_size=4", "--config.eval.num_batches=1",
       "--config.sample.length=32"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "step 2/2  loss" in out and "tokens/s" in out and "ETA" in out
  assert "eval at step 2: nll" in out
  assert "2 samples of 32 tokens (armd, 2 stream(s)), 17 network calls:" in out
  assert out.count("--- sample ") == 2
