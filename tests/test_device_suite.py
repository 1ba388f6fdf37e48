"""The prepared device script runs in its CPU smoke mode and imports (and traces the
trainer's step) without grain, seqio, ml-collections or TensorFlow, and the kernel
benchmark imports with jax alone (both run on machines that lack the data stack)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _race_corpus():
  spec = importlib.util.spec_from_file_location(
      "race_corpus", os.path.join(ROOT, "benchmarks", "race_corpus.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules.setdefault("race_corpus", module)  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


race_corpus = _race_corpus()

# One interpreter runs both import checks (each fresh interpreter pays seconds of `import
# jax`): first the kernel benchmark with only jax importable, then, with the narrower
# refusal of the device machine, the device suite. Whatever the first phase loaded was
# also allowed in the second, so the second check is not weakened by it.
IMPORTS = textwrap.dedent("""
    import runpy, sys
    class Refuse:
      def __init__(self, names, why):
        self.names, self.why = names, why
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
          raise ImportError(self.why + name)
    # What a machine with only jax installed lacks.
    only_jax = Refuse(("flax", "optax", "orbax", "chex", "grain", "seqio", "ml_collections",
                       "clu", "tensorflow"), "only jax here: ")
    sys.meta_path.insert(0, only_jax)
    module = runpy.run_path(sys.argv[1], run_name="imported")
    assert callable(module["main"]) and module["flash"].block_causal_flash_attention
    print("ONLY_JAX_IMPORT_OK")
    sys.meta_path.remove(only_jax)
    sys.argv[1:] = []  # the device suite reads its flags from the command line
    for name in [m for m in sys.modules if m.split(".")[0] == "armd_jax"]:
      del sys.modules[name]  # the first phase's package stub (armd_jax without __init__)
    # What the GPU machine lacks: the data and config stack.
    sys.meta_path.insert(0, Refuse(("grain", "seqio", "ml_collections", "clu", "tensorflow",
                                    "tensorflow_datasets"), "not on the device: "))
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
    print("DEVICE_SUITE_IMPORT_OK")
