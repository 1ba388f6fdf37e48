"""Generation from trained models: greedy recall of memorised sequences, the sample command."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from armd_jax import losses, sampling
from armd_jax.sampling import SamplerConfig
from conftest import init_model, tiny_config

LENGTH = 17  # one prompt token + 16 generated, divisible by S = 1, 2, 4
NUM_SEQUENCES = 4


def synthetic_sequences() -> np.ndarray:
  """Fixed sequences [4, 17] whose first tokens (0..3) say which one follows."""
  rest = np.random.default_rng(0).integers(4, 13, size=(NUM_SEQUENCES, LENGTH - 1))
  return np.concatenate([np.arange(NUM_SEQUENCES)[:, None], rest], axis=1).astype(np.int32)


def training_orders(rng: np.random.Generator, batch: int) -> np.ndarray:
  """Per row: the first token first, then left-to-right (S = 1) or strided with S = 2, 4
  over the rest, so the model learns the conditionals strided decoding uses."""
  known = np.zeros((1, LENGTH), bool)
  known[0, 0] = True
  choices = [sampling.conditional_strided_order(known, s)[0] for s in (1, 2, 4)]
  rows = []
  for _ in range(batch):
    rows.append(choices[rng.integers(3)])
  return np.stack(rows)


@pytest.fixture(scope="module")
def memorised():
  model, params = init_model(tiny_config(num_layers=2), length=LENGTH)  # 1 two-stream + 1 causal
  data = jnp.asarray(np.tile(synthetic_sequences(), (4, 1)))  # [16, 17]
  # The first token (which sequence) is the prompt: never a target, it is uncertain.
  mask = jnp.ones(data.shape).at[:, 0].set(0)
  optimizer = optax.adam(1e-2)  # memorised in 100 steps (seen: loss 0.002)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, ids):
    def loss_fn(p):
      return losses.cross_entropy(model.apply(p, data, ids), data, ids, mask)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(1)
  for _ in range(100):
    params, opt_state, loss = step(params, opt_state, jnp.asarray(training_orders(rng, 16)))
  assert float(loss) < 0.02, f"the tiny model did not memorise the sequences (loss {loss})"
  return model, params


@pytest.mark.slow
@pytest.mark.parametrize("streams", [1, 2, 4])
def test_greedy_decoding_reproduces_the_trained_sequences(memorised, streams):
  model, params = memorised
  sequences = synthetic_sequences()
  out = sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=NUM_SEQUENCES,
                          length=LENGTH, streams=streams, prompt=sequences[:, :1],
                          sampler=SamplerConfig(greedy=True))
  np.testing.assert_array_equal(out.tokens, sequences)
  assert out.num_calls == 1 + (LENGTH - 1) // streams + streams - 1


# -- the sample command -------------------------------------------------------------------


@pytest.fixture
def workdir(tiny_workdir):
  """The session's trained `tiny` workdir (tests/conftest.py; read only)."""
  return tiny_workdir


@pytest.mark.slow
def test_sample_command_prints_samples_calls_and_tokens_per_second(workdir):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "armd_jax.sample", f"--workdir={workdir}", "--num_samples=2",
         "--length=18", "--streams=4", "--prompt=ab", "--nowarmup"]
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.count("--- sample") == 2
  assert "network calls" in proc.stdout and "tokens/s" in proc.stdout
  assert "decode" in proc.stdout
  assert "could not be restored" not in proc.stderr  # only the needed items are restored


def test_sample_library_call_keeps_the_prompt_and_counts_calls(workdir):
  from armd_jax.sample import sample_from_workdir  # pylint: disable=g-import-not-at-top
  result = sample_from_workdir(workdir, num_samples=2, length=18, streams=4, prompt="ab",
                               warmup=False)
  assert all(text.startswith("ab") for text in result.texts)
  assert result.num_calls == 1 + 16 // 4 + 4 - 1  # the prompt is read in one call
  assert result.tokens.shape == (2, 18)


def test_sample_command_errors_name_the_problem(workdir, tmp_path):
  from armd_jax.sample import sample_from_workdir  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError):
    sample_from_workdir(str(tmp_path), length=8)
  with pytest.raises(ValueError, match="max_len"):
    sample_from_workdir(workdir, length=1000)
  with pytest.raises(ValueError, match="--streams=3 must divide"):
    sample_from_workdir(workdir, length=16, streams=3)
