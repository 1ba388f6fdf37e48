"""Perplexity of ARMD, AR and MDLM models, always labelled exact or bound.

What each (model kind, order) pair measures, per real token, in nats:
- 'ar', left_to_right: the exact NLL (chain rule, one pass).
- 'armd', left_to_right: the exact NLL of the left-to-right factorisation.
- 'armd', strided(S): the exact NLL of the strided sampler's distribution (tokens of
  one block are conditionally independent given earlier blocks, so the product over
  blocks is a normalised distribution; the tests check it sums to one).
- 'armd', random (uniform random singleton order) and masked_diffusion(T): an unbiased
  estimate of an upper bound (E over orders / trajectories of -log p is >= -log of the
  mixture by Jensen): a bound.
- 'mdlm', elbo: the continuous-time negative ELBO (linear schedule), Monte Carlo over
  t and masks: a bound.
Padding (mask == 0) is never a target; for ARMD it is moved after every real token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Dict, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from armd_jax import orders, registry
from armd_jax.orders import BOUND, EXACT

ORDER_NAMES = orders.EVAL_ORDERS  # the evaluation orders of `armd_jax.orders.ORDERS`


@dataclasses.dataclass(frozen=True)
class EvalOrder:
  """How a sequence is factorised for evaluation.

  Attributes:
    name: 'left_to_right' (ARMD, AR), 'strided' (ARMD), 'random' (ARMD: uniform random
      singleton order), 'masked_diffusion' (ARMD: T-step masking blocks) or 'elbo'
      (MDLM's continuous-time ELBO).
    streams: S for 'strided'.
    num_steps: T for 'masked_diffusion'.
    schedule: 'linear' or 'cosine' for 'masked_diffusion'.
  """

  name: str = "left_to_right"
  streams: int = 1
  num_steps: int = 128
  schedule: str = "linear"

  def __post_init__(self):
    if self.name not in orders.EVAL_ORDERS:
      raise ValueError(f"EvalOrder.name must be one of {ORDER_NAMES}, got {self.name!r}.")
    if self.streams < 1 or self.num_steps < 1:
      raise ValueError(f"EvalOrder.streams and num_steps must be >= 1, got {self.streams}, "
                       f"{self.num_steps}.")

  def describe(self) -> str:
    """A short human label, e.g. 'strided S=4'."""
    if self.name == "strided":
      return f"strided S={self.streams}"
    if self.name == "masked_diffusion":
      return f"masked_diffusion T={self.num_steps} ({self.schedule})"
    return self.name


def default_order(kind: str) -> EvalOrder:
  """The order whose perplexity a model of `kind` reports by default (its first
  `eval_orders` entry in `armd_jax.registry.KINDS`)."""
  return EvalOrder(registry.get_kind(kind).eval_orders[0])


def likelihood_label(kind: str, order: EvalOrder) -> str:
  """'exact' or 'bound' for a model kind evaluated under `order`; ValueError if unsupported."""
  return registry.likelihood_label(kind, order.name)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Aggregated evaluation: nll in nats per real token, ppl = exp(nll)."""

  nll: float
  num_tokens: int
  label: str  # 'exact' or 'bound'
  order: str
  model_kind: str

  @property
  def ppl(self) -> float:
    return math.exp(self.nll)

  @property
  def bits_per_token(self) -> float:
    return self.nll / math.log(2.0)

  def as_dict(self) -> Dict[str, object]:
    """JSON-ready summary."""
    return {"nll": self.nll, "ppl": self.ppl, "bits_per_token": self.bits_per_token,
            "num_tokens": self.num_tokens, "label": self.label, "order": self.order,
            "model_kind": self.model_kind}

  def __str__(self) -> str:
    bound = "<=" if self.label == BOUND else "="
    return (f"{self.model_kind} PPL {bound} {self.ppl:.3f} ({self.label}; {self.order}; "
            f"NLL {self.nll:.4f} nats/token over {self.num_tokens} tokens)")


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def sequence_nll(model: nn.Module, params, batch: Dict[str, jax.Array], rng: jax.Array,
                 order: EvalOrder, num_samples: int = 1) -> jax.Array:
  """Per-sequence NLL sums [B] (nats) of a batch {'tokens', 'mask'} [B, N].

  Exact or a one-sample-per-draw bound according to `likelihood_label`; Monte Carlo
  orders average `num_samples` independent draws. The kind's `sequence_nll` comes from
  `armd_jax.registry`.
  """
  kind = registry.kind_of(model)
  likelihood_label(kind.name, order)
  tokens = batch["tokens"].astype(jnp.int32)
  mask = batch.get("mask", jnp.ones_like(tokens)).astype(jnp.int32)

  def one_draw(key):
    return kind.sequence_nll(model, params, tokens, mask, key, order)

  draws = jax.lax.map(one_draw, jax.random.split(rng, num_samples))  # [S, B]
  return draws.mean(0)


def evaluate_perplexity(model: nn.Module, params, batches: Iterable[Dict[str, np.ndarray]],
                        *, order: Optional[EvalOrder] = None,
                        rng: Optional[jax.Array] = None, num_samples: int = 1,
                        max_batches: Optional[int] = None,
                        log: Optional[Callable[[str], None]] = None) -> PerplexityResult:
  """Perplexity over batches {'tokens', 'mask'}, labelled exact or bound.

  Args:
    model, params: any model `build_model` makes, and its variables.
    batches: finite iterable of dicts with 'tokens' [B, N] and optional 'mask' [B, N].
    order: evaluation order (default: `default_order(model.config.kind)`).
    rng: key for random orders / ELBO draws (default PRNGKey(0): deterministic).
    num_samples: Monte Carlo draws per sequence for bound orders.
    max_batches: stop after this many batches.
    log: optional callable for progress lines (e.g. print).
  """
  kind = model.config.kind
  order = default_order(kind) if order is None else order
  label = likelihood_label(kind, order)
  if label == EXACT:
    num_samples = 1
  rng = jax.random.PRNGKey(0) if rng is None else rng
  total, count, start = 0.0, 0, time.time()
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    batch = {k: jnp.asarray(v) for k, v in batch.items() if k in ("tokens", "mask")}
    nll = sequence_nll(model, params, batch, jax.random.fold_in(rng, i), order, num_samples)
    total += float(jnp.sum(nll))
    count += int(np.sum(np.asarray(batch.get("mask", np.ones(batch["tokens"].shape)))))
    if log is not None and (i + 1) % 10 == 0:
      log(f"  eval batch {i + 1}: running PPL {math.exp(total / max(count, 1)):.3f} "
          f"({time.time() - start:.1f}s)")
  if count == 0:
    raise ValueError("evaluate_perplexity: the batches held no real tokens.")
  return PerplexityResult(total / count, count, label, order.describe(), kind)
