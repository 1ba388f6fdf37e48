"""The lm-evaluation-harness backend: the harness's own tasks, registry and evaluator run
on our trained workdirs, offline (task YAMLs written here over local json files), and
its numbers are our own one-pass / KV-cached scores of the same tokens."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")  # the [eval] extra (in [test])

# pylint: disable=g-import-not-at-top,wrong-import-position
from lm_eval import evaluator
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from armd_jax import lm_eval as backend
from armd_jax import sampling, train
from armd_jax.eval import perplexity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHOICES = [
    {"question": "the cat sat on the", "choices": [" mat", " xq", " ha ha"], "label": 0},
    {"question": "and then", "choices": [" it was", " zzz"], "label": 0},
    {"question": "", "choices": ["a start", "qqqq"], "label": 1},  # empty context
]
PASSAGES = [  # LAMBADA-style: the target is the last word
    {"text": "she went to the market and bought some bread"},
    {"text": "it is a truth universally acknowledged that a single man wants"},
    {"text": "x " * 30 + "longer than max_len so the context is cut at its left end"},
]
DOCUMENTS = [  # rolling perplexity; the last one spans several 32-token windows
    {"text": "a short document."},
    {"text": "The quick brown fox jumps over the lazy dog. " * 3},
]


def write_tasks(folder) -> str:
  """Three offline tasks (multiple choice, last word, rolling perplexity) over local
  json files: the same YAML keys as the harness's piqa, lambada_openai and wikitext."""
  folder.mkdir(parents=True, exist_ok=True)
  tasks = {
      "tiny_choice": (CHOICES, {
          "output_type": "multiple_choice", "doc_to_text": "{{question}}",
          "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
          "target_delimiter": "",
          "metric_list": [{"metric": "acc"}]}),
      "tiny_lastword": (PASSAGES, {
          "output_type": "loglikelihood",
          "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
          "doc_to_target": "{{' '+text.split(' ')[-1]}}", "target_delimiter": "",
          "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                           "higher_is_better": False},
                          {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}),
      "tiny_rolling": (DOCUMENTS, {
          "output_type": "loglikelihood_rolling", "doc_to_text": "",
          "doc_to_target": "{{text}}",
          "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                          {"metric": "bits_per_byte"}]}),
  }
  for name, (rows, fields) in tasks.items():
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", **fields, "metadata": {"version": 1.0}}
    (folder / f"{name}.yaml").write_text(json.dumps(config, indent=1))  # JSON is YAML
  return str(folder)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return write_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def tasks(task_dir):
  """The harness's task manager over our three tasks only (indexing its thousands of
  built-in tasks takes seconds)."""
  return TaskManager(include_path=task_dir, include_defaults=False)


@pytest.fixture(scope="module")
def armd(tiny_workdir):
  return backend.ArmdLM(tiny_workdir)


def own_score(lm, context_ids, continuation_ids, block_ids=None):
  """Our KV-cached teacher-forced score (`armd_jax.sampling.score`) of a continuation.

  Left to right, the row is padded to max_len with later singleton blocks (read by no
  real token), so every such call shares one compiled decoder.
  """
  ids = list(context_ids) + list(continuation_ids)
  if block_ids is None:
    ids = ids + [lm.vocab.pad_id] * (lm.max_len - len(ids))
    block_ids = np.arange(1, len(ids) + 1)
  lp = sampling.score(lm.model, lm.params, np.asarray([ids], np.int32),
                      np.asarray([block_ids], np.int32))
  end = len(context_ids) + len(continuation_ids)
  return float(np.sum(np.asarray(lp)[0, len(context_ids):end], dtype=np.float64))


def harness_pair(lm, context, continuation):
  """The token split the harness makes: trailing context spaces move to the
  continuation; an empty context becomes the EOS token."""
  if not context:
    return [lm.eot_token_id], lm.tok_encode(continuation)
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  return lm.tok_encode(stripped), lm.tok_encode(continuation)


def test_the_harness_finds_the_backend_in_its_registry():
  from lm_eval.api.registry import get_model
  assert get_model("armd_jax") is backend.ArmdLM


@pytest.fixture(scope="module")
def harness_out(tiny_workdir, tasks):
  """One harness run of our three tasks on the shared `tiny` workdir, the backend named
  by its registry name with batch size 4 (each run also logs the harness's environment
  report, which takes seconds)."""
  return evaluator.simple_evaluate(
      model="armd_jax", model_args={"workdir": tiny_workdir, "batch_size": 4},
      tasks=["tiny_choice", "tiny_lastword", "tiny_rolling"], task_manager=tasks,
      log_samples=True, bootstrap_iters=0)


def test_multiple_choice_and_last_word_scores_are_our_exact_cached_scores(armd, harness_out):
  out = harness_out
  hits = []
  for sample in out["samples"]["tiny_choice"]:
    doc = sample["doc"]
    ours = [own_score(armd, *harness_pair(armd, doc["question"], c)) for c in doc["choices"]]
    theirs = [r[0][0] for r in sample["resps"]]
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-4)
    hits.append(int(np.argmax(ours)) == doc["label"])
  assert out["results"]["tiny_choice"]["acc,none"] == pytest.approx(np.mean(hits))
  total, words = 0.0, 0
  for sample in out["samples"]["tiny_lastword"]:
    context, continuation = sample["arguments"][0]
    ctx, cont = backend.fit_pair(*harness_pair(armd, context, continuation), armd.max_len)
    ours = own_score(armd, ctx, cont)
    assert sample["resps"][0][0][0] == pytest.approx(ours, abs=1e-4)
    total, words = total + ours, words + 1
  # The passage longer than max_len was cut to its rightmost max_len tokens.
  assert len(armd.tok_encode(PASSAGES[2]["text"])) > armd.max_len
  assert out["results"]["tiny_lastword"]["perplexity,none"] == pytest.approx(
      math.exp(-total / words), rel=1e-4)


def test_rolling_perplexity_scores_every_token_once_with_full_windows(armd, harness_out):
  out = harness_out
  n = armd.max_len
  total_ll, total_bytes = 0.0, 0
  for sample, doc in zip(out["samples"]["tiny_rolling"], DOCUMENTS):
    ids = armd.tok_encode(doc["text"])
    # Our own windows: the first n - 1 tokens after EOS, then chunks of n - 1 tokens,
    # each scored after the tokens before it (n in all; the last chunk may be shorter).
    ours = own_score(armd, [armd.eot_token_id], ids[:n - 1])
    for end in range(n - 1, len(ids), n - 1):
      stop = min(end + n - 1, len(ids))
      ours += own_score(armd, ids[stop - n:end], ids[end:stop])
    assert sample["resps"][0][0] == pytest.approx(ours, abs=1e-4)
    total_ll += ours
    total_bytes += len(doc["text"].encode("utf-8"))
  assert len(armd.tok_encode(DOCUMENTS[1]["text"])) > 3 * n  # several windows
  assert out["results"]["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(
      -total_ll / total_bytes / math.log(2), rel=1e-5)


def one_pass_nll(lm, ids):
  """Exact left-to-right NLL of one sequence by the evaluate command's one-pass path
  (`armd_jax.eval.perplexity.sequence_nll`)."""
  batch = {"tokens": np.asarray([ids], np.int32), "mask": np.ones((1, len(ids)), np.int32)}
  return float(perplexity.sequence_nll(lm.model, lm.params, batch, jax.random.PRNGKey(0),
                                       perplexity.EvalOrder("left_to_right"))[0])


def test_a_document_within_max_len_scores_its_one_pass_perplexity(armd):
  text = "a short document."
  ids = [armd.eot_token_id] + armd.tok_encode(text)
  (harness,) = armd.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  first = -one_pass_nll(armd, ids[:1])  # log p(EOS) at position 0, not part of the text
  assert harness == pytest.approx(-one_pass_nll(armd, ids) - first, abs=1e-4)


def assert_chain_rule(lm):
  """log p(cont | ctx) = log p(ctx + cont) - log p(ctx): one-pass sums of our own."""
  ctx, cont = "to be or not", " to be"
  (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
  whole, head = lm.tok_encode(ctx + cont), lm.tok_encode(ctx)
  assert ll == pytest.approx(one_pass_nll(lm, head) - one_pass_nll(lm, whole), abs=1e-4)


def test_left_to_right_loglikelihood_follows_the_chain_rule(armd):
  assert_chain_rule(armd)


def test_strided_loglikelihood_is_the_exact_cached_score_of_that_order(tiny_workdir):
  lm = backend.ArmdLM(tiny_workdir, order="strided", streams=4)
  assert lm.describe()["likelihood"] == "exact"
  pairs = [("the cat sat on", " the mat today"), ("hello", " world")]
  got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
  for (context, continuation), (ll, _) in zip(pairs, got):
    ctx, cont = harness_pair(lm, context, continuation)
    ids = backend.pair_block_ids(len(ctx), len(cont), len(ctx) + len(cont), "strided", 4)
    assert ll == pytest.approx(own_score(lm, ctx, cont, ids), abs=1e-4)


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(armd):
  gen = armd.generate_until([Instance("generate_until", {},
                                      ("the ", {"until": [], "max_gen_toks": 4}), 0)])[0]
  other = "".join(chr(ord(c) + 1) for c in gen)
  (_, greedy), (_, not_greedy) = armd.loglikelihood(
      [Instance("loglikelihood", {}, ("the ", gen), 0),
       Instance("loglikelihood", {}, ("the ", other), 1)])
  assert greedy and not not_greedy


def test_generate_until_stops_at_an_until_string_and_max_gen_toks(armd):
  def gen(until, max_gen_toks, **kw):
    return armd.generate_until([Instance("generate_until", {}, (
        "the cat ", {"until": until, "max_gen_toks": max_gen_toks, **kw}), 0)])[0]
  free = gen([], 12)
  assert 0 < len(free) <= 12  # byte tokens: at most one character each
  stop = free[len(free) // 2:len(free) // 2 + 1]
  cut = gen([stop], 12)
  assert cut == free[:free.index(stop)] and stop not in cut


def test_strided_and_confidence_generation_honour_the_budget(tiny_workdir):
  for settings in ({"order": "strided", "streams": 2}, {"generation": "confidence", "k": 2}):
    lm = backend.ArmdLM(tiny_workdir, **settings)
    out = lm.generate_until([Instance("generate_until", {}, (
        "the cat ", {"until": [], "max_gen_toks": 7}), 0)])[0]
    assert len(out) <= 7, settings  # byte tokens: at most one character each


def test_options_an_ar_model_does_not_have_are_refused_naming_them():
  with pytest.raises(ValueError, match="streams=2 needs order='strided'"):
    backend.BackendConfig(streams=2)
  with pytest.raises(ValueError, match="need an 'armd' workdir"):
    backend.BackendConfig(order="strided", streams=2).check_kind("ar")
  with pytest.raises(ValueError, match="max_len=8"):
    backend.fit_pair([1, 2], list(range(9)), 8)


def test_an_empty_continuation_scores_zero_and_is_greedy(armd):
  assert armd.loglikelihood([Instance("loglikelihood", {}, ("the cat", ""), 0)]) == [(0.0, True)]


def tiny_kind(kind, steps, **data):
  from armd_jax.train.defaults import config_from_file
  config = config_from_file(os.path.join(REPO, "configs", "tiny.py"))
  config.model.kind = kind
  config.train.num_steps = steps
  config.train.eval_every = 0
  config.train.checkpoint_every = steps
  config.data.update(data)
  return config


def gpt2_like_tokenizer(folder, text: str) -> str:
  """A byte-level BPE with <|endoftext|> (GPT-2's layout: a word's leading space is part
  of its token), trained on `text`; returns its tokenizer.json."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator([text] * 5, tokenizers.trainers.BpeTrainer(
      vocab_size=320, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(folder / "tokenizer.json"))
  return str(folder / "tokenizer.json")


@pytest.mark.slow
def test_ar_with_a_bpe_vocabulary_and_mdlm_run_the_tasks_labelled_exact_and_bound(
    tmp_path_factory, tasks):
  folder = tmp_path_factory.mktemp("ar")
  corpus = "to be or not to be, that is the question.\n\n" * 40
  (folder / "corpus.txt").write_text(corpus)
  ar_dir = str(folder / "run")
  train.train_and_evaluate(tiny_kind(
      "ar", 4, task="text_files", train_files=str(folder / "corpus.txt"), vocab="hf",
      hf_tokenizer=gpt2_like_tokenizer(folder, corpus), document_split="paragraph"), ar_dir)
  ar = backend.ArmdLM(ar_dir)
  assert ar.describe()["likelihood"] == "exact"
  assert "HuggingFaceVocabulary" in ar.describe()["vocab"]
  # The harness's split: " to be" keeps its leading space inside its first BPE token.
  ctx, cont = harness_pair(ar, "to be or not", " to be")
  assert ar.tok_encode("to be or not to be") == ctx + cont
  assert ar.tok_decode(cont[:1]).startswith(" ")
  assert_chain_rule(ar)
  free = ar.generate_until([Instance("generate_until", {}, (
      "to be", {"until": [], "max_gen_toks": 8}), 0)])[0]
  cut = ar.generate_until([Instance("generate_until", {}, (
      "to be", {"until": [free[-1:]], "max_gen_toks": 8}), 0)])[0]
  assert cut == free[:free.index(free[-1:])]

  mdlm_dir = str(tmp_path_factory.mktemp("mdlm"))
  train.train_and_evaluate(tiny_kind("mdlm", 4), mdlm_dir)
  with pytest.warns(UserWarning, match="a bound, not exact"):
    mdlm = backend.ArmdLM(mdlm_dir, mdlm_samples=8)
  assert mdlm.describe()["likelihood"] == "bound" and mdlm.describe()["order"] == "elbo"
  # Each MDLM request runs at its own length (a bidirectional model would read padding).
  out = evaluator.simple_evaluate(model=mdlm, tasks=["tiny_choice"], task_manager=tasks,
                                  limit=1, log_samples=True, bootstrap_iters=0)
  elbos = [r[0][0] for r in out["samples"]["tiny_choice"][0]["resps"]]
  assert all(math.isfinite(e) and e < 0 for e in elbos)
  text = mdlm.generate_until([Instance("generate_until", {}, (
      "the ", {"until": [], "max_gen_toks": 6}), 0)])[0]
  assert len(text) <= 6


@pytest.mark.slow
def test_the_command_writes_the_harness_results_labelled_exact(tiny_workdir, task_dir, tmp_path):
  output = tmp_path / "results.json"
  proc = subprocess.run(
      [sys.executable, "-m", "armd_jax.lm_eval", f"--workdir={tiny_workdir}",
       "--tasks=tiny_lastword", f"--include_path={task_dir}", "--noinclude_defaults",
       "--limit=2",
       "--order=strided", "--streams=2", f"--output={output}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "likelihoods are EXACT (strided, S=2)" in proc.stdout
  results = json.loads(output.read_text())
  assert results["armd_jax"]["likelihood"] == "exact"
  assert results["armd_jax"]["order"] == "strided" and results["armd_jax"]["streams"] == 2
  assert math.isfinite(results["results"]["tiny_lastword"]["perplexity,none"])
