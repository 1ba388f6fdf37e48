"""Generative perplexity of samples under an evaluator LM, and per-sample unigram entropy.

The MDLM protocol: generate unconditional samples, score them with a separate
left-to-right LM (the *evaluator*), report exp(mean NLL per evaluator token) and the
mean over samples of the entropy of each sample's token histogram (low entropy flags
repetitive text that a low generative PPL would otherwise reward).

Evaluators (each states its `name` in every result):
- `ModelEvaluator`: any AR or ARMD model this library trained (exact left-to-right
  likelihood, sequences longer than the model's max_len scored in windows);
  `ModelEvaluator.from_workdir(workdir)` loads a checkpoint (EMA params) through
  `armd_jax.train.load_trained`. An AR checkpoint is the default evaluator.
- `HFEvaluator`: a Hugging Face causal LM (`HFEvaluator.from_pretrained('gpt2-large')`
  on machines that have `transformers` and the weights); texts are re-tokenised with
  its own tokenizer and scored after its BOS/EOS token.
When the evaluator shares the generator's vocabulary the sample tokens are scored
directly; otherwise samples are decoded to text and re-tokenised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from armd_jax import registry
from armd_jax.eval import perplexity as ppl_lib


def unigram_entropy(tokens: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Entropy (nats) of each row's empirical token distribution: [B] float64.

  Args:
    tokens: [B, N] int; mask: optional [B, N] {0, 1}, only mask == 1 tokens count.
  """
  tokens = np.asarray(tokens)
  mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask).astype(bool)
  out = np.zeros(tokens.shape[0])
  for b in range(tokens.shape[0]):
    _, counts = np.unique(tokens[b][mask[b]], return_counts=True)
    if counts.size:
      p = counts / counts.sum()
      out[b] = float(-(p * np.log(p)).sum())
  return out


@dataclasses.dataclass(frozen=True)
class GenerativeResult:
  """Generative PPL (under `evaluator`) and unigram entropy (nats and bits) of samples."""

  ppl: float
  nll: float
  num_tokens: int
  entropy: float
  evaluator: str
  num_samples: int

  def as_dict(self) -> Dict[str, object]:
    """JSON-ready summary."""
    return {"gen_ppl": self.ppl, "gen_nll": self.nll, "num_tokens": self.num_tokens,
            "entropy_nats": self.entropy, "entropy_bits": self.entropy / math.log(2.0),
            "evaluator": self.evaluator, "num_samples": self.num_samples}

  def __str__(self) -> str:
    return (f"generative PPL {self.ppl:.3f} under {self.evaluator} over {self.num_samples} "
            f"samples; unigram entropy {self.entropy:.3f} nats "
            f"({self.entropy / math.log(2.0):.3f} bits)")


