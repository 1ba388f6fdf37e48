"""Evaluation: every evaluator path recovers the entropy of a known distribution; labels;
zero-shot loaders on local files shaped like the real sets."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax import eval as ev
from armd_jax import orders
from armd_jax.data import ByteVocabulary
from armd_jax.eval import zero_shot
from conftest import tiny_config

BYTE = ByteVocabulary()
LETTERS = "abcde"
PROBS = np.array([0.4, 0.25, 0.15, 0.12, 0.08])


def iid_logits(vocab_size, support, probs):
  """Logits [V] of an i.i.d. distribution: log p on `support`, -30 elsewhere."""
  logits = np.full(vocab_size, -30.0, np.float32)
  logits[support] = np.log(probs)
  return logits


def oracle(kind, vocab_size, logits, max_len=32):
  """A model of `kind` that outputs `logits` at every position whatever its input.

  The final LayerNorm gets scale 0 and bias e_0, so its output is e_0 everywhere, and row
  0 of the (untied) head holds the logits.
  """
  config = tiny_config(kind=kind, vocab_size=vocab_size, tie_embeddings=False,
                       max_len=max_len)
  model = armd_jax.build_model(config)
  tokens = jnp.zeros((1, 4), jnp.int32)
  args = (tokens, orders.left_to_right(1, 4)) if kind == "armd" else (tokens,)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *args))
  p = jax.tree_util.tree_map(lambda x: x, params["params"])
  p["final_norm"] = {"scale": jnp.zeros(config.d_model),
                     "bias": jnp.zeros(config.d_model).at[0].set(1.0)}
  p["head"] = {"kernel": jnp.zeros((config.d_model, vocab_size)).at[0].set(jnp.asarray(logits))}
  return model, {"params": p}


def entropy_of(logits):
  p = np.exp(logits - np.logaddexp.reduce(logits))
  return float(-(p * np.log(np.maximum(p, 1e-300))).sum()), p


def iid_corpus(p, num, length, seed):
  return np.random.default_rng(seed).choice(len(p), size=(num, length), p=p).astype(np.int32)


def batches_of(tokens, batch_size, pad_last=0):
  for start in range(0, len(tokens), batch_size):
    t = tokens[start:start + batch_size]
    mask = np.ones_like(t)
    if pad_last:
      mask[:, -pad_last:] = 0
    yield {"tokens": t, "mask": mask}


SMALL_V = 5
SMALL_LOGITS = np.log(PROBS).astype(np.float32)
SMALL_H, SMALL_P = entropy_of(SMALL_LOGITS.astype(np.float64))


def tolerance(p, num_tokens, extra_variance=0.0):
  """4 standard errors of the mean NLL of num_tokens i.i.d. tokens (+ Monte Carlo)."""
  logp = np.log(p[p > 0])
  var = float((p[p > 0] * logp ** 2).sum() - ((p[p > 0] * logp).sum()) ** 2)
  return 4.0 * math.sqrt((var + extra_variance) / num_tokens)


@pytest.mark.parametrize("kind,order", [
    ("ar", ev.EvalOrder("left_to_right")),
    ("armd", ev.EvalOrder("left_to_right")),
    ("armd", ev.EvalOrder("strided", streams=4)),
    ("armd", ev.EvalOrder("random")),
    ("armd", ev.EvalOrder("masked_diffusion", num_steps=8)),
])
def test_perplexity_of_an_iid_corpus_matches_its_analytic_entropy(kind, order):
  model, params = oracle(kind, SMALL_V, SMALL_LOGITS)
  corpus = iid_corpus(SMALL_P, 256, 16, seed=1)
  result = ev.evaluate_perplexity(model, params, batches_of(corpus, 64, pad_last=2),
                                  order=order)
  # The oracle's NLL is exactly the corpus' empirical cross-entropy ...
  empirical = float(-np.log(SMALL_P[corpus[:, :-2]]).mean())
  assert abs(result.nll - empirical) < 1e-4
  # ... which is within 4 standard errors of the entropy H(p).
  assert result.num_tokens == 256 * 14
  assert abs(result.nll - SMALL_H) < tolerance(SMALL_P, result.num_tokens)
  assert result.label == ev.likelihood_label(kind, order)


def test_mdlm_elbo_of_an_iid_corpus_matches_its_analytic_entropy():
  model, params = oracle("mdlm", SMALL_V, SMALL_LOGITS)
  corpus = iid_corpus(SMALL_P, 512, 16, seed=2)
  result = ev.evaluate_perplexity(model, params, batches_of(corpus, 128), num_samples=4)
  assert result.label == ev.BOUND and result.order == "elbo"
  # For a context-free model the ELBO's expectation is the exact NLL; the Monte Carlo
  # noise of the 1/t weight adds variance ~ log(1 / T_MIN) * Var(log p) / N per sequence
  # (before stratification), folded into the tolerance.
  mc = math.log(1.0 / armd_jax.models.mdlm.T_MIN) * 16 * (
      (SMALL_P * np.log(SMALL_P) ** 2).sum()) / 4
  assert abs(result.nll - SMALL_H) < tolerance(SMALL_P, result.num_tokens, mc)


def test_labels_say_exact_or_bound_and_refuse_unsupported_orders():
  assert ev.likelihood_label("ar", ev.EvalOrder()) == "exact"
  assert ev.likelihood_label("armd", ev.EvalOrder("strided", streams=2)) == "exact"
  assert ev.likelihood_label("armd", ev.EvalOrder("random")) == "bound"
  assert ev.likelihood_label("mdlm", ev.EvalOrder("elbo")) == "bound"
  with pytest.raises(ValueError, match="cannot be evaluated"):
    ev.likelihood_label("ar", ev.EvalOrder("random"))
  with pytest.raises(ValueError, match="cannot be evaluated"):
    ev.likelihood_label("mdlm", ev.EvalOrder("left_to_right"))
  with pytest.raises(ValueError, match="EvalOrder.name"):
    ev.EvalOrder("sideways")
  text = str(ev.PerplexityResult(1.0, 10, "bound", "elbo", "mdlm"))
  assert "bound" in text and "<=" in text


# -- generative perplexity --------------------------------------------------------------

BYTE_IDS = [BYTE.encode(c)[0] for c in LETTERS]
BYTE_LOGITS = iid_logits(BYTE.vocab_size, BYTE_IDS, PROBS)
BYTE_H, BYTE_P = entropy_of(BYTE_LOGITS.astype(np.float64))


class FakeHFTokenizer:
  """Character tokenizer shaped like a HF tokenizer (ids = bytes + 3, eos = 1)."""
  eos_token_id = 1
  bos_token_id = None

  def __call__(self, text):
    return {"input_ids": BYTE.encode(text)}


class FakeHFModel:
  """A callable returning an object with .logits, like a HF causal LM."""

  def __call__(self, input_ids):
    logits = np.broadcast_to(BYTE_LOGITS, input_ids.shape + (BYTE.vocab_size,))

    class Out:
      pass

    out = Out()
    out.logits = logits
    return out


@pytest.mark.parametrize("path", ["model_tokens", "model_texts", "hf_texts"])
def test_generative_perplexity_of_iid_samples_matches_the_entropy_for_each_evaluator(path):
  samples = iid_corpus(BYTE_P, 64, 24, seed=3)
  if path == "hf_texts":
    evaluator = ev.HFEvaluator(FakeHFModel(), FakeHFTokenizer(), "fake-char-lm")
    vocab = BYTE
  else:
    model, params = oracle("ar", BYTE.vocab_size, BYTE_LOGITS)
    evaluator = ev.ModelEvaluator(model, params, BYTE, name="oracle")
    vocab = ByteVocabulary() if path == "model_texts" else None  # another object: via text
  result = ev.generative_perplexity(samples, evaluator, vocab=vocab)
  assert result.num_tokens == 64 * 24
  assert abs(result.nll - float(-np.log(BYTE_P[samples]).mean())) < 1e-4
  assert abs(result.nll - BYTE_H) < tolerance(BYTE_P, result.num_tokens)
  assert ("fake-char-lm" in result.evaluator) == (path == "hf_texts")
  # Unigram entropy of 24-token samples is biased low by about (k - 1) / (2 * 24).
  assert abs(result.entropy - (SMALL_H - 4 / 48)) < 0.1


def test_unigram_entropy_is_the_entropy_of_each_rows_histogram():
  tokens = np.array([[0, 0, 1, 1], [2, 2, 2, 2], [0, 1, 2, 3]])
  np.testing.assert_allclose(ev.unigram_entropy(tokens), [math.log(2), 0.0, math.log(4)])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_allclose(ev.unigram_entropy(tokens, mask),
                             [-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3), 0.0,
                              math.log(2)])


def test_an_mdlm_cannot_be_the_evaluator():
  model, params = oracle("mdlm", SMALL_V, SMALL_LOGITS)
  with pytest.raises(ValueError, match="left-to-right"):
    ev.ModelEvaluator(model, params)


# -- zero-shot loaders on local files shaped like the real sets ------------------------

PTB = """ no it was n't black monday 
 but while the new york stock exchange did n't fall apart friday as the dow jones industrial average plunged N points <unk> it 's the second time 
 the -lrb- unofficial -rrb- tally , he said . 
