"""A checkpoint written on one mesh (fsdp=8) restores on another (fsdp=2 x tensor=4, and
one device) with parameters and optimiser state bitwise equal, and training continues
there as it went on on the original mesh.

Subprocesses: the simulated device count must be set before JAX starts.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from armd_jax import train

from conftest import host_devices_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import importlib.util, json, shutil, sys
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from armd_jax import train
    from armd_jax.models import build_model
    from armd_jax.train import checkpoints, partitioning, state as state_lib
    from armd_jax.train.settings import MeshConfig, model_config_from, settings_from

    root = sys.argv[1]
    spec = importlib.util.spec_from_file_location("tiny", "configs/tiny.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)

    def config(num_steps, shape, table):
      c = module.get_config()
      c.model.num_heads = 4
      c.train.num_steps = num_steps
      c.train.checkpoint_every = 4
      c.train.eval_every = 0
      c.train.log_every = 1
      c.eval.num_batches = 1
      c.mesh.shape = shape
      c.mesh.rule_table = table
      return c

    # 1. Train 6 steps on fsdp=8, checkpointing at steps 4 and 6: its steps 5-6 are what
    #    continuing from step 4 must give on any mesh.
    train.train_and_evaluate(config(6, (1, 8, 1), "fsdp"), f"{root}/fsdp8")
    saved, step = checkpoints.restore_state_arrays(f"{root}/fsdp8", step=4)  # one device
    assert step == 4

    # 2. Restore onto fsdp=2 x tensor=4 (8 devices) and onto one device.
    out = {}
    for name, shape, devices in (("fsdp2_tensor4", (1, 2, 4), jax.devices()),
                                 ("one_device", (1, 1, 1), jax.devices()[:1])):
      c = config(6, shape, "fsdp_tensor")
      c.model.vocab_size = 259
      settings = settings_from(c)
      mesh = partitioning.make_mesh(settings.mesh, devices)
      rules = partitioning.rules_of(settings.mesh)
      _, abstract, _ = state_lib.train_state_layout(
          build_model(model_config_from(c)), settings.optim, 6, 16, 0, mesh, rules)
      manager = checkpoints.make_manager(f"{root}/fsdp8", 3, False, read_only=True)
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
      manager.close()
      # `saved` is a dict (sorted keys); the TrainState flattens in field order, so
      # compare field by field (inside a field both flatten alike).
      pairs = []
      for field in ("step", "rng", "params", "ema_params", "opt_state"):
        got = jax.tree_util.tree_leaves_with_path(getattr(state, field))
        want = jax.tree.leaves(saved[field])
        assert len(got) == len(want), field
        pairs += [(field + jax.tree_util.keystr(p), x, y) for (p, x), y in zip(got, want)]
      got = pairs
      mismatches = [name for name, x, y in pairs
                    if np.shape(x) != np.shape(y) or not np.array_equal(np.asarray(x),
                                                                         np.asarray(y))]
      layouts = [x.sharding == t.sharding for x, t in zip(jax.tree.leaves(state),
                                                          jax.tree.leaves(abstract))]
      wi = state.params["params"]["layer_0"]["mlp"]["wi"]["kernel"]
      out[name] = {"mismatches": mismatches, "leaves": len(got), "on_target": all(layouts),
                   "wi_spec": [a for a in wi.sharding.spec], "wi_devices": len(wi.devices())}

    # 3. Training continues from step 4 on the new mesh.
    shutil.copytree(f"{root}/fsdp8", f"{root}/continued_fsdp2_tensor4")
    shutil.rmtree(checkpoints.checkpoint_dir(f"{root}/continued_fsdp2_tensor4") / "6")
    train.train_and_evaluate(config(6, (1, 2, 4), "fsdp_tensor"),
                             f"{root}/continued_fsdp2_tensor4")
    print("RESULT", json.dumps(out))
""")


def run(args, devices, **kw):
  env = host_devices_env(devices)
  result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=2400, **kw)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  return result.stdout


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in train.read_metrics(workdir) if "train/loss" in r}


def losses_after_resume(workdir):
  """{5: loss, 6: loss} as the run resumed at step 4 wrote them, after the records of
  steps 1..6 copied from the fsdp=8 run (metrics.jsonl is appended to)."""
  records = [(r["step"], r["train/loss"]) for r in train.read_metrics(workdir)
             if "train/loss" in r]
  assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6, 5, 6], records
  return dict(records[-2:])


@pytest.mark.slow
def test_a_fsdp8_checkpoint_restores_bitwise_on_other_meshes_and_training_continues(tmp_path):
  stdout = run([sys.executable, "-c", SCRIPT, str(tmp_path)], devices=8)
  out = json.loads(stdout.split("RESULT ", 1)[1])
  print(out)
  for name in ("fsdp2_tensor4", "one_device"):
    assert out[name]["mismatches"] == [], out[name]  # params, Adam moments, EMA, step, rng
    assert out[name]["leaves"] > 20 and out[name]["on_target"]
  assert out["fsdp2_tensor4"]["wi_spec"] == ["fsdp", "tensor"]
  assert out["fsdp2_tensor4"]["wi_devices"] == 8 and out["one_device"]["wi_devices"] == 1

  # One device: the same workdir continues through the CLI in a 1-device process.
  one = str(tmp_path / "continued_one_device")
  shutil.copytree(str(tmp_path / "fsdp8"), one)
  shutil.rmtree(os.path.join(one, "checkpoints", "6"))  # as if stopped after step 4
  stdout = run([sys.executable, "-m", "armd_jax.main", "--config=configs/tiny.py",
                f"--workdir={one}", "--config.model.num_heads=4", "--config.train.num_steps=6",
                "--config.train.checkpoint_every=4", "--config.train.eval_every=0",
                "--config.train.log_every=1", "--config.eval.num_batches=1",
                "--config.mesh.shape=(1, 1, 1)"], devices=1)
  assert "resuming from step 4" in stdout

  reference = losses(str(tmp_path / "fsdp8"))  # uninterrupted on fsdp=8
  for workdir in ("continued_fsdp2_tensor4", "continued_one_device"):
    got = losses_after_resume(str(tmp_path / workdir))
    for step in (5, 6):  # after the restore: same data, same state, same step rng
      assert abs(got[step] - reference[step]) <= 1e-5 * abs(reference[step]), (
          workdir, got, reference)


def test_the_target_free_restore_reads_any_saved_step_as_the_trainer_saved_it(tiny_workdir):
  """`restore_state_arrays` builds its target from the checkpoint's metadata (the path
  the mesh-change restore takes), on the shared one-device `tiny` run: the newest step
  is 60 and its params are the raw params `load_trained` restores with its own target;
  an older step comes back with its own step counter and other params."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from armd_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  state, step = checkpoints.restore_state_arrays(tiny_workdir)
  trained = train.load_trained(tiny_workdir, use_ema=False, with_vocab=False)
  assert step == 60 == int(state["step"]) == trained.step
  leaves = jax.tree.leaves(trained.params)
  assert len(jax.tree.leaves(state["params"])) == len(leaves)
  for a, b in zip(jax.tree.leaves(state["params"]), leaves):
    np.testing.assert_array_equal(a, b)
  older, older_step = checkpoints.restore_state_arrays(tiny_workdir, step=20)
  assert older_step == 20 == int(older["step"])
  assert not np.array_equal(jax.tree.leaves(older["params"])[0], leaves[0])
