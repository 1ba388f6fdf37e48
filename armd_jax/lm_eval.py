"""An lm-evaluation-harness backend for any workdir of ours (ARMD, AR or MDLM).

  python -m armd_jax.lm_eval --workdir=DIR --tasks=lambada_openai,piqa
      [--include_path=DIR [--noinclude_defaults]]
      [--order=left_to_right|strided --streams=S]
      [--generation=order|confidence --k=K] [--limit=N] [--batch_size=B]
      [--num_fewshot=F] [--mdlm_samples=M] [--output=FILE.json]

`ArmdLM` is an `lm_eval.api.model.TemplateLM` registered with the harness's model
registry as "armd_jax" (importing this module registers it), so the harness's own
`simple_evaluate(model="armd_jax", model_args={"workdir": DIR}, tasks=[...])` runs it;
the command above is a thin wrapper around that call and its `TaskManager`.

What each request type returns:
- `loglikelihood` (context, continuation): log p(continuation | context) and whether
  greedy decoding would reproduce it. 'armd' and 'ar': exact, one network pass per
  batch of requests (right padded, padding moved to a last block), the context as earlier
  singleton blocks and the continuation scored left to right, or, for ARMD with
  `order='strided'`, in S contiguous streams (`strided_ids`), the exact likelihood of the
  strided sampler. Inputs longer than the model's max_len keep their rightmost tokens.
  'mdlm': minus a Monte Carlo negative ELBO of the continuation given the (unmasked)
  context: a bound in expectation, never exact; a warning says so and `describe()`
  labels it.
- `loglikelihood_rolling` (text): the document's log-likelihood given one EOS token,
  windowed with the harness's `get_rolling_token_windows` / `make_disjoint_window` so
  that every token is scored exactly once with as much context as max_len allows.
- `generate_until` (context, gen_kwargs): the workdir kind's generator
  (`armd_jax.registry`, for ARMD `armd_jax.sampling.generate`) with the context as the
  prompt: sequential (S = 1), strided (S streams) or confidence-ordered
  (`generation='confidence'`), greedy unless `do_sample`; `max_gen_toks` tokens are
  drawn and the text is cut at the first EOS and the first `until` string.

Tokenisation is the workdir's own vocabulary (`armd_jax.data.load_vocab`: bytes,
SentencePiece or a Hugging Face tokenizer); the harness's `TemplateLM` splits
(context, continuation) by encoding context + continuation, as its Hugging Face model does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

try:
  from lm_eval import utils as lm_eval_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the install
  raise ImportError("armd_jax.lm_eval needs the lm-evaluation-harness: "
                    "pip install -e '.[eval]'.") from e

from armd_jax import registry
from armd_jax.losses import token_log_probs
from armd_jax.models import mdlm as mdlm_lib

SCORING_ORDERS = ("left_to_right", "strided")
GENERATIONS = ("order", "confidence")
MODEL_NAME = "armd_jax"  # the name in the harness's model registry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BackendConfig:
  """How `ArmdLM` scores and generates.

  Attributes:
    order: the scoring and generation order of an 'armd' model: 'left_to_right' or
      'strided' (continuations in `streams` contiguous streams). 'ar' and 'mdlm'
      workdirs take the default only.
    streams: S for order='strided'.
    generation: 'order' (decode in `order`) or 'confidence' (ARMD's confidence order,
      `k` positions per exact call).
    k: positions revealed per call of generation='confidence'.
    batch_size: requests per network pass (rows of one padded batch).
    mdlm_samples: Monte Carlo draws (t, masks) per request of an 'mdlm' model's ELBO.
    seed: PRNG seed of the MDLM draws and of sampled generations.
    use_ema: load the EMA parameters when the run kept them.
  """

  order: str = "left_to_right"
  streams: int = 1
  generation: str = "order"
  k: int = 1
  batch_size: int = 8
  mdlm_samples: int = 32
  seed: int = 0
  use_ema: bool = True

  def __post_init__(self):
    if self.order not in SCORING_ORDERS:
      raise ValueError(f"order must be one of {SCORING_ORDERS}, got {self.order!r}.")
    if self.generation not in GENERATIONS:
      raise ValueError(f"generation must be one of {GENERATIONS}, got {self.generation!r}.")
    for name in ("streams", "k", "batch_size", "mdlm_samples"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if self.order == "left_to_right" and self.streams != 1:
      raise ValueError(f"streams={self.streams} needs order='strided'.")

  def check_kind(self, kind: str) -> None:
    """Raises ValueError if a model of `kind` cannot score or generate this way."""
    if kind != "armd" and (self.order != "left_to_right" or self.generation != "order"):
      raise ValueError(f"order={self.order!r} / generation={self.generation!r} need an "
                       f"'armd' workdir; a {kind!r} model has one order (use the defaults).")


# ------------------------------------------------------------------ orders and batches


def strided_ids(length: int, streams: int) -> np.ndarray:
  """Dense block ids [length] of `length` tokens in at most `streams` contiguous streams.

  Streams hold ceil(length / streams) tokens (the last may be shorter); the stream heads
  come one per block, then the j-th token of every stream that has one. When `streams`
  divides `length` this is `armd_jax.orders.strided`; streams = 1 is left to right.
  Each block's tokens are conditionally independent given earlier blocks, so the
  product over blocks is a normalised distribution: the score is exact.
  """
  if length < 1 or streams < 1:
    raise ValueError(f"strided_ids: length and streams must be positive, got {length}, "
                     f"{streams}.")
  stride = -(-length // min(streams, length))
  used = -(-length // stride)  # streams that hold a token
  n = np.arange(length)
  return np.where(n % stride == 0, n // stride + 1, used + n % stride).astype(np.int32)


def pair_block_ids(context_len: int, continuation_len: int, length: int, order: str,
                   streams: int) -> np.ndarray:
  """Block ids [length]: the context as singleton blocks 1..P in text order, then the
  continuation (left to right, or `strided_ids`), then padding in one last block."""
  ids = np.empty(length, np.int32)
  ids[:context_len] = np.arange(1, context_len + 1)
  end = context_len + continuation_len
  if order == "strided":
    ids[context_len:end] = context_len + strided_ids(continuation_len, streams)
  else:
    ids[context_len:end] = np.arange(context_len + 1, end + 1)
  ids[end:] = ids[:end].max(initial=0) + 1
  return ids


def bucket_length(length: int, max_len: int) -> int:
  """The padded length of a batch: the next power of two (at least 8), at most max_len
  (few distinct shapes, so few compilations)."""
  return min(max_len, max(8, 1 << max(length - 1, 0).bit_length()))


def fit_pair(context: Sequence[int], continuation: Sequence[int],
             max_len: int) -> Tuple[List[int], List[int]]:
  """(context, continuation) cut to the model: the rightmost max_len tokens are kept.
  An empty continuation stays empty (it scores log 1 = 0 and counts as greedy).

  Raises:
    ValueError: the continuation alone is longer than max_len (it could not be scored
      whole).
  """
  if len(continuation) > max_len:
    raise ValueError(f"loglikelihood: the continuation has {len(continuation)} tokens, more "
                     f"than the model's ModelConfig.max_len={max_len}.")
  keep = max_len - len(continuation)
  return (list(context)[-keep:] if keep else []), list(continuation)


@functools.partial(jax.jit, static_argnums=0)
def _ordered_scores(model, params, tokens: jax.Array, block_ids: jax.Array):
  """One pass of an 'armd' or 'ar' model: per-token log-probs [B, N] and whether each
  token is the argmax [B, N]."""
  logits = model.apply(params, tokens, block_ids)  # [B, N, V]
  return token_log_probs(logits, tokens), jnp.argmax(logits, -1) == tokens


def score_ordered(model, params, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
                  pad_id: int, order: str = "left_to_right", streams: int = 1,
                  batch_size: int = 8) -> List[Tuple[float, bool]]:
  """Exact (log p(continuation | context), is_greedy) of each (context, continuation)
  token pair under an 'armd' or 'ar' model, one network pass per batch.

  Pairs must already fit max_len (`fit_pair`). Requests are sorted by length so that a
  batch pads little; rows are right padded to `bucket_length` and padding is moved into
  a last block, so no scored token conditions on it.
  """
  max_len = model.config.max_len
  results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
  by_length = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
  for start in range(0, len(by_length), batch_size):
    chunk = by_length[start:start + batch_size]
    length = bucket_length(max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk), max_len)
    tokens = np.full((batch_size, length), pad_id, np.int32)  # [B, N]
    block_ids = np.ones((batch_size, length), np.int32)  # [B, N]; empty rows: one block
    for row, i in enumerate(chunk):
      context, continuation = pairs[i]
      if len(context) + len(continuation) > max_len:
        raise ValueError(f"score_ordered: request {i} has {len(context) + len(continuation)} "
                         f"tokens, more than max_len={max_len} (cut it with fit_pair).")
      tokens[row, :len(context) + len(continuation)] = list(context) + list(continuation)
      block_ids[row] = pair_block_ids(len(context), len(continuation), length, order, streams)
    log_probs, greedy = jax.device_get(_ordered_scores(model, params, tokens, block_ids))
    for row, i in enumerate(chunk):
      p, c = len(pairs[i][0]), len(pairs[i][1])
      results[i] = (float(np.sum(log_probs[row, p:p + c], dtype=np.float64)),
                    bool(np.all(greedy[row, p:p + c])))
  return results


@functools.partial(jax.jit, static_argnums=(0, 4))
def _mdlm_draws(model, params, tokens: jax.Array, is_target: jax.Array, num_samples: int,
                rng: jax.Array):
  """Negative-ELBO draws [num_samples] of the targets of one sequence tokens [N] given
  its other tokens, and whether every target is the argmax when all targets are masked.

  Each draw masks every target independently with probability t (stratified t, linear
  schedule) and weighs the masked tokens' NLL by 1/t (`armd_jax.models.mdlm`).
  """
  t = mdlm_lib.stratified_times(jax.random.fold_in(rng, 0), num_samples)  # [S]
  rows = jnp.broadcast_to(tokens, (num_samples,) + tokens.shape)  # [S, N]
  mask = jnp.broadcast_to(is_target, rows.shape)
  noisy, is_masked = mdlm_lib.corrupt(jax.random.fold_in(rng, 1), rows, t, model.config,
                                      mask)
  nelbo = mdlm_lib.elbo_terms(model.apply(params, noisy), rows, is_masked, t)  # [S]
  all_masked = jnp.where(is_target, mdlm_lib.mask_id(model.config), tokens)[None]  # [1, N]
  hits = jnp.argmax(model.apply(params, all_masked)[0], -1) == tokens  # [N]
  return nelbo, jnp.all(hits | ~is_target)


def score_mdlm(model, params, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
               num_samples: int, rng: jax.Array) -> List[Tuple[float, bool]]:
  """(-NELBO of the continuation given the context, is_greedy) per token pair under an
  'mdlm' model: a Monte Carlo lower bound on log p(continuation | context) (an upper
  bound on the NLL), `num_samples` draws each.

  A bidirectional denoiser sees every position, so each request runs alone at its own
  length (no padding it could read); the draws form the batch.
  """
  results = []
  for i, (context, continuation) in enumerate(pairs):
    tokens = np.asarray(list(context) + list(continuation), np.int32)  # [N]
    is_target = np.arange(len(tokens)) >= len(context)  # [N]
    nelbo, greedy = _mdlm_draws(model, params, tokens, is_target, num_samples,
                                jax.random.fold_in(rng, i))
    results.append((-float(np.mean(np.asarray(nelbo, np.float64))), bool(greedy)))
  return results


def rolling_windows(tokens: Sequence[int], prefix_token: int,
                    max_len: int) -> List[Tuple[List[int], List[int]]]:
  """(context, continuation) windows of a document that score every token exactly once
  (the first given `prefix_token`), each window at most max_len tokens in all: the
  harness's `get_rolling_token_windows` (context_len=1) and `make_disjoint_window`.

  The harness's windows are for models that read inputs shifted by one; ours score
  every token of their input, so windows of max_seq_len = max_len - 1 fill max_len.
  """
  if max_len < 2:
    raise ValueError(f"rolling windows need ModelConfig.max_len >= 2, got {max_len}.")
  return [lm_eval_utils.make_disjoint_window(w) for w in lm_eval_utils.get_rolling_token_windows(
      token_list=list(tokens), prefix_token=prefix_token, max_seq_len=max_len - 1,
      context_len=1)]


def cut_at_stops(text: str, until: Sequence[str]) -> str:
  """`text` up to (not including) the earliest occurrence of any non-empty `until`
  string."""
  end = len(text)
  for stop in until:
    if stop:
      found = text.find(stop)
      if found != -1:
        end = min(end, found)
  return text[:end]


# ------------------------------------------------------------------------------ the LM


@register_model(MODEL_NAME)
class ArmdLM(TemplateLM):
  """An armd-jax workdir as an lm-evaluation-harness language model (module doc).

  Construct with `ArmdLM(workdir, order=..., streams=..., ...)` (the `BackendConfig`
  fields) or through the harness: `simple_evaluate(model="armd_jax",
  model_args={"workdir": DIR, "order": "strided", "streams": 4}, ...)`. `device` and
  `max_batch_size`, which the harness passes to every model, are ignored (JAX places
  the arrays).
  """

  def __init__(self, workdir: str, *, step: Optional[int] = None, batch_size=None,
               max_batch_size=None, device=None, **settings):
    super().__init__()
    del max_batch_size, device
    from armd_jax import train  # pylint: disable=g-import-not-at-top
    if batch_size not in (None, "auto"):
      try:
        settings["batch_size"] = int(batch_size)
      except (TypeError, ValueError) as e:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.") from e
    unknown = set(settings) - {f.name for f in dataclasses.fields(BackendConfig)}
    if unknown:
      raise ValueError(f"ArmdLM: unknown model_args {sorted(unknown)}; expected workdir, step "
                       f"and {[f.name for f in dataclasses.fields(BackendConfig)]}.")
    self.settings = BackendConfig(**settings)
    self.workdir = str(workdir)
    trained = train.load_trained(self.workdir, use_ema=self.settings.use_ema, step=step)
    self.model, self.params, self.vocab = trained.model, trained.params, trained.vocab
    self.step = trained.step
    self.kind = trained.model_config.kind
    self.settings.check_kind(self.kind)
    self.max_len = int(trained.model_config.max_len)
    self.order = "elbo" if self.kind == "mdlm" else self.settings.order  # 'ar': checked l2r
    self.likelihood = registry.likelihood_label(self.kind, self.order)
    self._rng = jax.random.PRNGKey(self.settings.seed)
    if self.likelihood != "exact":
      message = (f"{self.workdir} is an {self.kind!r} model: loglikelihood and "
                 f"loglikelihood_rolling return minus a Monte Carlo negative ELBO "
                 f"({self.settings.mdlm_samples} draws per request), a bound, not exact "
                 "log-likelihoods; accuracies and perplexities built on them are bounds.")
      warnings.warn(message)
      log.warning(message)

  def describe(self) -> Dict[str, Any]:
    """What this backend measures, for results files: workdir, kind, step, order,
    streams, generation and 'exact' or 'bound'."""
    return {"workdir": self.workdir, "kind": self.kind, "step": self.step,
            "order": self.order, "streams": self.settings.streams,
            "generation": self.settings.generation, "likelihood": self.likelihood,
            "vocab": repr(self.vocab), "max_len": self.max_len}

  # -- tokenisation (TemplateLM) ------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    """The vocabulary's EOS id (conditions empty contexts and documents' first tokens)."""
    return int(self.vocab.eos_id)

  @property
  def max_length(self) -> int:
    """The model's ModelConfig.max_len."""
    return self.max_len

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
    """Text -> ids of the workdir's vocabulary (no special tokens are ever added)."""
    del add_special_tokens, kwargs
    return list(self.vocab.encode(string))

  def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
    """Ids -> text (special ids dropped)."""
    del kwargs
    return self.vocab.decode(tokens)

  # -- scoring --------------------------------------------------------------------------

  def _score_pairs(self, pairs) -> List[Tuple[float, bool]]:
    pairs = [fit_pair(c, x, self.max_len) for c, x in pairs]
    if self.kind == "mdlm":
      self._rng, key = jax.random.split(self._rng)
      return score_mdlm(self.model, self.params, pairs,
                        num_samples=self.settings.mdlm_samples, rng=key)
    return score_ordered(self.model, self.params, pairs, pad_id=int(self.vocab.pad_id),
                         order=self.settings.order, streams=self.settings.streams,
                         batch_size=self.settings.batch_size)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """[(logprob, is_greedy)] of ((context, continuation), context_ids,
    continuation_ids) requests (the harness's `TemplateLM.loglikelihood` encodes them)."""
    del disable_tqdm, kwargs
    results = self._score_pairs([(ctx, cont) for _, ctx, cont in requests])
    for (strings, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", strings, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
    """log p(text | EOS) of each request's text (`rolling_windows`): exact for 'armd'
    and 'ar', a bound for 'mdlm'."""
    del disable_tqdm
    windows, owner = [], []
    for i, request in enumerate(requests):
      (text,) = request.args
      for window in rolling_windows(self.tok_encode(text), self.eot_token_id, self.max_len):
        windows.append(window)
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, self._score_pairs(windows) if windows else []):
      totals[i] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  # -- generation -----------------------------------------------------------------------

  def _sampler(self, kwargs: Dict[str, Any]):
    from armd_jax import sampling  # pylint: disable=g-import-not-at-top
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if not kwargs.get("do_sample", False) or temperature <= 0.0:
      return sampling.SamplerConfig(greedy=True)
    top_k = kwargs.get("top_k")
    return sampling.SamplerConfig(temperature=temperature,
                                  top_k=int(top_k) if top_k else None,
                                  top_p=kwargs.get("top_p"))

  def _generation_shape(self, context_len: int, max_gen_toks: int) -> Tuple[int, int]:
    """(prompt tokens kept, tokens drawn): the draw is rounded up to a multiple of the
    streams (strided decoding needs it) and the prompt keeps its rightmost tokens."""
    streams = self.settings.streams if self.settings.order == "strided" else 1
    drawn = -(-max_gen_toks // streams) * streams
    if drawn >= self.max_len:
      drawn = (self.max_len - 1) // streams * streams
      warnings.warn(f"max_gen_toks={max_gen_toks} does not fit ModelConfig.max_len="
                    f"{self.max_len} with a prompt; drawing {drawn} tokens.")
    return min(context_len, self.max_len - drawn), drawn

  def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
    """Continuations of each (context, gen_kwargs) request (module doc): up to
    `max_gen_toks` tokens, cut at EOS and at the first `until` string."""
    del disable_tqdm
    kind = registry.get_kind(self.kind)
    groups: Dict[Tuple[Any, ...], List[int]] = {}
    prepared = []
    for i, request in enumerate(requests):
      context, kwargs = request.args
      kwargs = dict(kwargs or {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_gen_toks = int(kwargs.get("max_gen_toks", 256))
      ids = self.tok_encode(context)
      kept, drawn = self._generation_shape(len(ids), max_gen_toks)
      prompt = ids[len(ids) - kept:]
      prepared.append((prompt, until, max_gen_toks))
      key = (kept, drawn, self._sampler(kwargs))
      groups.setdefault(key, []).append(i)
    outputs: List[str] = [""] * len(requests)
    for g, ((kept, drawn, sampler), members) in enumerate(sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1]))):
      for start in range(0, len(members), self.settings.batch_size):
        chunk = members[start:start + self.settings.batch_size]
        prompt = np.asarray([prepared[i][0] for i in chunk], np.int32) if kept else None
        extra = ({"order": "confidence", "k": min(self.settings.k, drawn)}
                 if self.settings.generation == "confidence" else {})
        out = kind.generate(self.model, self.params,
                            jax.random.fold_in(self._rng, g * 100_003 + start),
                            batch_size=len(chunk), length=kept + drawn,
                            streams=self.settings.streams, prompt=prompt, sampler=sampler,
                            **extra)
        tokens = np.asarray(out.tokens)[:, kept:]  # [B, drawn]
        for row, i in enumerate(chunk):
          _, until, max_gen_toks = prepared[i]
          generated = tokens[row, :max_gen_toks].tolist()
          if self.vocab.eos_id in generated:
            generated = generated[:generated.index(self.vocab.eos_id)]
          outputs[i] = cut_at_stops(self.tok_decode(generated), until)
          self.cache_hook.add_partial("generate_until", requests[i].args, outputs[i])
    return outputs


