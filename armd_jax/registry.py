"""The model-kind table (`KINDS`): everything kind-specific about a network of the family.

`KINDS`: name -> `ModelKind`: the Flax module it builds (`armd_jax.models.build_model`),
its training loss, validation sums and per-sequence evaluation NLL (all in
`armd_jax.objectives`), the orders it is evaluated under (the first is the default;
names of `armd_jax.orders.ORDERS`), whether it can score samples exactly (be a
generative-PPL evaluator), its generator (and the jitted program it runs), and the
labels progress lines print. The train step, the trainer's validation and samples,
`python -m armd_jax.sample`, `python -m armd_jax.evaluate`, `armd_jax.eval` and the
benchmarks ask this table, so each rule is written once.

How to add a model kind: write its Flax module in `armd_jax/models/`, its loss (a
function `(model, params, batch, rng, step, order, deterministic) -> (loss, metrics)`
with the metric keys of `armd_jax.losses.cross_entropy`), its validation and its
`sequence_nll` in `armd_jax/objectives.py`, its generator and generation program
(`generate`, `program`) here, add a `ModelKind(...)` to `KINDS`, and add it to the tests
of `tests/test_baselines.py`. Nothing else branches on the kind.

The MDLM step-count rule (one rule, used by training samples, `sample`, `evaluate` and
`benchmarks/compare.py`): with `streams` = S and no explicit `num_steps`, MDLM runs
`matched_mdlm_steps(N, S) = N/S + S - 1` reverse steps for N generated tokens: the
number of network calls ARMD's strided sampler makes for the same N and S
(docs/method.md, section 4), so the two are compared at a matched call budget. S = 1
gives N steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp

from armd_jax import objectives, orders
from armd_jax.models import MODEL_KINDS


def matched_mdlm_steps(num_generated: int, streams: int) -> int:
  """MDLM reverse steps matching ARMD's call count for S = `streams`: N/S + S - 1."""
  if streams < 1 or num_generated % streams:
    raise ValueError(f"streams={streams} must be >= 1 and divide the {num_generated} "
                     "generated tokens.")
  return num_generated // streams + streams - 1


def _armd_generate(model, params, rng, *, batch_size, length, streams=1, prompt=None,
                   sampler=None, num_steps=None, order=None, k=1, criterion="max_prob"):
  """KV-cached strided decoding (N/S + S - 1 calls, plus one call reading the prompt), or
  order='confidence' with k positions per exact call (`sampling.generate`)."""
  from armd_jax import sampling  # pylint: disable=import-outside-toplevel
  del num_steps
  return sampling.generate(model, params, rng, batch_size=batch_size, length=length,
                           streams=streams, prompt=prompt,
                           sampler=sampler or sampling.SamplerConfig(), order=order, k=k,
                           criterion=criterion)


def _armd_program(model, params, rng, *, batch_size, length, streams=1, sampler=None,
                  num_steps=None, order=None, k=1, criterion="max_prob"):
  """The jitted decoder of `_armd_generate` without a prompt, and its arguments."""
  from armd_jax import sampling  # pylint: disable=import-outside-toplevel
  from armd_jax.sampling import generation  # pylint: disable=import-outside-toplevel
  del num_steps
  return generation.generation_program(
      model, params, rng, batch_size=batch_size, length=length, streams=streams,
      sampler=sampler or sampling.SamplerConfig(), order=order, k=k, criterion=criterion)


def _no_order(kind: str, order) -> None:
  if order is not None:
    raise ValueError(f"order={order!r} needs an 'armd' model; a {kind!r} model has one "
                     "generation order.")


def _one_token_per_call(order, streams: int) -> None:
  """An 'ar' model has one order and one stream (parallel_streams=False)."""
  _no_order("ar", order)
  if streams != 1:
    raise ValueError(f"an 'ar' model generates one token per call: streams must be 1, got "
                     f"{streams}.")


def _ar_generate(model, params, rng, *, batch_size, length, streams=1, prompt=None,
                 sampler=None, num_steps=None, order=None, **unused):
  """KV-cached left to right: one token per call (streams must be 1)."""
  from armd_jax import sampling  # pylint: disable=import-outside-toplevel
  from armd_jax.sampling import ar  # pylint: disable=import-outside-toplevel
  del num_steps, unused
  _one_token_per_call(order, streams)
  return ar.generate(model, params, rng, batch_size=batch_size, length=length, prompt=prompt,
                     sampler=sampler or sampling.SamplerConfig())


def _ar_program(model, params, rng, *, batch_size, length, streams=1, sampler=None,
                num_steps=None, order=None, **unused):
  """The jitted sampler of `_ar_generate` without a prompt, and its arguments."""
  from armd_jax import sampling  # pylint: disable=import-outside-toplevel
  from armd_jax.sampling import ar  # pylint: disable=import-outside-toplevel
  del num_steps, unused
  _one_token_per_call(order, streams)
  return ar.generation_program(model, params, rng, batch_size=batch_size, length=length,
                               sampler=sampler or sampling.SamplerConfig())


