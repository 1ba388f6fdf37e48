"""Generation orders: pure, jit-able generators of block ids [B, N], and the order table.

A block id is the reverse-diffusion step at which a token is revealed: 1 = first, a
block = the set of positions sharing an id, ids dense from 1 (docs/method.md, section 1).
The model only compares ids, so any integer labelling works there; dense ids are what
the cached sampler and the metrics assume, and every generator here returns them.

**The order table** (`ORDERS`): name -> `Order`: how block ids [B, N] are drawn (a
pure, jit-able function of an rng and the training step), whether the likelihood under
it is exact (singleton blocks in a fixed order: the chain rule) or a bound (a random
order or multi-token blocks: Jensen), and whether training (`config.order.kind`) and/or
evaluation (`--order`) may use it. `TRAIN_ORDERS` and `EVAL_ORDERS` are derived.
Nothing else branches on an order name: the train step, `armd_jax.eval` and the
settings' validation ask this table.

How to add an order: write its block-id generator below, add an `Order(...)` to
`ORDERS` (its `draw(settings, rng, step, batch, length)` reads the fields of
`armd_jax.train.settings.OrderConfig` it needs, by attribute; add fields there if it
needs new ones), list it in the `eval_orders` of the kinds it applies to
(`armd_jax.registry.KINDS`), and add a test to `tests/test_orders.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")
EXACT, BOUND = "exact", "bound"
IntLike = Union[int, jax.Array]


def left_to_right(batch: int, length: int) -> jax.Array:
  """b(n) = n + 1: singleton blocks in text order (an autoregressive LM). [B, N] int32."""
  _check_sizes(batch, length)
  return jnp.broadcast_to(jnp.arange(1, length + 1, dtype=jnp.int32), (batch, length))


def progressive_permutation(rng: jax.Array, batch: int, length: int,
                            num_shuffled: IntLike) -> jax.Array:
  """Left-to-right with `num_shuffled` random tokens' slots shuffled among themselves.

  Per row, k = `num_shuffled` positions are chosen uniformly at random and the
  generation-order slots they occupy are randomly permuted among them; the other
  tokens keep their left-to-right slot. k <= 1 is left-to-right; k = N is a uniform
  random order. k may be traced (e.g. `num_shuffled_schedule(step, ...)` inside jit).

  Returns:
    [B, N] int32 singleton block ids, a permutation of 1..N per row.
  """
  _check_sizes(batch, length)
  k = jnp.clip(jnp.asarray(num_shuffled, jnp.int32), 0, length)
  choose_key, shuffle_key = jax.random.split(rng)
  slot = jnp.arange(length, dtype=jnp.int32)

  def one_row(choose_key, shuffle_key):
    # Rank of a uniform draw picks k positions uniformly without replacement.
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(choose_key, (length,))))
    chosen = rank < k
    # Chosen positions in a random order, then the rest (ascending).
    by_random = jnp.argsort(jnp.where(chosen, jax.random.uniform(shuffle_key, (length,)), 2.0),
                            stable=True)
    # Chosen positions in ascending order = the slots they jointly occupy.
    by_slot = jnp.argsort(jnp.where(chosen, slot, slot + length), stable=True)
    new_slot = jnp.where(slot < k, by_slot, by_random)
    return jnp.zeros_like(slot).at[by_random].set(new_slot) + 1

  return jax.vmap(one_row)(jax.random.split(choose_key, batch),
                           jax.random.split(shuffle_key, batch))


def num_shuffled_schedule(step: IntLike, i_ar: int, i_perm: int, rho: int) -> jax.Array:
  """Progressive-permutation k(step): 0 before i_ar, linear 1 -> rho on [i_ar, i_perm], rho after.

  Paper settings: OWT (9_000, 48_000, 32); LM1B (100_000, 300_000, 8).
  """
  if not 0 <= i_ar <= i_perm or rho < 1:
    raise ValueError(f"num_shuffled_schedule needs 0 <= i_ar <= i_perm and rho >= 1, got "
                     f"i_ar={i_ar}, i_perm={i_perm}, rho={rho}.")
  step = jnp.asarray(step, jnp.float32)
  frac = jnp.clip((step - i_ar) / max(i_perm - i_ar, 1), 0.0, 1.0)
  ramp = jnp.floor(1.0 + frac * (rho - 1) + 1e-6)
  return jnp.where(step < i_ar, 0, ramp).astype(jnp.int32)


def strided(batch: int, length: int, streams: int) -> jax.Array:
  """Strided block permutation (SBP) with S = `streams` contiguous streams of N/S tokens.

  Stream s covers positions [s*N/S, (s+1)*N/S). The S stream heads come first, one per
  block (ids 1..S); then block S + j holds the j-th token of every stream (tokens N/S
  apart). N/S + S - 1 blocks in all; S = 1 is left-to-right. N must be divisible by S
  (`strided_ids` takes any length).
  """
  _check_sizes(batch, length)
  _check_streams(streams)
  if length % streams:
    raise ValueError(f"strided: length {length} is not divisible by streams={streams}; "
                     "pad or trim the sequence to a multiple of the number of streams.")
  return jnp.broadcast_to(jnp.asarray(strided_ids(length, streams)), (batch, length))


def strided_ids(length: int, streams: int) -> np.ndarray:
  """Dense block ids [N] int32 of N = `length` tokens in at most `streams` contiguous
  streams, for any N (host-side numpy).

  Streams hold ceil(N / S) tokens (the last may be shorter, and fewer than S streams are
  used when that fills N); the stream heads come one per block, then the j-th token of
  every stream that has one. When S divides N this is `strided`; S = 1 is left to right.
  Each block's tokens are conditionally independent given earlier blocks, so the product
  over blocks is a normalised distribution: the likelihood under it is exact.
  """
  _check_sizes(1, length)
  _check_streams(streams)
  stride = -(-length // min(streams, length))
  used = -(-length // stride)  # streams that hold a token
  n = np.arange(length)
  return np.where(n % stride == 0, n // stride + 1, used + n % stride).astype(np.int32)


def conditional_strided(known: np.ndarray, streams: int) -> np.ndarray:
  """Dense block ids [B, N] int32: known positions first, then strided over the others.

  The known positions of a row (known[b, n] true) get singleton blocks 1..K in text
  order; its U other positions, in text order, follow as `strided_ids(U, streams)`
  (offset by K). Any U; host-side numpy.
  """
  known = np.asarray(known, bool)
  _check_streams(streams)
  ids = np.zeros(known.shape, np.int32)
  for b, row in enumerate(known):
    known_pos, unknown_pos = np.flatnonzero(row), np.flatnonzero(~row)
    ids[b, known_pos] = np.arange(1, len(known_pos) + 1)
    if len(unknown_pos):
      ids[b, unknown_pos] = len(known_pos) + strided_ids(len(unknown_pos), int(streams))
  return ids


def masking_times(rng: jax.Array, shape, schedule: str) -> jax.Array:
  """Continuous masking times tau in (0, 1] with P(tau > t) = alpha(t).

  linear: alpha(t) = 1 - t; cosine: alpha(t) = cos(pi t / 2).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
  u = jax.random.uniform(rng, shape, minval=1e-6, maxval=1.0)
  if schedule == "linear":
    return u
  return jnp.arccos(1.0 - u) * (2.0 / math.pi)


