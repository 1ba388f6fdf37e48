"""The two registries: model kinds (`KINDS`) and orders (`ORDERS`).

Every place that used to branch on a model kind or an order name (the train step, the
trainer's validation and samples, `python -m armd_jax.sample`, `python -m
armd_jax.evaluate`, `armd_jax.eval` and the benchmarks) asks these two tables instead,
so each rule is written once.

**Orders** (`ORDERS`): name -> `Order`: how block ids [B, N] are drawn (a pure, jit-able
function of an rng and the training step), whether the likelihood under it is exact
(singleton blocks in a fixed order: the chain rule) or a bound (a random order or
multi-token blocks: Jensen), and whether training (`config.order.kind`) and/or
evaluation (`--order`) may use it. `TRAIN_ORDERS` and `EVAL_ORDERS` are derived.

**Model kinds** (`KINDS`): name -> `ModelKind`: the Flax module it builds, its training
loss, its per-sequence evaluation NLL, the orders it is evaluated under (the first is
the default), whether it can score samples exactly (be a generative-PPL evaluator), its
generator, and the labels progress lines print.

How to add an order: write its block-id generator in `armd_jax.orders`, add an
`Order(...)` to `ORDERS` below (its `draw(settings, rng, step, batch, length)` reads the
fields of `armd_jax.train.typed.OrderConfig` it needs; add fields there if it needs
new ones), list it in the `eval_orders` of the kinds it applies to, and add a test to
`tests/test_orders.py`.

How to add a model kind: write its Flax module in `armd_jax/models/`, its loss (a
function `(model, params, batch, rng, step, order, deterministic) -> (loss, metrics)`
with the metric keys of `armd_jax.losses.cross_entropy`), its `sequence_nll` and its
generator here, add a `ModelKind(...)` to `KINDS`, and add it to the tests of
`tests/test_baselines.py`. Nothing else branches on the kind.

The MDLM step-count rule (one rule, used by training samples, `sample`, `evaluate` and
`benchmarks/compare.py`): with `streams` = S and no explicit `num_steps`, MDLM runs
`matched_mdlm_steps(N, S) = N/S + S - 1` reverse steps for N generated tokens: the
number of network calls ARMD's strided sampler makes for the same N and S (spec
section 4), so the two are compared at a matched call budget. S = 1 gives N steps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from armd_jax import losses, orders
from armd_jax.models import MODEL_KINDS, build_model
from armd_jax.models import mdlm as mdlm_lib

Batch = Dict[str, jax.Array]
EXACT, BOUND = "exact", "bound"
MDLM_EVAL_DRAWS = 4  # Monte Carlo draws of the MDLM validation ELBO per batch


# ----------------------------------------------------------------------------- orders


@dataclasses.dataclass(frozen=True)
class Order:
  """One generation order.

  Attributes:
    name: the name configs and flags use.
    draw: `draw(settings, rng, step, batch, length) -> (block_ids [B, N] int32, metrics)`;
      `settings` has the fields of `OrderConfig` (streams may be an int or a tuple).
      None for an order that is a model kind's own objective ('elbo').
    exact: True if the NLL under the order is exact, False if it is a bound.
    train: usable as `config.order.kind`.
    evaluate: usable as an evaluation order (`--order`).
    doc: one line for help texts.
  """

  name: str
  draw: Optional[Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]]
  exact: bool
  train: bool
  evaluate: bool
  doc: str

  @property
  def label(self) -> str:
    """'exact' or 'bound'."""
    return EXACT if self.exact else BOUND


def _streams(settings) -> Tuple[int, ...]:
  s = settings.streams
  return tuple(int(x) for x in s) if isinstance(s, (tuple, list)) else (int(s),)


def _left_to_right(settings, rng, step, batch, length):
  del settings, rng, step
  return orders.left_to_right(batch, length), {}


def _progressive(settings, rng, step, batch, length):
  k = orders.num_shuffled_schedule(step, settings.i_ar, settings.i_perm, settings.rho)
  return orders.progressive_permutation(rng, batch, length, k), {"order/num_shuffled": k}


def _random(settings, rng, step, batch, length):
  del settings, step
  return orders.progressive_permutation(rng, batch, length, length), {}


def _strided(settings, rng, step, batch, length):
  del step
  streams = _streams(settings)
  if len(streams) == 1:
    return orders.strided(batch, length, streams[0]), {
        "order/streams": jnp.asarray(streams[0], jnp.int32)}
  candidates = jnp.stack([orders.strided(batch, length, s) for s in streams])
  choice = jax.random.randint(rng, (), 0, len(streams))  # S uniform over the set
  return candidates[choice], {"order/streams": jnp.asarray(streams, jnp.int32)[choice]}


def _masked_diffusion(settings, rng, step, batch, length):
  del step
  return orders.masked_diffusion(rng, batch, length, settings.num_steps, settings.schedule), {}


ORDERS: Dict[str, Order] = {o.name: o for o in (
    Order("left_to_right", _left_to_right, exact=True, train=True, evaluate=True,
          doc="b(n) = n: an autoregressive LM"),
    Order("progressive_permutation", _progressive, exact=False, train=True, evaluate=False,
          doc="k(step) tokens' slots shuffled, k ramping 1 -> rho between i_ar and i_perm"),
    Order("strided", _strided, exact=True, train=True, evaluate=True,
          doc="SBP with S streams (training draws S uniformly from `streams`)"),
    Order("masked_diffusion", _masked_diffusion, exact=False, train=True, evaluate=True,
          doc="multi-token blocks of a T-step masking schedule"),
    Order("random", _random, exact=False, train=False, evaluate=True,
          doc="a uniform random singleton order"),
    Order("elbo", None, exact=False, train=False, evaluate=True,
          doc="MDLM's continuous-time negative ELBO"),
)}
TRAIN_ORDERS = tuple(n for n, o in ORDERS.items() if o.train)
EVAL_ORDERS = tuple(n for n, o in ORDERS.items() if o.evaluate)


def get_order(name: str) -> Order:
  """The `Order` called `name`; ValueError listing the known ones."""
  if name not in ORDERS:
    raise ValueError(f"unknown order {name!r}; known orders: {list(ORDERS)}.")
  return ORDERS[name]


def draw_block_ids(settings, rng: jax.Array, step: jax.Array, batch: int,
                   length: int) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Block ids [B, N] int32 of the order `settings.kind` (or `.name`) at training `step`,
  plus scalar order metrics ('order/num_shuffled' or 'order/streams')."""
  name = getattr(settings, "kind", None) or settings.name
  order = get_order(name)
  if order.draw is None:
    raise ValueError(f"order {name!r} is a model kind's own objective, not block ids.")
  return order.draw(settings, rng, step, batch, length)