"""
WIKI = """ 
 = Valkyria Chronicles III = 
 
 Senjō no Valkyria 3 : <unk> Chronicles is a tactical role @-@ playing video game . It sold 1 @,@ 000 copies at $ 3 @.@ 5 each . 
 
 = = Gameplay = = 
 
 The game 's " first person " mode is new . 
"""
LAMBADA = [{"text": "\u201cHe said,\u201d she   replied. \u2018Look at the dog"},
           {"text": "it was a dark night and the end of the story"}]
LM1B = """The company 's shares fell , analysts said .
`` We do n't know , '' he said .
"""


@pytest.fixture
def corpus_files(tmp_path):
  files = {"ptb": tmp_path / "ptb.test.txt", "wikitext2": tmp_path / "wiki.test.tokens",
           "lambada": tmp_path / "lambada_test.jsonl", "lm1b": tmp_path / "news.en.heldout",
           "text": tmp_path / "book.txt"}
  files["ptb"].write_text(PTB)
  files["wikitext2"].write_text(WIKI)
  files["lambada"].write_text("\n".join(json.dumps(x) for x in LAMBADA) + "\n")
  files["lm1b"].write_text(LM1B)
  files["text"].write_text("Plain text, kept as is.\n")
  return {k: str(v) for k, v in files.items()}


def test_ptb_files_are_read_per_sentence_and_detokenised(corpus_files):
  docs = zero_shot.load_texts("ptb", paths=[corpus_files["ptb"]])
  assert docs[0] == "no it wasn't black monday"
  assert "<unk> it's the second time" in docs[1] and " N points" in docs[1]
  assert docs[2] == "the (unofficial) tally, he said."


def test_wikitext_files_are_one_document_with_markers_undone(corpus_files):
  (doc,) = zero_shot.load_texts("wikitext2", paths=[corpus_files["wikitext2"]])
  assert "Valkyria Chronicles III" in doc and "= Valkyria" not in doc
  assert "role-playing video game." in doc and "1,000 copies" in doc and "3.5 each" in doc
  assert "game's \"first person\" mode" in doc and "\nGameplay\n" in doc


def test_lambada_jsonl_passages_get_straight_quotes_and_stay_whole(corpus_files):
  docs = zero_shot.load_texts("lambada", paths=[corpus_files["lambada"]])
  assert docs == ['"He said," she replied. \'Look at the dog',
                  "it was a dark night and the end of the story"]
  batches = list(zero_shot.encode_batches(docs, BYTE, seq_len=16, batch_size=4,
                                          packing=zero_shot.PACKING["lambada"]))
  assert len(batches) == 1 and batches[0]["tokens"].shape == (4, 16)
  assert BYTE.decode(batches[0]["tokens"][0]) == docs[0][-16:]  # the target word is kept
  np.testing.assert_array_equal(batches[0]["mask"].sum(1), [16, 16, 0, 0])


def test_lm1b_and_text_files_load_and_pack_into_full_batches(corpus_files):
  lm1b = zero_shot.load_texts("lm1b", paths=[corpus_files["lm1b"]])
  assert lm1b == ["The company's shares fell, analysts said.", '"We don\'t know," he said.']
  text = zero_shot.load_texts("text", paths=[corpus_files["text"]])
  assert text == ["Plain text, kept as is.\n"]
  batches = list(zero_shot.encode_batches(lm1b, BYTE, seq_len=32, batch_size=2))
  stream = sum(len(BYTE.encode(t)) for t in lm1b) + 1  # one EOS between documents
  assert sum(int(b["mask"].sum()) for b in batches) == stream
  assert all(b["tokens"].shape == (2, 32) for b in batches)
  joined = np.concatenate([b["tokens"][b["mask"] == 1] for b in batches])
  assert BYTE.eos_id in joined.tolist()


def test_zero_shot_sets_evaluate_end_to_end_with_a_model(corpus_files):
  model, params = oracle("ar", BYTE.vocab_size, BYTE_LOGITS)
  for name in ("ptb", "wikitext2", "lambada", "lm1b"):
    texts = zero_shot.load_texts(name, paths=[corpus_files[name]])
    result = ev.evaluate_perplexity(model, params, zero_shot.encode_batches(
        texts, BYTE, seq_len=32, batch_size=4, packing=zero_shot.PACKING[name]))
    assert result.label == "exact" and result.num_tokens > 0 and math.isfinite(result.nll)


def test_zero_shot_loader_errors_name_the_problem(tmp_path):
  with pytest.raises(ValueError, match="unknown zero-shot set"):
    zero_shot.load_texts("imdb", paths=["x"])
  with pytest.raises(ValueError, match="no such file"):
    zero_shot.load_texts("ptb", paths=[str(tmp_path / "missing.txt")])
  with pytest.raises(ValueError, match="local files only"):
    zero_shot.read_remote("text")


def test_hub_loaders_without_the_datasets_package_say_what_to_install(monkeypatch):
  import builtins  # pylint: disable=import-outside-toplevel
  real_import = builtins.__import__

  def no_datasets(name, *args, **kwargs):
    if name == "datasets":
      raise ImportError("No module named 'datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_datasets)
  for name in ("ptb", "wikitext2", "wikitext103", "lambada"):
    with pytest.raises(ImportError, match="armd-jax\\[hf\\]"):
      zero_shot.read_remote(name)


# -- a trained evaluator on a known Markov chain -----------------------------------------


@pytest.mark.slow
def test_a_trained_ar_evaluator_recovers_the_entropy_of_a_markov_chain():
  from test_learns_ar import VOCAB, expected_nll_per_token, markov_corpus, trained

  transition = np.random.default_rng(0).dirichlet(np.full(VOCAB, 0.5), size=VOCAB)
  train_set, stationary = markov_corpus(transition, 8192, seed=1)
  valid, _ = markov_corpus(transition, 2048, seed=2)
  model, params = trained(train_set, steps=100, kind="ar")
  target = expected_nll_per_token(transition, stationary)
  exact = ev.evaluate_perplexity(model, params, batches_of(valid, 256))
  generative = ev.generative_perplexity(valid, ev.ModelEvaluator(model, params, name="markov"))
  # 32768 validation tokens: the empirical mean is within ~0.01 nats of the entropy, so a
  # model at the entropy lands in (target - 0.02, target + 0.04); a unigram model is at
  # target + 0.22 (as in test_learns_ar).
  for nll in (exact.nll, generative.nll):
    assert target - 0.02 < nll < target + 0.04, (nll, target)
  assert exact.label == "exact" and abs(exact.nll - generative.nll) < 1e-5


# -- FLOPs per sample of generation ---------------------------------------------------


def test_program_flops_counts_every_iteration_of_a_scan_and_of_nested_loops():
  from armd_jax import flops  # pylint: disable=import-outside-toplevel
  x = jnp.ones((32, 32))
  matmul = 2 * 32 ** 3

  def power(x, n):  # n matrix products in a scan
    return jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=n)[0]

  def nested(x):  # a fori_loop (a scan) of 4 scans of 3
    return jax.lax.fori_loop(0, 4, lambda i, c: power(c, 3), x)

  assert flops.compiled_flops(jax.jit(lambda x: power(x, 8)), x) < 1.01 * matmul  # XLA: once
  assert abs(flops.program_flops(jax.jit(lambda x: power(x, 8)), x) / matmul - 8) < 0.01
  assert abs(flops.program_flops(jax.jit(nested), x) / matmul - 12) < 0.01


@pytest.fixture(scope="module")
def micro_armd():
  """A 2-layer ARMD (1 two-stream layer) of width 32 for N <= 32."""
  model = armd_jax.build_model(tiny_config(num_layers=2, num_two_stream_layers=1, num_heads=2))
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model, nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens,
                                         orders.left_to_right(1, 8)))


def test_sequential_generation_flops_grow_with_the_number_of_decoding_steps(micro_armd):
  # N calls of one row each: doubling N doubles the calls and lengthens the cache each
  # call attends over, so the FLOPs more than double. Counting the loop body once, as
  # XLA's analysis does, would leave them nearly flat.
  model, params = micro_armd
  short, long = (ev.generation_flops(model, params, batch_size=2, length=n) for n in (16, 32))
  assert 2.0 < long / short < 2.6, (short, long)


def test_strided_decoding_saves_calls_not_flops_and_confidence_probes_cost_full_passes(
    micro_armd):
  # N = 16, k = 4: confidence order makes 2 N/k - 1 = 7 calls, as many as strided S = 4
  # (N/S + S - 1 = 7). Each of its N/k - 1 = 3 probes runs the query stream (the top
  # 1 of 2 layers, and the head) over all N positions; the exact calls read every
  # position once, like the strided ones. So confidence / strided ~ 1 + 3 c, c the cost
  # of a probe row over an exact row (> 1/2 here): above 2.5, where counting each probe
  # as one width-k call would give about 1.
  model, params = micro_armd
  sequential, strided = (ev.generation_flops(model, params, batch_size=2, length=16,
                                             streams=s) for s in (1, 4))
  confidence = ev.generation_flops(model, params, batch_size=2, length=16,
                                   order="confidence", k=4)
  # Strided reads the same 16 positions in wider calls: the same work to a few percent
  # (its caches carry S - 1 more tail rows).
  assert abs(strided / sequential - 1) < 0.05, (sequential, strided)
  assert 2.5 < confidence / strided < 4.5, (strided, confidence)