# --------------------------------------------------------------------------- the command


def run(workdir: str, tasks: Sequence[str], *, include_path: Optional[str] = None,
        include_defaults: bool = True, limit: Optional[float] = None,
        num_fewshot: Optional[int] = None, log_samples: bool = False,
        **settings) -> Dict[str, Any]:
  """Evaluates `workdir` on harness `tasks` with the harness's `simple_evaluate` and
  `TaskManager` (`include_path`: a folder of extra task YAMLs; `include_defaults=False`
  indexes only those, skipping the seconds spent on the built-in tasks). Returns the
  harness's results dict with an 'armd_jax' entry (`ArmdLM.describe`: exact or bound)."""
  from lm_eval import evaluator  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  lm = ArmdLM(workdir, **settings)
  results = evaluator.simple_evaluate(
      model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=include_path,
                               include_defaults=include_defaults),
      limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
      batch_size=lm.settings.batch_size)
  if results is None:  # not rank 0 of a distributed harness run
    return {}
  results["armd_jax"] = lm.describe()
  return results


def _main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir or not f.tasks:
    raise SystemExit("--workdir and --tasks are required.")
  results = run(f.workdir, f.tasks, include_path=f.include_path,
                include_defaults=f.include_defaults, limit=f.limit,
                num_fewshot=f.num_fewshot, order=f.order, streams=f.streams,
                generation=f.generation, k=f.k, batch_size=f.batch_size,
                mdlm_samples=f.mdlm_samples, seed=f.seed, use_ema=f.use_ema)
  from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top
  described = results["armd_jax"]
  print(f"{described['workdir']} ({described['kind']}, step {described['step']}): "
        f"likelihoods are {described['likelihood'].upper()} ({described['order']}"
        f"{', S=%d' % described['streams'] if described['order'] == 'strided' else ''})")
  print(make_table(results))
  if f.output:
    from armd_jax import storage  # pylint: disable=g-import-not-at-top
    storage.path(f.output).write_text(json.dumps(
        results, indent=2, default=lm_eval_utils.handle_non_serializable))
    print(f"wrote {f.output}")