def matched_mdlm_steps(num_generated: int, streams: int) -> int:
  """MDLM reverse steps matching ARMD's call count for S = `streams`: N/S + S - 1."""
  if streams < 1 or num_generated % streams:
    raise ValueError(f"streams={streams} must be >= 1 and divide the {num_generated} "
                     "generated tokens.")
  return num_generated // streams + streams - 1


# ------------------------------------------------------------------------ model kinds


def _ordered_loss(model, params, batch: Batch, rng, step, order, deterministic: bool,
                  fixed_order: Optional[str] = None):
  """Cross-entropy given earlier blocks, ids drawn from `order` (or `fixed_order`)."""
  tokens, mask = batch["tokens"], batch["mask"]  # [B, N], [B, N]
  order_rng, dropout_rng = jax.random.split(rng)
  if fixed_order is not None:
    block_ids, order_metrics = ORDERS[fixed_order].draw(order, order_rng, step, *tokens.shape)
  else:
    block_ids, order_metrics = draw_block_ids(order, order_rng, step, *tokens.shape)
  block_ids = orders.padding_last(block_ids, mask)  # no real token conditions on padding
  logits = model.apply(params, tokens, block_ids, deterministic=deterministic,
                       rngs=None if deterministic else {"dropout": dropout_rng})
  loss, metrics = losses.cross_entropy(logits, tokens, block_ids, mask=mask)
  return loss, {**metrics, **order_metrics}


def _ar_loss(model, params, batch, rng, step, order, deterministic):
  """The GPT baseline only has the left-to-right order (`config.order` unused)."""
  return _ordered_loss(model, params, batch, rng, step, order, deterministic,
                       fixed_order="left_to_right")


def _mdlm_loss(model, params, batch, rng, step, order, deterministic):
  """One-sample negative ELBO (`config.order` unused: masks from the linear schedule)."""
  del step, order
  order_rng, dropout_rng = jax.random.split(rng)
  return mdlm_lib.diffusion_loss(model, params, batch["tokens"], order_rng, batch["mask"],
                                 deterministic, dropout_rng)


def _ordered_validation(model, params, batch: Batch, rng) -> Dict[str, jax.Array]:
  """Exact left-to-right sums of one batch: nll_sum, correct_sum, num_tokens, num_scored."""
  del rng
  tokens, mask = batch["tokens"], batch["mask"]
  block_ids = orders.padding_last(orders.left_to_right(*tokens.shape), mask)
  logits = model.apply(params, tokens, block_ids, deterministic=True)
  _, m = losses.cross_entropy(logits, tokens, block_ids, mask=mask)
  return {"nll_sum": m["nll_sum"], "correct_sum": m["correct_sum"],
          "num_tokens": m["num_tokens"], "num_scored": m["num_tokens"]}


