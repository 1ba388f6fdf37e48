"""MAUVE under our evaluator: the features are each sample's mean last hidden state
(what the model has read of the sample and nothing else), MAUVE separates text from the
same source from clearly different text, and the evaluate command and compare.py show
it beside generative perplexity and entropy, scoring each sample set once."""

import importlib.util
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax import eval as ev
from armd_jax import evaluate, orders, train
from armd_jax.data import ByteVocabulary
from conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = ByteVocabulary()
WORDS = "the a of and to in is that it was for on with as his he be at by".split()


def byte_model(kind, max_len=32):
  """A randomly initialised byte-level model of `kind` (features need no training)."""
  model = armd_jax.build_model(tiny_config(kind=kind, vocab_size=BYTE.vocab_size,
                                           max_len=max_len))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                      orders.left_to_right(1, 8))
  return model, nn.meta.unbox(params)


def prose(seed, num, length=32):
  """[num, length] byte rows of random English function words."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(num):
    text = ""
    while len(text) < length:
      text += rng.choice(WORDS) + " "
    rows.append(list(BYTE.encode(text[:length])))
  return np.asarray(rows, np.int32)


def digits(seed, num, length=32):
  """[num, length] byte rows of random digits: clearly not prose."""
  rng = np.random.default_rng(seed)
  return np.asarray([list(BYTE.encode("".join(rng.choice(list("0123456789"), length))))
                     for _ in range(num)], np.int32)


@pytest.mark.parametrize("kind", ["ar", "armd"])
def test_features_are_one_mean_state_per_sample_that_ignores_padding(kind):
  model, params = byte_model(kind)
  tokens = prose(0, 3, length=20)
  features = ev.sample_features(model, params, tokens)
  assert features.shape == (3, model.config.d_model) and features.dtype == np.float64
  assert np.all(np.isfinite(features))
  # Row 1 padded after 12 real tokens (with arbitrary ids) has the features of its
  # first 12 tokens alone.
  padded, mask = tokens.copy(), np.ones_like(tokens)
  padded[1, 12:], mask[1, 12:] = 7, 0
  masked = ev.sample_features(model, params, padded, mask)
  alone = ev.sample_features(model, params, tokens[1:2, :12])
  np.testing.assert_allclose(masked[1], alone[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masked[[0, 2]], features[[0, 2]], rtol=1e-5, atol=1e-6)
  # Each state has read only tokens before it: the last real token is never read, an
  # earlier one is.
  last, early = tokens.copy(), tokens.copy()
  last[:, -1] = (last[:, -1] + 1) % 256
  early[:, 3] = (early[:, 3] + 1) % 256
  np.testing.assert_allclose(ev.sample_features(model, params, last), features,
                             rtol=1e-5, atol=1e-6)
  assert np.abs(ev.sample_features(model, params, early) - features).max() > 1e-4


def test_features_read_long_rows_in_windows_and_refuse_empty_rows_and_bounds():
  model, params = byte_model("ar", max_len=16)
  tokens = prose(1, 2, length=40)  # windows of 16, 16 and 8 tokens
  features = ev.sample_features(model, params, tokens)
  window_sums = [ev.sample_features(model, params, tokens[:, s:s + 16]) * (n - 1)
                 for s, n in ((0, 16), (16, 16), (32, 8))]
  np.testing.assert_allclose(features, sum(window_sums) / 37, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"rows \[0\] have fewer than 2 real tokens"):
    ev.sample_features(model, params, tokens[:, :4], np.array([[1, 0, 0, 0], [1, 1, 0, 0]]))
  mdlm = armd_jax.build_model(tiny_config(kind="mdlm", vocab_size=BYTE.vocab_size))
  with pytest.raises(ValueError, match="needs an 'ar' or 'armd' model"):
    ev.sample_features(mdlm, {}, tokens)


def test_mauve_is_near_one_within_a_source_and_low_against_different_text():
  model, params = byte_model("ar")
  samples, again, other = (ev.sample_features(model, params, rows) for rows in
                           (prose(0, 100), prose(1, 100), digits(2, 100)))
  itself = ev.mauve_score(samples, samples, evaluator="tiny AR", num_bootstrap=10)
  same_source = ev.mauve_score(samples, again, evaluator="tiny AR", num_bootstrap=10)
  different = ev.mauve_score(samples, other, evaluator="tiny AR", num_bootstrap=10)
  assert itself.mauve == pytest.approx(1.0)
  assert same_source.mauve > 0.9
  assert different.mauve < 0.1
  # The bootstrap intervals are ordered and keep the two cases apart.
  for result in (itself, same_source, different):
    assert 0.0 <= result.ci95[0] <= result.ci95[1] <= 1.0
    assert result.num_buckets == 10 and result.num_samples == result.num_reference == 100
  assert different.ci95[1] < same_source.ci95[0]
  assert "MAUVE under our evaluator" in str(different) and "not comparable" in str(different)
  assert different.as_dict()["mauve_features"] == "mean last hidden state of tiny AR"
  with pytest.raises(ValueError, match="two \\[n >= 2, D\\] feature sets"):
    ev.mauve_score(samples[:1], again)


def test_the_frontier_area_is_mauve_texts_own_except_where_the_curve_ties():
  import mauve  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  p, q = rng.normal(size=(60, 8)), rng.normal(0.5, 1.0, size=(60, 8))
  theirs = mauve.compute_mauve(p_features=p, q_features=q, num_buckets=4)
  assert 0.05 < theirs.mauve < 0.95  # a curve without ties
  assert ev.mauve.frontier_area(theirs.divergence_curve) == pytest.approx(theirs.mauve)
  # Identical histograms: every inner point of the curve is (1, 1); the area is 1.
  curve = mauve.compute_mauve(p_features=p, q_features=p, num_buckets=4).divergence_curve
  assert ev.mauve.frontier_area(curve) == pytest.approx(1.0)


def test_evaluate_prints_mauve_beside_generative_perplexity(tiny_workdir):
  lines = []
  results = evaluate.evaluate_workdir(tiny_workdir, heldout=False, gen_samples=8,
                                      gen_length=16, mauve_bootstrap=3, log=lines.append)
  (line,) = [text for text in lines if "generative PPL" in text]
  assert "unigram entropy" in line and "MAUVE under our evaluator" in line
  gen = results["generative"]
  assert {"gen_ppl", "entropy_nats", "mauve", "mauve_ci95", "mauve_features"} <= set(gen)
  assert 0.0 <= gen["mauve"] <= 1.0 and gen["mauve_num_reference"] == 8
  assert "the generator itself" in gen["mauve_features"]


def load_compare():
  spec = importlib.util.spec_from_file_location(
      "compare", os.path.join(REPO, "benchmarks", "compare.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_compare_scores_each_sample_set_once_and_tables_mauve(tiny_workdir, monkeypatch):
  compare = load_compare()
  monkeypatch.setattr(compare, "STREAMS", (1,))
  monkeypatch.setattr(compare, "CONFIDENCE_K", ())
  monkeypatch.setattr(compare, "MAUVE_BOOTSTRAP", 3)
  trained = train.load_trained(tiny_workdir)
  evaluator = ev.ModelEvaluator(trained.model, trained.params, trained.vocab, name="tiny")
  calls = []
  score_tokens = evaluator.score_tokens
  evaluator.score_tokens = lambda *a, **k: calls.append(1) or score_tokens(*a, **k)
  reference = ev.sample_features(trained.model, trained.params, prose(3, 6, length=16))
  size = dict(compare.SIZES["smoke"], seq_len=16, gen_samples=6)
  (row,) = compare.generation_rows("armd", trained, evaluator, reference, size)
  assert len(calls) == 1  # one scoring pass gives gen. PPL and its bootstrap interval
  assert row["gen_ppl_ci95"][0] <= row["gen_ppl"] <= row["gen_ppl_ci95"][1]
  results = {"size": size, "mode": "smoke", "device": "cpu", "wall_seconds": 1.0, "runs": {},
             "evaluator": "tiny", "generation": [row]}
  header, _, line = compare.markdown(results).strip().splitlines()[-3:]
  assert "gen. PPL [95% CI]" in header and "entropy" in header and "MAUVE [95% CI]" in header
  assert f"{row['mauve']:.3f} [" in line


def test_compare_needs_the_corpus_path_and_says_where_to_get_it():
  run = subprocess.run([sys.executable, "benchmarks/compare.py", "--smoke"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 1
  assert "pass --data=PATH" in run.stderr and "tinyshakespeare/input.txt" in run.stderr