def masked_diffusion(rng: jax.Array, batch: int, length: int, num_steps: int,
                     schedule: str = "linear") -> jax.Array:
  """Blocks of a T-step masked-diffusion trajectory (multi-token blocks).

  Each token draws a masking time tau ~ alpha (see `masking_times`), discretised to
  step ceil(tau * T); its block id is the reverse (reveal) step T - step + 1, then ids
  are made dense from 1 (empty steps are dropped).

  Returns:
    [B, N] int32 dense block ids.
  """
  _check_sizes(batch, length)
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"masked_diffusion: num_steps must be a positive int, got {num_steps!r}.")
  tau = masking_times(rng, (batch, length), schedule)
  step = jnp.clip(jnp.ceil(tau * num_steps), 1, num_steps).astype(jnp.int32)
  return dense_block_ids(num_steps - step + 1)


def dense_block_ids(block_ids: jax.Array) -> jax.Array:
  """Relabels each row's ids to 1..K keeping their order (ties stay ties). [B, N] int32."""

  def one_row(ids):
    order = jnp.argsort(ids, stable=True)
    sorted_ids = ids[order]
    is_new = jnp.concatenate([jnp.ones((1,), jnp.int32),
                              (sorted_ids[1:] != sorted_ids[:-1]).astype(jnp.int32)])
    return jnp.zeros_like(ids).at[order].set(jnp.cumsum(is_new))

  return jax.vmap(one_row)(jnp.asarray(block_ids, jnp.int32))


def padding_last(block_ids: jax.Array, mask: jax.Array) -> jax.Array:
  """Moves padding (mask == 0) into one block after every real token, so no real
  token ever conditions on padding. [B, N] int32."""
  block_ids = jnp.asarray(block_ids, jnp.int32)
  last = jnp.max(jnp.where(mask, block_ids, 0), axis=-1, keepdims=True)
  return jnp.where(mask, block_ids, last + 1)