def _mdlm_validation(model, params, batch: Batch, rng) -> Dict[str, jax.Array]:
  """Negative-ELBO sums: the mean of `MDLM_EVAL_DRAWS` draws of (t, masks) from `rng`
  (the 1/t weight is heavy-tailed); accuracy counts masked tokens only, so
  'num_scored' is the number of masked tokens."""
  keys = jax.random.split(rng, MDLM_EVAL_DRAWS)
  sums = {"nll_sum": 0.0, "correct_sum": 0.0, "num_tokens": 0.0, "num_scored": 0.0}
  for key in keys:
    _, m = mdlm_lib.diffusion_loss(model, params, batch["tokens"], key, batch["mask"])
    for k, v in (("nll_sum", m["nll_sum"]), ("correct_sum", m["correct_sum"]),
                 ("num_tokens", m["num_tokens"]), ("num_scored", m["num_masked"])):
      sums[k] = sums[k] + v / MDLM_EVAL_DRAWS
  return sums


def _ordered_sequence_nll(model, params, tokens, mask, key, order) -> jax.Array:
  """Per-sequence NLL sums [B] under an evaluation order (one draw)."""
  block_ids, _ = draw_block_ids(order, key, jnp.zeros((), jnp.int32), *tokens.shape)
  logits = model.apply(params, tokens, orders.padding_last(block_ids, mask))
  return -(losses.token_log_probs(logits, tokens) * mask).sum(-1)


def _mdlm_sequence_nll(model, params, tokens, mask, key, order) -> jax.Array:
  """Per-sequence negative-ELBO estimates [B] (one draw of t and masks)."""
  del order
  t = mdlm_lib.stratified_times(jax.random.fold_in(key, 0), tokens.shape[0])
  noisy, is_masked = mdlm_lib.corrupt(jax.random.fold_in(key, 1), tokens, t, model.config,
                                      mask)
  return mdlm_lib.elbo_terms(model.apply(params, noisy), tokens, is_masked, t)


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


def _no_order(kind: str, order) -> None:
  if order is not None:
    raise ValueError(f"order={order!r} needs an 'armd' model; a {kind!r} model has one "
                     "generation order.")


def _ar_generate(model, params, rng, *, batch_size, length, streams=1, prompt=None,
                 sampler=None, num_steps=None, order=None, **unused):
  """KV-cached left to right: one token per call (streams must be 1)."""
  from armd_jax import sampling  # pylint: disable=import-outside-toplevel
  from armd_jax.sampling import ar  # pylint: disable=import-outside-toplevel
  del num_steps, unused
  _no_order("ar", order)
  if streams != 1:  # parallel_streams=False
    raise ValueError(f"an 'ar' model generates one token per call: streams must be 1, got "
                     f"{streams}.")
  return ar.generate(model, params, rng, batch_size=batch_size, length=length, prompt=prompt,
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
  eval_orders: Tuple[str, ...]
  uses_config_order: bool
  exact_scorer: bool
  validation_label: str
  parallel_streams: bool = True

  @property
  def default_is_exact(self) -> bool:
    """Whether its default evaluation order gives an exact likelihood."""
    return ORDERS[self.eval_orders[0]].exact

  def sampler_name(self, length: int, streams: int) -> str:
    """How this kind samples N = `length` tokens with S = `streams`, for reports."""
    if self.name == "mdlm":
      return f"ancestral T={matched_mdlm_steps(length, streams)} (matches S={streams})"
    if streams == 1:
      return "sequential"
    return f"strided S={streams}"


KINDS: Dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("armd", _ordered_loss, _ordered_validation,
              _ordered_sequence_nll, _armd_generate,
              eval_orders=("left_to_right", "strided", "random", "masked_diffusion"),
              uses_config_order=True, exact_scorer=True,
              validation_label="left-to-right, exact"),
    ModelKind("ar", _ar_loss, _ordered_validation, _ordered_sequence_nll,
              _ar_generate, eval_orders=("left_to_right",), uses_config_order=False,
              exact_scorer=True, validation_label="left-to-right, exact",
              parallel_streams=False),
    ModelKind("mdlm", _mdlm_loss, _mdlm_validation, _mdlm_sequence_nll,
              _mdlm_generate, eval_orders=("elbo",), uses_config_order=False,
              exact_scorer=False, validation_label="ELBO, an upper bound"),
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
  return get_order(order_name).label
