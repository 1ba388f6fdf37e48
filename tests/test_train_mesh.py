"""Every rule table on 8 simulated CPU devices trains like one device, and a run trained
on a mesh loads on one device.

Runs in subprocesses because `--xla_force_host_platform_device_count=8` must be set
before JAX starts.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from conftest import host_devices_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import importlib.util, json
    import jax, numpy as np
    from armd_jax.models import build_model
    from armd_jax.train import partitioning, state as state_lib
    from armd_jax.train.settings import MeshConfig, model_config_from, settings_from
    jax.config.update("jax_default_matmul_precision", "highest")

    spec = importlib.util.spec_from_file_location("tiny", "configs/tiny.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 259, (8, 16)).astype(np.int32),
             "mask": np.ones((8, 16), np.int32)}
    batch["mask"][3, 10:] = 0

    def run(shape, table, devices, attention="xla"):
      config = module.get_config()
      config.model.vocab_size = 259  # not divisible by 2 or 4: the vocab dim stays whole
      config.model.num_heads = 4
      config.model.dropout_rate = 0.1  # dropout masks must not depend on the sharding
      config.model.attention = attention
      config.model.pallas_block_q = config.model.pallas_block_kv = 8
      settings = settings_from(config)
      model = build_model(model_config_from(config))
      mesh = partitioning.make_mesh(MeshConfig(shape=shape, rule_table=table), devices)
      rules = partitioning.RULE_TABLES[table]
      partitioning.check_mesh(mesh, rules)
      state, shardings = state_lib.create_train_state(model, settings.optim, 100, 16, 0, mesh,
                                                      rules)
      bs = partitioning.batch_sharding(mesh, rules)
      step = state_lib.make_train_step(model, settings.order, settings.optim, 100, shardings, bs, rules)
      lowered = step.lower(state, partitioning.global_batch(batch, bs))
      hlo, compiled = lowered.as_text(), lowered.compile()  # one compile per table
      losses = []
      for _ in range(3):
        state, metrics = compiled(state, partitioning.global_batch(batch, bs))
        losses.append(float(metrics["loss"]))
      p = state.params["params"]
      mu = [x for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
            if "mu" in jax.tree_util.keystr(path) and "layer_0']['mlp']['wi']['kernel"
            in jax.tree_util.keystr(path)]
      spec = lambda x: [a if a is None or isinstance(a, str) else list(a)
                        for a in x.sharding.spec]
      specs = {"mlp": spec(p["layer_0"]["mlp"]["wi"]["kernel"]),
               "query": spec(p["layer_0"]["attn"]["query"]["kernel"]),
               "embedding": spec(p["embedding"]["embedding"]),
               "adam_mu_mlp": spec(mu[0]), "ema_mlp": spec(
                   state.ema_params["params"]["layer_0"]["mlp"]["wi"]["kernel"]),
               "batch": [list(bs.spec[0])] + list(bs.spec[1:])}
      leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.opt_state))]
      return {"losses": losses, "leaves": leaves, "specs": specs,
              "constraints": hlo.count("sharding_constraint"),
              "shard_map": hlo.count("shard_map") + hlo.count("manual")}

    one = run((1, 1, 1), "fsdp_tensor", jax.devices()[:1])
    out = {"devices": jax.device_count(), "one": one["losses"]}
    for name, shape, table, attention in [
        ("data_parallel", (8, 1, 1), "data_parallel", "xla"),
        ("fsdp", (2, 4, 1), "fsdp", "xla"),
        ("fsdp_tensor", (2, 2, 2), "fsdp_tensor", "xla"),
        ("fsdp_tensor_pallas", (1, 2, 4), "fsdp_tensor", "pallas")]:
      r = run(shape, table, jax.devices(), attention)
      diff = max(float(np.abs(a - b).max()) for a, b in zip(one["leaves"], r["leaves"]))
      out[name] = {"losses": r["losses"], "diff": diff, "specs": r["specs"],
                   "constraints": r["constraints"], "shard_map": r["shard_map"]}
    print("RESULT", json.dumps(out))
""")

EXPECTED_SPECS = {  # layer_0 MLP wi kernel [embed, mlp], query kernel [embed, heads, kv]
    "data_parallel": ([None, None], [None, None, None]),
    "fsdp": (["fsdp", None], ["fsdp", None, None]),
    "fsdp_tensor": (["fsdp", "tensor"], ["fsdp", "tensor", None]),
    "fsdp_tensor_pallas": (["fsdp", "tensor"], ["fsdp", "tensor", None]),
}


@pytest.mark.slow
def test_every_rule_table_gives_the_same_losses_and_state_as_one_device():
  env = host_devices_env(8)
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT ", 1)[1])
  print(json.dumps(out, indent=1))
  assert out["devices"] == 8
  for name, (mlp, query) in EXPECTED_SPECS.items():
    r = out[name]
    # Parameters, Adam moments and EMA are laid out by the table ...
    assert r["specs"]["mlp"] == r["specs"]["adam_mu_mlp"] == r["specs"]["ema_mlp"] == mlp, name
    assert r["specs"]["query"] == query, name
    # [vocab 259, embed 32]: 259 divides by no axis, so only the embed dim is split.
    assert r["specs"]["embedding"] == [None, None if name == "data_parallel" else "fsdp"]
    assert r["specs"]["batch"] == [["data", "fsdp"], None]  # batch over data x fsdp
    assert r["constraints"] > 10  # the modules' logical activation constraints
    # ... and three steps agree with one device up to float32 reduction order (sums
    # split over shards round differently, relative ~1e-6 per step).
    for a, b in zip(out["one"], r["losses"]):
      assert abs(a - b) <= 1e-5 * abs(a), (name, out["one"], r["losses"])
    assert r["diff"] < 1e-5, (name, r["diff"])  # parameters and Adam moments
  assert out["fsdp_tensor_pallas"]["shard_map"] > 0  # the kernel ran inside shard_map


@pytest.mark.slow
def test_a_run_trained_on_a_fsdp_tensor_mesh_loads_on_one_device(tmp_path):
  env = host_devices_env(8)
  result = subprocess.run(
      [sys.executable, "-m", "armd_jax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--config.mesh.shape=(1, 2, 4)", "--config.train.num_steps=4",
       "--config.train.log_every=2", "--config.model.num_heads=4"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 4}" in result.stdout
  from armd_jax import train  # this process has one device
  trained = train.load_trained(str(tmp_path))
  assert trained.step == 4
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(trained.params))
