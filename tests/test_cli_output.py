"""The commands print what they did and nothing that reads like a failure: no warning or
error lines on a CPU host, with libtpu installed (the [test] extra) and JAX_PLATFORMS
unset as a user runs them (`armd_jax.platforms.skip_absent_tpu`; orbax's read-only
restore warnings are gone at the source, `train.checkpoints.restore_state_arrays`)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from armd_jax import sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# absl/glog prefixes (W1202 ..., E0000 ...), Python warnings and error lines.
ALARMING = re.compile(r"^[WEF]\d{4} |warn|error|traceback", re.IGNORECASE)


def run_command(module, *args):
  """Runs `python -m module args` as a user would: JAX_PLATFORMS unset (the suite's
  compilation cache and XLA flags kept); returns the finished process."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_sample_and_evaluate_print_no_warning_or_error_lines_without_jax_platforms(
    tiny_workdir):
  for module, args in (
      ("armd_jax.sample", ("--num_samples=2", "--length=16", "--stop_at_eos", "--nowarmup")),
      ("armd_jax.evaluate", ("--max_batches=1",))):
    proc = run_command(module, f"--workdir={tiny_workdir}", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    alarming = [line for line in proc.stderr.splitlines() if ALARMING.search(line)]
    assert not alarming, f"{module} printed:\n" + "\n".join(alarming)
    assert "step 60" in proc.stdout


def test_stop_at_eos_in_the_sample_command_is_the_librarys_truncation(tiny_workdir):
  from armd_jax import sample as sample_cmd  # pylint: disable=import-outside-toplevel
  from armd_jax import train  # pylint: disable=import-outside-toplevel

  vocab = train.load_trained(tiny_workdir).vocab
  kwargs = dict(num_samples=8, length=32, prompt="ab", seed=3, warmup=False)
  free = sample_cmd.sample_from_workdir(tiny_workdir, **kwargs)
  stopped = sample_cmd.sample_from_workdir(tiny_workdir, stop_at_eos=True, **kwargs)
  known = np.zeros(free.tokens.shape, bool)
  known[:, :2] = True  # the prompt's two bytes
  want, _, valid = sampling.truncate_at_eos(free.tokens, None, vocab.eos_id, vocab.pad_id,
                                            known=known)
  np.testing.assert_array_equal(stopped.tokens, want)
  rows_with_eos = (free.tokens == vocab.eos_id).any(axis=1)
  assert rows_with_eos.any()  # some sample ended early: the truncation was exercised
  for row, text, keep in zip(np.asarray(want), stopped.texts, np.asarray(valid)):
    assert text == vocab.decode(row[keep].tolist())
    hits = np.flatnonzero(row == vocab.eos_id)
    if len(hits):  # the EOS ends the kept tokens (kept, unlike the command's old copy)
      assert keep[:hits[0] + 1].all() and not keep[hits[0] + 1:].any()
