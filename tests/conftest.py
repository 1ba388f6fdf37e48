"""Shared fixtures: tiny models that compile in seconds on 2 CPU cores."""

import fcntl
import getpass
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterator, NamedTuple, Tuple

# Bytecode, as a default Python keeps it: the packages are installed with --no-compile
# (.ci/run), so with PYTHONDONTWRITEBYTECODE set (some containers set it) no process would
# ever write the .pyc files and every one (2 workers, ~50 subprocesses, notebook kernels)
# would compile each module it imports from source: `import armd_jax.main` took 4.8-6.7 s
# instead of 2.7 s once its bytecode was written. The suite writes bytecode, in this
# process from here on and in the processes it starts.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# The suite runs on the CPU. With the [tpu] extra installed (the compile_check tests use
# libtpu), JAX would otherwise probe for a TPU at start-up and log an error line in every
# process; subprocesses started by the tests inherit this too. A user's own setting wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Suite speed on 2 CPU cores: almost every test compiles small programs that then run for
# milliseconds, so compilation dominates. (1) XLA's CPU backend at optimisation level 0
# (~40% faster compiles) and with its older loop emitters instead of the fusion emitters
# (~28% faster again on the sampling and kernel tests; both run the few compute-heavy tests
# somewhat slower; no fast-math either way, so results keep their meaning). (2) One
# persistent compilation cache shared by the xdist workers and the subprocesses they start
# (train/resume/mesh/notebook runs compile the same tiny programs again). Both are inherited
# by subprocesses through the environment; a flag of the same name already in XLA_FLAGS, or
# your own JAX_COMPILATION_CACHE_DIR, wins.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
_own = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_own] + [f for f in SUITE_XLA_FLAGS.split() if f.split("=")[0] not in _own]).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"armd_jax_test_xla_cache_{getpass.getuser()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import armd_jax  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(**overrides) -> armd_jax.ModelConfig:
  """A 4-layer (2 two-stream) model with width 32."""
  fields = dict(vocab_size=13, d_model=32, num_layers=4, num_heads=4, mlp_dim=64, max_len=32,
                d_pe=16)
  fields.update(overrides)
  return armd_jax.ModelConfig(**fields)


def init_model(config: armd_jax.ModelConfig, length: int = 8, seed: int = 0):
  """Returns (model, unboxed float32 params)."""
  model = armd_jax.ARMD(config)
  tokens = jnp.zeros((1, length), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), tokens, armd_jax.orders.left_to_right(1, length))
  return model, nn.meta.unbox(params)


@pytest.fixture
def tiny():
  return init_model(tiny_config())


def host_devices_env(count: int, **extra: str) -> dict:
  """os.environ for a subprocess with `count` simulated CPU devices (and `extra` variables),
  keeping the suite's own XLA flags."""
  flags = f"--xla_force_host_platform_device_count={count} {SUITE_XLA_FLAGS}"
  return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


# absl/glog prefixes (W1202 ..., E0000 ...), Python warnings and error lines.
ALARMING = re.compile(r"^[WEF]\d{4} |warn|error|traceback", re.IGNORECASE)