class ModelEvaluator:
  """Scores token sequences with an AR or ARMD model of this library (exact, left to right).

  Args:
    model, params: an 'ar' or 'armd' model and its variables.
    vocab: its vocabulary (needed only to score texts).
    name: how results name the evaluator, e.g. 'AR checkpoint /tmp/ar (step 2000)'.
  """

  def __init__(self, model, params, vocab=None, name: str = "in-memory model"):
    if not registry.kind_of(model).exact_scorer:
      scorers = [k for k, v in registry.KINDS.items() if v.exact_scorer]
      raise ValueError(f"an evaluator must be a left-to-right model with an exact likelihood "
                       f"{scorers}, got kind {model.config.kind!r}.")
    self.model, self.params, self.vocab = model, params, vocab
    self.name = f"{name} [{model.config.kind}, exact left-to-right]"

  @classmethod
  def from_workdir(cls, workdir: str, use_ema: bool = True) -> "ModelEvaluator":
    """Loads a trained checkpoint through `armd_jax.train.load_trained`."""
    from armd_jax import train  # pylint: disable=import-outside-toplevel
    trained = train.load_trained(workdir, use_ema=use_ema)
    return cls(trained.model, trained.params, trained.vocab,
               name=f"checkpoint {workdir} (step {trained.step})")

  def score_tokens(self, tokens: np.ndarray, mask: Optional[np.ndarray] = None
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Per-row NLL sums (nats) and token counts [B] of tokens [B, N].

    Rows longer than the model's max_len are scored in consecutive windows (each
    window restarts from BOS: a slight overestimate, stated here).
    """
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones(tokens.shape, np.int32) if mask is None else np.asarray(mask, np.int32)
    window = self.model.config.max_len
    nll = np.zeros(tokens.shape[0])
    order = ppl_lib.EvalOrder("left_to_right")
    for start in range(0, tokens.shape[1], window):
      batch = {"tokens": jnp.asarray(tokens[:, start:start + window]),
               "mask": jnp.asarray(mask[:, start:start + window])}
      nll += np.asarray(ppl_lib.sequence_nll(self.model, self.params, batch,
                                             jax.random.PRNGKey(0), order, 1))
    return nll, mask.sum(1)

  def score_texts(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-text NLL sums and token counts under this model's vocabulary."""
    if self.vocab is None:
      raise ValueError("ModelEvaluator.score_texts needs the evaluator's vocab.")
    encoded = [list(self.vocab.encode(t)) or [self.vocab.eos_id] for t in texts]
    length = max(len(e) for e in encoded)
    tokens = np.full((len(texts), length), self.vocab.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, e in enumerate(encoded):
      tokens[i, :len(e)], mask[i, :len(e)] = e, 1
    return self.score_tokens(tokens, mask)


class HFEvaluator:
  """Scores texts with a Hugging Face causal LM (PyTorch or any callable returning .logits).

  Args:
    model: callable `model(input_ids) -> object with .logits [B, T, V]`.
    tokenizer: callable `tokenizer(text)['input_ids'] -> list[int]` with a
      `bos_token_id` or `eos_token_id` used as the start token.
    name: stated in results (e.g. 'HF gpt2-large').
    max_length: context window; longer texts are scored in windows.
    to_input: converts an int numpy array [1, T] to what `model` accepts.
  """

  def __init__(self, model, tokenizer, name: str, max_length: int = 1024, to_input=None):
    self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
    self.name = f"HF {name} [exact left-to-right]"
    self.to_input = to_input if to_input is not None else (lambda a: a)
    start = getattr(tokenizer, "bos_token_id", None)
    self.start_id = start if start is not None else getattr(tokenizer, "eos_token_id", None)
    if self.start_id is None:
      raise ValueError("HFEvaluator: the tokenizer has neither bos_token_id nor eos_token_id.")

  @classmethod
  def from_pretrained(cls, name_or_path: str, max_length: int = 1024) -> "HFEvaluator":
    """Loads `transformers` AutoModelForCausalLM/AutoTokenizer (PyTorch) if installed."""
    try:
      import torch  # pylint: disable=import-outside-toplevel
      import transformers  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("HFEvaluator needs `transformers` and `torch` "
                        "(pip install transformers torch).") from e
    model = transformers.AutoModelForCausalLM.from_pretrained(name_or_path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    length = min(max_length, getattr(model.config, "n_positions", max_length))
    return cls(model, tokenizer, name_or_path, length,
               to_input=lambda a: torch.as_tensor(a, dtype=torch.long))

  def score_texts(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-text NLL sums (nats) and token counts under the HF model."""
    nll, counts = np.zeros(len(texts)), np.zeros(len(texts), np.int64)
    for i, text in enumerate(texts):
      ids = list(self.tokenizer(text)["input_ids"])
      for start in range(0, len(ids), self.max_length - 1):
        chunk = [self.start_id] + ids[start:start + self.max_length - 1]
        logits = self.model(self.to_input(np.asarray([chunk])))
        logits = np.asarray(_to_numpy(logits.logits), np.float64)[0]  # [T, V]
        log_probs = logits - _logsumexp(logits)
        nll[i] -= log_probs[np.arange(len(chunk) - 1), chunk[1:]].sum()
      counts[i] = len(ids)
    return nll, counts


def _to_numpy(x):
  return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _logsumexp(x: np.ndarray) -> np.ndarray:
  m = x.max(-1, keepdims=True)
  return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def generative_perplexity(tokens: np.ndarray, evaluator, *, vocab=None,
                          mask: Optional[np.ndarray] = None) -> GenerativeResult:
  """Generative PPL of sample tokens [B, N] under `evaluator`, plus unigram entropy.

  Args:
    tokens: generated ids [B, N] in the generator's vocabulary.
    evaluator: a `ModelEvaluator` or `HFEvaluator`.
    vocab: the generator's vocabulary. If it is the evaluator's own (`is`) or None with
      a `ModelEvaluator`, the tokens are scored directly; otherwise they are decoded
      and the texts re-tokenised by the evaluator.
    mask: optional [B, N] {0, 1} marking real sample tokens (e.g. before EOS).
  """
  tokens = np.asarray(tokens)
  direct = isinstance(evaluator, ModelEvaluator) and (vocab is None or vocab is evaluator.vocab)
  if direct:
    nll, counts = evaluator.score_tokens(tokens, mask)
  else:
    if vocab is None:
      raise ValueError("generative_perplexity: pass the generator's vocab to decode samples "
                       "for an evaluator with another tokenizer.")
    rows = tokens if mask is None else [t[np.asarray(m).astype(bool)] for t, m in
                                        zip(tokens, mask)]
    nll, counts = evaluator.score_texts([vocab.decode(list(r)) for r in rows])
  total = int(np.sum(counts))
  if total == 0:
    raise ValueError("generative_perplexity: no tokens to score.")
  mean_nll = float(np.sum(nll) / total)
  return GenerativeResult(math.exp(mean_nll), mean_nll, total,
                          float(unigram_entropy(tokens, mask).mean()), evaluator.name,
                          tokens.shape[0])


@dataclasses.dataclass(frozen=True)
class Samples:
  """Generated tokens [B, N], network calls made for the batch, and wall seconds."""

  tokens: np.ndarray
  num_calls: int
  seconds: float


def generate_samples(model, params, rng: jax.Array, *, batch_size: int, length: int,
                     streams: int = 1, num_steps: Optional[int] = None, sampler=None,
                     warmup: bool = True) -> Samples:
  """Unconditional samples from a model of any kind, timed after an optional warm-up.

  Each kind's generator comes from `armd_jax.registry`: 'armd': KV-cached strided
  decoding with S = `streams` (N/S + S - 1 calls); 'ar': KV-cached left to right (N
  calls; streams must be 1); 'mdlm': ancestral sampling with `num_steps` reverse steps
  (default `registry.matched_mdlm_steps` = N/S + S - 1, the ARMD call count for the same
  S, so the two are compared at matched numbers of network calls).
  """
  import time  # pylint: disable=import-outside-toplevel

  generate = registry.kind_of(model).generate

  def run(key):
    return generate(model, params, key, batch_size=batch_size, length=length,
                    streams=streams, sampler=sampler, num_steps=num_steps)

  if warmup:
    jax.block_until_ready(run(jax.random.fold_in(rng, 1)).tokens)
  start = time.perf_counter()
  out = run(rng)
  tokens = np.asarray(jax.block_until_ready(out.tokens))
  return Samples(tokens, int(out.num_calls), time.perf_counter() - start)


def describe_samples(tokens: np.ndarray, vocab, limit: int = 3) -> List[str]:
  """The first `limit` samples decoded, for printing."""
  return [vocab.decode(list(np.asarray(t))) for t in np.asarray(tokens)[:limit]]
