"""The prepared device script runs in its CPU smoke mode and imports (and traces the
trainer's step) without grain, seqio, ml-collections or TensorFlow, and the kernel
benchmark imports with jax alone (both run on machines that lack the data stack)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONLY_JAX = textwrap.dedent("""
    import runpy, sys
    class Refuse:  # what a machine with only jax installed lacks
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flax", "optax", "orbax", "chex", "grain", "seqio",
                                  "ml_collections", "clu", "tensorflow"):
          raise ImportError("only jax here: " + name)
    sys.meta_path.insert(0, Refuse())
    module = runpy.run_path(sys.argv[1], run_name="imported")
    assert callable(module["main"]) and module["flash"].block_causal_flash_attention
    print("IMPORT_OK")
""")


def test_attention_kernel_benchmark_imports_with_only_jax():
  script = os.path.join(ROOT, "benchmarks", "attention_kernel.py")
  result = subprocess.run([sys.executable, "-c", ONLY_JAX, script], capture_output=True,
                          text=True, timeout=300, check=False, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and "IMPORT_OK" in result.stdout, result.stderr[-3000:]


DEVICE_SUITE_IMPORTS = textwrap.dedent("""
    import sys
    class Refuse:  # what the GPU machine lacks: the data and config stack
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("grain", "seqio", "ml_collections", "clu", "tensorflow",
                                  "tensorflow_datasets"):
          raise ImportError("not on the device: " + name)
    sys.meta_path.insert(0, Refuse())
    import benchmarks.device_suite as suite
    import armd_jax.train.state
    import attention_kernel
    # The trainer's own step (not a copy), built and traced with those imports refused.
    assert suite.state_lib.make_train_step is armd_jax.train.state.make_train_step
    assert suite.attention_kernel is attention_kernel
    config = suite.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2,
                               mlp_dim=64, max_len=16)
    step, state, data = suite.train_step_fn(config, 2, 16)
    assert state.ema_params is not None  # the EMA is part of the timed step
    assert data["tokens"].shape == (2, 16)
    step.lower(state, data)
    print("IMPORT_OK")
""")


def test_device_suite_imports_and_traces_the_train_step_without_the_data_stack():
  result = subprocess.run([sys.executable, "-c", DEVICE_SUITE_IMPORTS], capture_output=True,
                          text=True, timeout=600, check=False, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and "IMPORT_OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.slow
def test_device_suite_smoke_mode_runs_every_section_on_cpu(tmp_path):
  """SMOKE=1: tiny shapes, Pallas interpreter; grain/seqio/ml-collections/clu/TF imports
  are refused (--poison), as on the GPU machine."""
  env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable,
             JAX_PLATFORMS="cpu", SUITE_TIMEOUT_S="2400")
  result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_suite.sh"),
                           "--budget_s=2400"], capture_output=True, text=True, timeout=2500,
                          check=False, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(tmp_path / "device_suite.json", encoding="utf-8") as f:
    results = json.load(f)
  assert (tmp_path / "log.txt").exists()
  sections = results["sections"]
  for name in ("env", "tile_sweep", "kernel_check", "attention", "train_step", "sampling",
               "train_flops"):
    assert sections[name]["ok"], (name, sections[name])
  assert results["failed_checks"] == []
  assert sections["env"]["forbidden_modules_loaded"] == []
  assert all(row["ok"] for row in sections["kernel_check"]["rows"])
  assert {row["dtype"] for row in sections["kernel_check"]["rows"]} == {"bfloat16", "float32"}
  assert sections["train_step"]["flop_ratio_armd_over_ar"] > 1.0
  assert sections["train_flops"]["ratio_armd_over_ar"] > 1.0
  assert sections["tile_sweep"]["chosen"] == {"16": "16,8"}
  for batch in (8, 1):
    rows = sections["sampling"]["rows"]
    assert rows[f"B={batch},S=4"]["calls"] < rows[f"B={batch},S=1"]["calls"]
