"""`ArmdLM`: an armd-jax workdir as an lm-evaluation-harness `TemplateLM`.

Registered in the harness's model registry as "armd_jax" (`MODEL_NAME`) when this module
is imported; `BackendConfig` holds how it scores and generates. What each request type
returns: the package doc (`armd_jax.lm_eval`); the scoring itself:
`armd_jax.lm_eval.scoring`.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from armd_jax import registry
from armd_jax.lm_eval.scoring import fit_pair, rolling_windows, score_mdlm, score_ordered

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


@register_model(MODEL_NAME)
class ArmdLM(TemplateLM):
  """An armd-jax workdir as an lm-evaluation-harness language model (the package doc).

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