""")


def test_kernel_benchmark_needs_only_jax_and_device_suite_traces_its_step_without_data_stack():
  script = os.path.join(ROOT, "benchmarks", "attention_kernel.py")
  result = subprocess.run([sys.executable, "-c", IMPORTS, script], capture_output=True,
                          text=True, timeout=600, check=False, cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
  assert "ONLY_JAX_IMPORT_OK" in result.stdout and "DEVICE_SUITE_IMPORT_OK" in result.stdout


def run_suite_sh(tmp_path, *args, timeout: int, **env_vars) -> dict:
  """Runs benchmarks/device_suite.sh in SMOKE mode on CPU with `args`, writing into
  `tmp_path`; asserts success and returns its device_suite.json."""
  env = dict(os.environ, SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable,
             JAX_PLATFORMS="cpu", **env_vars)
  result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "device_suite.sh"), *args],
                          capture_output=True, text=True, timeout=timeout, check=False, env=env)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  with open(tmp_path / "device_suite.json", encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
def test_device_suite_smoke_mode_runs_every_section_on_cpu(tmp_path):
  """SMOKE=1: tiny shapes, Pallas interpreter; grain/seqio/ml-collections/clu/TF imports
  are refused (--poison), as on the GPU machine."""
  results = run_suite_sh(tmp_path, "--budget_s=2400", timeout=2500, SUITE_TIMEOUT_S="2400")
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


def test_race_corpus_holds_byte_ids_of_every_tenth_file_out_and_skips_test_folders(tmp_path):
  for i in range(19):  # m00 .. m18, then pkg/u.py is file 19
    (tmp_path / f"m{i:02d}.py").write_text(f"x = {i}\n", encoding="utf-8")
  (tmp_path / "test").mkdir()
  (tmp_path / "test" / "t.py").write_text("never read\n", encoding="utf-8")
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "u.py").write_text("é\n", encoding="utf-8")  # two UTF-8 bytes
  corpus = race_corpus.build(str(tmp_path))
  names = race_corpus.source_files(str(tmp_path))
  assert names[:10] == [f"m{i:02d}.py" for i in range(10)] and "test/t.py" not in names
  ids = lambda text: list(np.frombuffer(text.encode(), np.uint8) + 3) + [1]  # noqa: E731
  held = [names[i] for i in range(len(names)) if i % 10 == 9]  # m09.py, pkg/u.py
  assert held == ["m09.py", "pkg/u.py"]
  assert list(corpus.held_out) == ids("x = 9\n") + ids("é\n")
  assert corpus.train.shape[0] == sum(len(ids(f"x = {i}\n")) for i in range(19) if i != 9)
  assert corpus.tokens.dtype == np.uint8 and corpus.meta["held_out_files"] == 2
  path = str(tmp_path / "c.npz")
  race_corpus.save(corpus, path)
  loaded = race_corpus.load(path)
  assert loaded.split == corpus.split and np.array_equal(loaded.tokens, corpus.tokens)


def test_race_batches_read_every_window_once_per_epoch_in_a_seeded_order():
  num_windows, batch = 10, 4
  rows = np.concatenate([race_corpus.batch_rows(i, num_windows, batch) for i in range(5)])
  assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
  assert list(rows[:10]) != list(rows[10:20])  # each epoch has its own order
  again = np.concatenate([race_corpus.batch_rows(i, num_windows, batch) for i in range(5)])
  assert np.array_equal(rows, again)
  assert not np.array_equal(race_corpus.batch_rows(0, num_windows, batch, seed=1), rows[:4])


def test_the_committed_race_corpus_loads_and_fits_the_byte_vocabulary():
  path = os.path.join(ROOT, "benchmarks", "race_corpus.npz")
  corpus = race_corpus.load(path)  # checks the recorded sha256
  assert os.path.getsize(path) <= 3 * 2**20
  assert corpus.meta["vocab_size"] == 259 and corpus.meta["eos_id"] == 1
  assert 3 <= corpus.tokens[corpus.tokens != 1].min() and corpus.tokens.max() < 259
  assert 0.8 < corpus.split / corpus.tokens.shape[0] < 0.95
  assert corpus.tokens[corpus.split - 1] == 1  # the training part ends a document


@pytest.mark.slow
def test_device_suite_race_smoke_scores_both_models_trained_on_the_same_batches(tmp_path):
  """RACE=1 SMOKE=1: the tiny race on CPU through the .sh, data stack refused."""
  results = run_suite_sh(tmp_path, "--race_s=1", timeout=600, RACE="1")
  assert set(results["sections"]) == {"env", "race"}
  assert results["sections"]["env"]["forbidden_modules_loaded"] == []
  race = results["sections"]["race"]
  assert race["ok"], race
  armd, ar = race["models"]["armd"], race["models"]["ar"]
  for row in (armd, ar):
    assert row["train_s"] >= 1.0 and row["steps"] > 0
    assert row["tokens_seen"] == row["steps"] * race["batch"] * race["length"]
  # AR kept its parameters at the step ARMD reached, having read the same batches.
  assert race["equal_steps"]["step"] == armd["steps"]
  assert race["equal_steps"]["same_batches"]
  assert race["equal_steps"]["ar_data_digest"] == armd["data_digest"]
  assert ar["total_steps"] >= armd["steps"]
  for point in ("equal_wall_clock", "equal_steps"):
    for kind in ("armd", "ar"):
      score = race[point][kind]
      assert 1.0 < score["ppl"] < float("inf") and score["tokens"] > 0
      assert np.isclose(np.log(score["ppl"]), score["nll"])
  assert race["equal_steps"]["armd"] == race["equal_wall_clock"]["armd"]
  for batch in (1, 8):
    decode = race["armd_decode"][f"B={batch},S=4"]
    assert decode["seconds"] > 0 and decode["calls"] == race["length"] // 4 + 4 - 1