def check_block_ids(block_ids) -> None:
  """Raises ValueError unless every row holds dense ids 1..K (host-side check)."""
  ids = np.asarray(block_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"block ids must be an integer [batch, length] array, got "
                     f"{ids.dtype}{list(ids.shape)}.")
  for row, r in enumerate(ids):
    uniq = np.unique(r)
    if uniq[0] != 1 or not np.array_equal(uniq, np.arange(1, len(uniq) + 1)):
      raise ValueError(f"block ids of row {row} are not dense from 1: distinct values "
                       f"{uniq[:8].tolist()}{'...' if len(uniq) > 8 else ''}.")


# ----------------------------------------------------------------------- the order table


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


def _draw_left_to_right(settings, rng, step, batch, length):
  del settings, rng, step
  return left_to_right(batch, length), {}


def _draw_progressive(settings, rng, step, batch, length):
  k = num_shuffled_schedule(step, settings.i_ar, settings.i_perm, settings.rho)
  return progressive_permutation(rng, batch, length, k), {"order/num_shuffled": k}


def _draw_random(settings, rng, step, batch, length):
  del settings, step
  return progressive_permutation(rng, batch, length, length), {}


def _draw_strided(settings, rng, step, batch, length):
  del step
  streams = _streams(settings)
  if len(streams) == 1:
    return strided(batch, length, streams[0]), {
        "order/streams": jnp.asarray(streams[0], jnp.int32)}
  candidates = jnp.stack([strided(batch, length, s) for s in streams])
  choice = jax.random.randint(rng, (), 0, len(streams))  # S uniform over the set
  return candidates[choice], {"order/streams": jnp.asarray(streams, jnp.int32)[choice]}


def _draw_masked_diffusion(settings, rng, step, batch, length):
  del step
  return masked_diffusion(rng, batch, length, settings.num_steps, settings.schedule), {}


ORDERS: Dict[str, Order] = {o.name: o for o in (
    Order("left_to_right", _draw_left_to_right, exact=True, train=True, evaluate=True,
          doc="b(n) = n: an autoregressive LM"),
    Order("progressive_permutation", _draw_progressive, exact=False, train=True,
          evaluate=False,
          doc="k(step) tokens' slots shuffled, k ramping 1 -> rho between i_ar and i_perm"),
    Order("strided", _draw_strided, exact=True, train=True, evaluate=True,
          doc="SBP with S streams (training draws S uniformly from `streams`)"),
    Order("masked_diffusion", _draw_masked_diffusion, exact=False, train=True, evaluate=True,
          doc="multi-token blocks of a T-step masking schedule"),
    Order("random", _draw_random, exact=False, train=False, evaluate=True,
          doc="a uniform random singleton order"),
    Order("elbo", None, exact=False, train=False, evaluate=True,
          doc="MDLM's continuous-time negative ELBO"),
)}
TRAIN_ORDERS = tuple(n for n, o in ORDERS.items() if o.train)
MIX_ORDERS = ("strided", "random")  # orders a share of each batch's rows can be drawn from
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
  share = float(getattr(settings, "mix_share", 0.0))
  if share <= 0.0:  # the rng is used as it always was
    return order.draw(settings, rng, step, batch, length)
  return _draw_mixed(order, get_order(settings.mix_kind), share, settings, rng, step, batch,
                     length)


def _draw_mixed(main: Order, mix: Order, share: float, settings, rng, step, batch, length):
  """Each row from `mix` with probability `share`, else from `main` [B, N]."""
  main_key, mix_key, choose_key = jax.random.split(rng, 3)
  main_ids, metrics = main.draw(settings, main_key, step, batch, length)
  mix_ids, _ = mix.draw(settings, mix_key, step, batch, length)
  from_mix = jax.random.bernoulli(choose_key, share, (batch,))  # [B]
  metrics = dict(metrics, **{"order/mix_rows": jnp.mean(from_mix.astype(jnp.float32))})
  return jnp.where(from_mix[:, None], mix_ids, main_ids), metrics


def _check_streams(streams: int) -> None:
  if not isinstance(streams, (int, np.integer)) or streams < 1:
    raise ValueError(f"strided: streams must be a positive int, got {streams!r}.")


def _check_sizes(batch: int, length: int) -> None:
  if batch < 1 or length < 1:
    raise ValueError(f"batch and length must be positive, got batch={batch}, length={length}.")
