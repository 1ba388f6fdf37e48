"""A 2x4 (data x model) mesh of 8 simulated CPU devices trains like one device.

Runs in a subprocess because `--xla_force_host_platform_device_count=8` must be set
before JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import importlib.util, json
    import jax, numpy as np
    from armd_jax.models import build_model
    from armd_jax.train import partitioning, state as state_lib
    from armd_jax.train.typed import MeshConfig, model_config_from, settings_from
    jax.config.update("jax_default_matmul_precision", "highest")

    spec = importlib.util.spec_from_file_location("tiny", "configs/tiny.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    config = module.get_config()
    config.model.vocab_size = 259  # not divisible by 4: the embedding stays replicated
    config.model.num_heads = 4
    config.model.dropout_rate = 0.1  # dropout masks must not depend on the sharding
    settings = settings_from(config)
    model = build_model(model_config_from(config))
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 259, (8, 16)).astype(np.int32),
             "mask": np.ones((8, 16), np.int32)}
    batch["mask"][3, 10:] = 0

    def run(shape, devices):
      mesh = partitioning.make_mesh(MeshConfig(shape=shape), devices)
      rules = partitioning.DEFAULT_RULES
      state, shardings = state_lib.create_train_state(model, settings.optim, 100, 16, 0, mesh,
                                                      rules)
      bs = partitioning.batch_sharding(mesh, rules)
      step = state_lib.make_train_step(model, settings.order, settings.optim, 100, shardings, bs, rules)
      hlo = step.lower(state, partitioning.global_batch(batch, bs)).as_text()
      losses = []
      for _ in range(3):
        state, metrics = step(state, partitioning.global_batch(batch, bs))
        losses.append(float(metrics["loss"]))
      p = state.params["params"]
      mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if "mu" in jax.tree_util.keystr(path) and "layer_0']['mlp']['wi']['kernel"
            in jax.tree_util.keystr(path)]
      specs = {"mlp": list(p["layer_0"]["mlp"]["wi"]["kernel"].sharding.spec),
               "embedding": list(p["embedding"]["embedding"].sharding.spec),
               "adam_mu_mlp": list(mu[0].sharding.spec)}
      leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
      return losses, leaves, specs, list(bs.spec), hlo.count("sharding_constraint")

    one = run((1, 1), jax.devices()[:1])
    mesh = run((2, 4), jax.devices())
    diff = max(float(np.abs(a - b).max()) for a, b in zip(one[1], mesh[1]))
    print("RESULT", json.dumps({"devices": jax.device_count(), "loss_one": one[0],
                                "loss_mesh": mesh[0], "param_diff": diff, "specs": mesh[2],
                                "batch_spec": mesh[3],
                                "activation_constraints": mesh[4]}))
""")


@pytest.mark.slow
def test_a_2x4_mesh_gives_the_same_losses_and_params_as_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT ", 1)[1])
  print(out)
  assert out["devices"] == 8
  # Parameters are really sharded over 'model' and the batch over 'data' ...
  assert out["specs"]["mlp"] == out["specs"]["adam_mu_mlp"] == [None, "model"]
  assert out["specs"]["embedding"] == [None, None]  # 259 % 4 != 0: replicated
  assert out["batch_spec"] == ["data", None]
  assert out["activation_constraints"] > 10  # the modules' logical activation constraints
  # ... and three steps agree with one device up to float32 reduction order:
  # sums split over shards round differently (relative ~1e-6 per step).
  for a, b in zip(out["loss_one"], out["loss_mesh"]):
    assert abs(a - b) <= 1e-5 * abs(a), (out["loss_one"], out["loss_mesh"])
  assert out["param_diff"] < 1e-5, out["param_diff"]


@pytest.mark.slow
def test_a_run_trained_on_a_2x4_mesh_loads_on_one_device(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "armd_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--config.mesh.shape=(2, 4)", "--config.train.num_steps=4",
       "--config.train.log_every=2", "--config.model.num_heads=4"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 2, 'model': 4}" in result.stdout
  from armd_jax import train  # this process has one device
  trained = train.load_trained(str(tmp_path))
  assert trained.step == 4
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(trained.params))
