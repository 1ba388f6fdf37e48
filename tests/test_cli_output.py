"""The commands print what they did and nothing that reads like a failure: no warning or
error lines on a CPU host, with libtpu installed (the [test] extra) and JAX_PLATFORMS
unset as a user runs them (`armd_jax.platforms.skip_absent_tpu`; orbax's read-only
restore warnings are gone at the source, `train.checkpoints.restore_state_arrays`); and
the sample command's stop-at-EOS is the library's truncation."""

import numpy as np
import pytest

from armd_jax import sampling
from conftest import alarming_lines, run_as_user


@pytest.mark.slow
def test_the_sample_command_prints_no_warning_or_error_lines_without_jax_platforms(
    tiny_workdir):
  """Confidence order with stop-at-EOS: the sample command's own numbers are printed too
  (the evaluate command's run is in test_eval_workdir, checked the same way)."""
  proc = run_as_user("armd_jax.sample", f"--workdir={tiny_workdir}", "--num_samples=2",
                     "--length=16", "--order=confidence", "--per_call=4", "--stop_at_eos",
                     "--nowarmup")
  assert proc.returncode == 0, proc.stderr[-3000:]
  alarming = alarming_lines(proc.stderr)
  assert not alarming, "the sample command printed:\n" + "\n".join(alarming)
  assert "step 60" in proc.stdout
  assert "confidence order, 4 per call, 7 network calls" in proc.stdout  # 2 * 16/4 - 1


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