def _mdlm_generate(model, params, rng, *, batch_size, length, streams=1, prompt=None,
                   sampler=None, num_steps=None, order=None, **unused):
  """Ancestral sampling; `num_steps` defaults to `matched_mdlm_steps` (module doc)."""
  from armd_jax import sampling  # pylint: disable=import-outside-toplevel
  from armd_jax.sampling import mdlm  # pylint: disable=import-outside-toplevel
  del unused
  _no_order("mdlm", order)
  if num_steps is None:
    num_prompt = 0 if prompt is None else int(jnp.shape(prompt)[-1])
    num_steps = matched_mdlm_steps(length - num_prompt, streams)
  return mdlm.generate(model, params, rng, batch_size=batch_size, length=length,
                       num_steps=num_steps, prompt=prompt,
                       sampler=sampler or sampling.SamplerConfig())


def _mdlm_program(model, params, rng, *, batch_size, length, streams=1, sampler=None,
                  num_steps=None, order=None, **unused):
  """The jitted sampler of `_mdlm_generate` without a prompt, and its arguments."""
  from armd_jax import sampling  # pylint: disable=import-outside-toplevel
  from armd_jax.sampling import mdlm  # pylint: disable=import-outside-toplevel
  del unused
  _no_order("mdlm", order)
  return mdlm.generation_program(
      model, params, rng, batch_size=batch_size, length=length,
      num_steps=matched_mdlm_steps(length, streams) if num_steps is None else num_steps,
      sampler=sampler or sampling.SamplerConfig())


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """Everything kind-specific about one network of the family.

  Attributes:
    name: `config.model.kind` (one of `armd_jax.models.MODEL_KINDS`; the module it names
      is built by `armd_jax.models.build_model`).
    loss: `loss(model, params, batch, rng, step, order, deterministic) -> (loss, metrics)`.
    validation: `validation(model, params, batch, rng) -> sums` ('nll_sum',
      'correct_sum', 'num_tokens', 'num_scored': the tokens whose argmax is counted).
    sequence_nll: `sequence_nll(model, params, tokens, mask, key, eval_order) -> [B]`.
    generate: `generate(model, params, rng, *, batch_size, length, streams, prompt,
      sampler, num_steps) -> object with .tokens [B, N] and .num_calls`.
    program: `program(model, params, rng, *, batch_size, length, streams, sampler,
      num_steps) -> (run, args)`: the jitted program `generate` runs without a prompt and
      its arguments, not yet called (`run(*args)` generates; FLOP counts lower it).
    eval_orders: orders it can be evaluated under; the first is its default.
    uses_config_order: whether training draws `config.order` (False: fixed objective).
    exact_scorer: can score token sequences exactly (a generative-PPL evaluator).
    validation_label: what `validation` measures, for progress lines.
    parallel_streams: `generate` accepts streams S > 1 ('ar' decodes one token a call).
  """

  name: str
  loss: Callable[..., Any]
  validation: Callable[..., Dict[str, jax.Array]]
  sequence_nll: Callable[..., jax.Array]
  generate: Callable[..., Any]
  program: Callable[..., Any]
  eval_orders: Tuple[str, ...]
  uses_config_order: bool
  exact_scorer: bool
  validation_label: str
  parallel_streams: bool = True

  @property
  def default_is_exact(self) -> bool:
    """Whether its default evaluation order gives an exact likelihood."""
    return orders.ORDERS[self.eval_orders[0]].exact

  def sampler_name(self, length: int, streams: int) -> str:
    """How this kind samples N = `length` tokens with S = `streams`, for reports."""
    if self.name == "mdlm":
      return f"ancestral T={matched_mdlm_steps(length, streams)} (matches S={streams})"
    if streams == 1:
      return "sequential"
    return f"strided S={streams}"


KINDS: Dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("armd", objectives.ordered_loss, objectives.ordered_validation,
              objectives.ordered_sequence_nll, _armd_generate, _armd_program,
              eval_orders=("left_to_right", "strided", "random", "masked_diffusion"),
              uses_config_order=True, exact_scorer=True,
              validation_label="left-to-right, exact"),
    ModelKind("ar", objectives.ar_loss, objectives.ordered_validation,
              objectives.ordered_sequence_nll, _ar_generate, _ar_program,
              eval_orders=("left_to_right",), uses_config_order=False,
              exact_scorer=True, validation_label="left-to-right, exact",
              parallel_streams=False),
    ModelKind("mdlm", objectives.mdlm_loss, objectives.mdlm_validation,
              objectives.mdlm_sequence_nll, _mdlm_generate, _mdlm_program,
              eval_orders=("elbo",),
              uses_config_order=False, exact_scorer=False,
              validation_label="ELBO, an upper bound"),
)}
assert tuple(KINDS) == MODEL_KINDS, "one ModelKind row per armd_jax.models.MODEL_KINDS name"


def get_kind(name: str) -> ModelKind:
  """The `ModelKind` called `name`; ValueError listing the known ones."""
  if name not in KINDS:
    raise ValueError(f"unknown model kind {name!r}; expected one of {list(KINDS)}.")
  return KINDS[name]


def kind_of(model) -> ModelKind:
  """The `ModelKind` of a built model (`model.config.kind`)."""
  return get_kind(model.config.kind)


def likelihood_label(kind: str, order_name: str) -> str:
  """'exact' or 'bound' for a model kind evaluated under an order; ValueError if the kind
  does not support it."""
  spec = get_kind(kind)
  if order_name not in spec.eval_orders:
    raise ValueError(f"a {kind!r} model cannot be evaluated under order {order_name!r}; "
                     f"supported: {spec.eval_orders}.")
  return orders.get_order(order_name).label