def run_as_user(module: str, *args: str) -> subprocess.CompletedProcess:
  """Runs `python -m module args` in the repository as a user would: JAX_PLATFORMS unset,
  so with libtpu installed JAX looks for a TPU (the suite's compilation cache and XLA
  flags kept); returns the finished process (stdout and stderr as text)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def alarming_lines(stderr: str) -> list:
  """The lines of `stderr` that read like a failure to a user (ALARMING)."""
  return [line for line in stderr.splitlines() if ALARMING.search(line)]


# -- one trained `tiny` workdir per pytest run ---------------------------------------------


class TinyRun(NamedTuple):
  """The shared trained workdir: `workdir, final = tiny_run` unpacks it."""
  workdir: str  # a local directory (see `tiny_run` for what it holds)
  final: Dict[str, Any]  # train_and_evaluate's final metrics (eval/nll, eval/perplexity, ...)


def tiny_run_config():
  """configs/tiny.py exactly as committed: what the `tiny_run` fixture trains."""
  from armd_jax.train.defaults import config_from_file  # pylint: disable=g-import-not-at-top
  return config_from_file(os.path.join(REPO, "configs", "tiny.py"))


def tiny_command(workdir: str, overrides: Dict[str, Any]) -> list:
  """`python -m armd_jax.main --config=configs/tiny.py --workdir=... --config.K=V ...`."""
  return [sys.executable, "-m", "armd_jax.main", f"--config={REPO}/configs/tiny.py",
          f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]


def train_like_tiny_command(workdir: str, overrides: Dict[str, Any]) -> None:
  """What `tiny_command(workdir, overrides)` trains, in this process: the same config and
  the command's default matmul precision (this file sets 'highest' for the test process),
  so the same programs and bitwise the same results."""
  from armd_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_run_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    setattr(config[section], field, value)
  with jax.default_matmul_precision(None):
    train.train_and_evaluate(config, workdir)


def _fingerprint(root: str) -> Dict[str, Tuple[int, int]]:
  """{relative path: (size, mtime_ns)} of every file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      out[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
  return out


def _train_tiny_run(tmp_path_factory) -> Tuple[str, Dict[str, Any]]:
  """Trains configs/tiny.py once per pytest run: returns (workdir, final metrics).

  Under xdist the first worker to ask trains it in the folder the run's workers share
  (holding a file lock there) and the others wait for it and read it; a worker that finds
  a workdir without results (the training failed in another worker) raises. Without xdist
  it trains in this session's own temporary folder.
  """
  from armd_jax import train  # pylint: disable=g-import-not-at-top
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    workdir = str(tmp_path_factory.mktemp("tiny_run") / "workdir")
    return workdir, dict(train.train_and_evaluate(tiny_run_config(), workdir))
  root = tmp_path_factory.getbasetemp().parent / "tiny_run"  # this run's, not the last one's
  root.mkdir(exist_ok=True)
  workdir, results = root / "workdir", root / "final.json"
  with open(root / "lock", "w") as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
    if not results.exists():
      if workdir.exists():
        raise RuntimeError(f"training the shared tiny run in {workdir} failed in another "
                           "pytest worker: see that worker's first error")
      final = train.train_and_evaluate(tiny_run_config(), str(workdir))
      results.write_text(json.dumps({k: float(v) for k, v in final.items()}))
  return str(workdir), json.loads(results.read_text())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Iterator[TinyRun]:
  """One run of configs/tiny.py, trained once per pytest run (~10 s; the xdist workers
  share it) and shared by every test that only reads a trained model.

  The workdir holds what `python -m armd_jax.main --config=configs/tiny.py` writes:
  config.json; checkpoints/ at steps 20, 40 and 60 (train state with EMA params,
  ema_decay 0.9, so EMA and raw params differ); metrics.jsonl with train/loss every 10
  steps and eval/* at steps 30 and 60; the byte-level synthetic vocabulary (no file).
  `train.load_trained(workdir)` restores it at step 60; the sample and evaluate
  commands accept it as --workdir.

  Tests must not modify it (no training into it, no damaging or moving its files): a
  test that does copies it first, `shutil.copytree(tiny_run.workdir, tmp_path / "run")`.
  Any change is reported as an error when a worker's session ends.
  """
  workdir, final = _train_tiny_run(tmp_path_factory)
  before = _fingerprint(workdir)
  yield TinyRun(workdir, final)
  after = _fingerprint(workdir)
  changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
  assert not changed, (f"a test modified the shared tiny_run workdir {workdir} (copy it with "
                       f"shutil.copytree first): {changed[:10]}")


@pytest.fixture(scope="session")
def tiny_workdir(tiny_run) -> str:
  """The path of the shared trained `tiny` workdir (read only; see `tiny_run`)."""
  return tiny_run.workdir


# The quick tier (`pytest -m "not slow"`) runs the first case of every parametrized
# property; the full suite (what CI runs) runs them all. Tests marked here by name are the
# quick tier's heaviest single cases (each still runs in the full suite): end-to-end
# paths (harness, commands, conversion, the train step) whose pieces quicker tests cover.
QUICK_TIER_EXCLUDES = (
    "test_baselines.py::test_mdlm_elbo_is_at_least_the_exact_nll_of_its_ancestral_sampler",
    "test_baselines.py::test_one_pass_log_likelihood_equals_the_chain_rule_of_prefix_calls",
    "test_cli_output.py::test_stop_at_eos_in_the_sample_command_is_the_librarys_truncation",
    "test_convert.py::test_adapted_armd_copies_the_ar_weights_and_its_content_stream_is_the_ar_stream",
    "test_convert.py::test_imported_hf_model_gives_the_live_pytorch_logits",
    "test_ema.py::test_the_train_step_keeps_the_debiased_ema_so_after_one_step_it_equals_the_params",
    "test_eval.py::test_strided_decoding_saves_calls_not_flops_and_confidence_probes_cost_full_passes",
    "test_kernels.py::test_two_stream_kernel_never_touches_skipped_tiles",
    "test_kernels_sharded.py::test_kernel_inside_shard_map_over_batch_and_heads_matches_the_reference",
    "test_lm_eval.py::test_generate_until_stops_at_an_until_string_and_max_gen_toks",
    "test_lm_eval.py::test_is_greedy_is_true_exactly_for_the_greedy_continuation",
    "test_lm_eval.py::test_multiple_choice_and_last_word_scores_are_our_exact_cached_scores",
    "test_lm_eval.py::test_strided_and_confidence_generation_honour_the_budget",
    "test_lm_eval.py::test_strided_loglikelihood_is_the_exact_cached_score_of_that_order",
    "test_mauve.py::test_evaluate_prints_mauve_beside_generative_perplexity",
    "test_model.py::test_bfloat16_model_with_chunked_prefix_matches_dense_prefix",
    "test_model.py::test_lean_forward_gives_the_logits_of_the_full_two_stream_forward",
    "test_model.py::test_the_lean_check_catches_a_forward_that_drops_the_last_content_layer",
    "test_partitioning.py::test_remat_gives_the_same_loss_and_gradients_and_recomputes",
    "test_registry.py::test_compute_loss_and_make_train_step_take_typed_order_settings_not_the_config_dict",
    "test_registry.py::test_mdlm_validation_accuracy_is_over_masked_tokens_and_each_key_draws_anew",
    "test_registry.py::test_the_train_step_recompile_guard_rejects_a_batch_of_another_shape",
    "test_sampling.py::test_cached_scores_equal_one_pass_log_probs_for_other_architectures",
    "test_sampling.py::test_cached_scores_equal_one_pass_log_probs_with_every_attention",
    "test_sampling.py::test_score_comparison_catches_an_upper_cache_that_hides_the_own_block",
    "test_sampling.py::test_segmented_decoding_reads_a_prefix_of_the_cache_and_scores_like_one_pass",
    "test_sampling_features.py::test_config_sample_noise_reaches_the_samples_the_trainer_prints",
    "test_sampling_features.py::test_infill_rows_with_different_known_counts_prefill_in_one_call_like_recompute",
    "test_sampling_features.py::test_prefill_of_the_leading_known_blocks_of_an_explicit_order",
    "test_sampling_features.py::test_stop_at_eos_ends_each_row_at_its_first_eos_in_text_order",
    "test_sampling_features.py::test_stop_at_eos_keeps_given_infill_tokens_after_the_eos",
    "test_sampling_features.py::test_stop_at_eos_log_probs_are_the_kept_texts_not_conditioned_on_dropped_tokens",
    "test_train.py::test_a_nonfinite_loss_stops_training_naming_the_step_and_keeps_the_last_checkpoint",
    "test_train.py::test_left_to_right_training_loss_equals_the_exact_eval_nll",
    "test_train.py::test_restarting_a_finished_run_resumes_at_its_last_step_and_trains_further",
)


# `-n 2 --dist loadfile` hands whole files to the two workers, by default the files with the
# most tests first, which left the multi-process file for the end and one worker idle for
# over a minute. Instead the files of the longest total time go first (longest processing
# time first), in the order of a full run's junit profile (benchmarks/results/
# test_suite_time.md), so the workers end close together; unlisted files follow in
# collection order. Which tests run, and in which worker they share fixtures, is unchanged.
LONGEST_FILES_FIRST = (
    "test_sampling.py", "test_multiprocess.py", "test_benchmarks_cli.py", "test_notebooks.py",
    "test_model.py", "test_kernels.py", "test_sampling_features.py", "test_compile_check.py",
    "test_device_suite.py", "test_train_mesh.py", "test_lm_eval.py", "test_convert.py",
    "test_baselines.py", "test_train.py", "test_configs.py", "test_eval.py",
    "test_registry.py", "test_lock.py",
)


def pytest_configure(config):
  """Keeps the file order of `pytest_collection_modifyitems` for xdist's scheduler."""
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.7
    config.option.loadscopereorder = False


def file_rank(item) -> int:
  name = item.nodeid.split("::", 1)[0].split("/")[-1]
  return (LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST
          else len(LONGEST_FILES_FIRST))


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Puts the longest files first (stable: tests keep their order within a file); marks
  later cases of a parametrized test, and QUICK_TIER_EXCLUDES, as slow."""
  items.sort(key=file_rank)
  seen = set()
  for item in items:
    base = item.nodeid.split("[", 1)[0]
    if base.split("/")[-1] in QUICK_TIER_EXCLUDES:
      item.add_marker(pytest.mark.slow)
    elif "[" in item.nodeid:
      if base in seen:
        item.add_marker(pytest.mark.slow)
      seen.add(base)