def define_flags() -> None:
  """The command's flags (defined only when run as a command)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training workdir (a folder or gs:// URL).")
  flags.DEFINE_list("tasks", [], "Harness task names, e.g. lambada_openai,hellaswag.")
  flags.DEFINE_string("include_path", None, "Folder of extra task YAMLs.")
  flags.DEFINE_bool("include_defaults", True, "Also index the harness's built-in tasks.")
  flags.DEFINE_enum("order", "left_to_right", list(SCORING_ORDERS),
                    "ARMD scoring/generation order.")
  flags.DEFINE_integer("streams", 1, "S for --order=strided.")
  flags.DEFINE_enum("generation", "order", list(GENERATIONS),
                    "Decode in --order, or ARMD's confidence order.")
  flags.DEFINE_integer("k", 1, "Positions per call of --generation=confidence.")
  flags.DEFINE_float("limit", None, "Documents per task (a fraction if < 1).")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (the task's default if unset).")
  flags.DEFINE_integer("batch_size", 8, "Requests per network pass.")
  flags.DEFINE_integer("mdlm_samples", 32, "ELBO draws per request of an MDLM workdir.")
  flags.DEFINE_integer("seed", 0, "Seed of MDLM draws and sampled generations.")
  flags.DEFINE_bool("use_ema", True, "Use EMA parameters when present.")
  flags.DEFINE_string("output", None, "Write the harness's results (JSON) here.")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(_main)
