"""The decode driver: runs a `Plan` of model calls, KV-cached or by full recompute.

`decode` is the engine behind `generate` and `score` (both exact ARMD decoding in any
block order, docs/method.md section 4); `score` teacher-forces every token. The calls
themselves (one network call against the KV caches) are in `cache`; this module strings
them together. Each phase of the plan is one `lax.scan`, or on long caches on CPU a few,
each on the prefix of the caches its calls can see (`plan.Plan.segments`,
`cache.on_cache_prefix`); the whole decode is one jitted function, traced once per static
signature (guarded: see `TRACE_COUNTS`).

Mode 'recompute' runs the full one-pass forward every call instead of the caches: the
reference the cached decoder is tested against and the no-cache benchmark baseline.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.losses import token_log_probs
from armd_jax.sampling import plan as plan_lib
from armd_jax.sampling.cache import (NEVER, cached_call, choose_tokens, init_state,
                                     on_cache_prefix, prefill_call, scatter, slot_inputs)
from armd_jax.sampling.sampler import SamplerConfig

MODES = ("cached", "recompute")


def decode(model, params, rng: jax.Array, tokens: np.ndarray, known: np.ndarray,
           block_ids: np.ndarray, positions: np.ndarray,
           sampler: SamplerConfig = SamplerConfig(), mode: str = "cached",
           prefill_blocks=None) -> Tuple[jax.Array, jax.Array, int]:
  """Decodes the blocks of `block_ids` in order; the engine behind generate and score.

  Args:
    model: an ARMD module; params: its variables ({'params': ...}).
    rng: key; model call t draws with `fold_in(rng, t)` in both modes.
    tokens: int [B, N]; values at known positions are kept (teacher-forced), the rest
      are placeholders.
    known: bool [B, N].
    block_ids: dense ids [B, N] (host array: it defines the static plan).
    positions: int [B, N] original positions (< max_len).
    sampler: how unknown tokens are drawn.
    mode: 'cached' (KV caches) or 'recompute' (full forward pass every call: the
      reference and the no-cache benchmark baseline).
    prefill_blocks: optional int [B]: row b's first prefill_blocks[b] blocks (all known)
      are read in ONE call (the prefill); None reads every block in its own call.

  Returns:
    (tokens int32 [B, N], log_probs float32 [B, N], number of model calls made).
  """
  if mode not in MODES:
    raise ValueError(f"decode: mode must be one of {MODES}, got {mode!r}.")
  block_ids = np.asarray(block_ids, np.int32)
  batch, length = block_ids.shape
  for name, array in (("tokens", tokens), ("known", known), ("positions", positions)):
    if np.shape(array) != (batch, length):
      raise ValueError(f"decode: {name} must have shape {(batch, length)}, got "
                       f"{np.shape(array)}.")
  positions = np.asarray(positions)
  if positions.min() < 0 or positions.max() >= model.config.max_len:
    raise ValueError(f"positions must lie in [0, ModelConfig.max_len={model.config.max_len}), "
                     f"got range [{positions.min()}, {positions.max()}].")
  if prefill_blocks is not None:
    readable = plan_lib.leading_known_blocks(block_ids, known)
    if (np.asarray(prefill_blocks) > readable).any():
      raise ValueError("decode: prefill_blocks covers blocks with unknown tokens.")
  run, inputs, plan = decode_program(model, tokens, known, block_ids, positions, sampler, mode,
                                     prefill_blocks)
  out_tokens, log_probs, calls = run(params, rng, *inputs)
  calls = int(calls)
  if calls != plan.num_calls:  # the loop counts its own model calls
    raise RuntimeError(f"decoder made {calls} calls, plan has {plan.num_calls}.")
  return out_tokens, log_probs, calls


def decode_program(model, tokens: np.ndarray, known: np.ndarray, block_ids: np.ndarray,
                   positions: np.ndarray, sampler: SamplerConfig = SamplerConfig(),
                   mode: str = "cached", prefill_blocks=None):
  """The jitted decoder of one static plan and its data inputs, not yet called.

  `decode` calls `run(params, rng, *inputs)`; `armd_jax.compile_check` lowers the same
  `run` for a TPU topology instead. Arguments as for `decode` (already checked there).

  Returns:
    (run, inputs, plan): `run(params, rng, tokens, known, block_ids, positions, prefill,
    slot_tables) -> (tokens [B, N], log_probs [B, N], calls)`, the tuple `inputs` of
    jnp arrays after (params, rng), and the `plan_lib.Plan`.
  """
  block_ids = np.asarray(block_ids, np.int32)
  batch, length = block_ids.shape
  plan = plan_lib.make_plan(block_ids, prefill_blocks)
  run = _compiled(model, sampler, plan.structure, batch, length, mode)
  prefill = plan.prefill if plan.prefill is not None else np.zeros((batch, 0), np.int32)
  inputs = (jnp.asarray(tokens, jnp.int32), jnp.asarray(known, bool), jnp.asarray(block_ids),
            jnp.asarray(positions, jnp.int32), jnp.asarray(prefill),
            tuple((jnp.asarray(p.slots), jnp.asarray(p.starts)) for p in plan.phases))
  return run, inputs, plan


@functools.lru_cache(maxsize=64)
def _compiled(model, sampler: SamplerConfig, structure: Tuple[Any, ...], batch: int,
              length: int, mode: str):
  """One jitted decoder per static signature; a retrace of it would be a bug."""
  key = (model, sampler, structure, batch, length, mode)
  TRACE_COUNTS[key] = 0
  *phases, prefill_width, uniform = structure
  max_width = max([width for width, _, _ in phases] + [prefill_width])

  def run(params, rng, tokens, known, block_ids, positions, prefill, slot_tables):
    count_trace(key)
    bound = model.bind(params)
    # Cache rows in generation order: their block ids are the sorted ids, then a tail of
    # max_width rows that no query ever sees (room for fixed-width writes).
    tail = jnp.full((block_ids.shape[0], max_width), NEVER, jnp.int32)
    sorted_ids = jnp.sort(block_ids, axis=1)
    upper_ids = jnp.concatenate([sorted_ids, tail], axis=1)  # [B, N+W]
    inputs = dict(known=known, block_ids=block_ids, positions=positions, rng=rng,
                  upper_ids=upper_ids,
                  content_ids=jnp.pad(upper_ids, ((0, 0), (1, 0))))  # [B, 1+N+W], BOS 0
    if mode == "cached":
      state = init_state(bound, tokens, max_width)
      if prefill_width:
        state = prefill_call(bound, inputs, state, prefill)
      call = functools.partial(cached_call, bound, sampler, uniform=uniform)
    else:
      state = _init_light_state(tokens)
      if prefill_width:
        state = _recompute_prefill(bound, inputs, state, prefill)
      call = functools.partial(_recompute_call, bound, sampler)
    state = run_phases(call, state, inputs, phases, slot_tables, mode == "cached")
    return state["tokens"], state["log_probs"], state["calls"]

  return jax.jit(run)


def run_phases(call, state, inputs, phases, slot_tables, segmented: bool = True):
  """Runs the model calls of a plan: one `lax.scan` per phase, or per segment on XLA:CPU.

  call: `call(inputs, state, slots [B, W], starts [B]) -> state`, one model call.
  phases: the static (width, num_calls, segments) of each phase (`plan.Plan.structure`);
  slot_tables: per phase its (slots [T, B, W], starts [T, B]) arrays.
  segmented: on XLA:CPU, run each segment of a phase on the prefix of the caches its calls
  can see (`plan.Plan.segments`, `cache.on_cache_prefix`; where they were measured,
  docs/sampling.md); elsewhere (and when False) one scan per phase, since cutting the
  caches costs a copy of them per segment, unmeasured there. The choice is made when the
  decoder is lowered, so an ahead-of-time TPU compile gets the TPU program.
  """
  def calls(state, cut: bool):
    for table, (_, num_calls, segments) in zip(slot_tables, phases):
      if not cut:
        segments = ((num_calls, None),)
      begin = 0
      for end, rows in segments:  # one scan per segment
        part = jax.tree.map(lambda a, b=begin, e=end: a[b:e], table)

        def scan(state, inputs, part=part):
          body = lambda s, xs: (call(inputs, s, *xs), None)  # noqa: E731
          return jax.lax.scan(body, state, part)[0]

        state = on_cache_prefix(scan, state, inputs, rows)
        begin = end
    return state

  if segmented and any(rows for _, _, segments in phases for _, rows in segments):
    return jax.lax.platform_dependent(state, cpu=lambda s: calls(s, True),
                                      default=lambda s: calls(s, False))
  return calls(state, False)


# Traces per static signature. `chex.assert_max_traces` identifies a function by its
# source and definition stack, which is the same for every signature here, so the
# one-trace-per-signature guard is kept by hand (same contract, clear error).
TRACE_COUNTS: Dict[Any, int] = {}


def count_trace(key) -> None:
  """Counts one trace of the jitted decoder `key`; a second one raises AssertionError."""
  TRACE_COUNTS[key] = TRACE_COUNTS.get(key, 0) + 1
  if TRACE_COUNTS[key] > 1:
    raise AssertionError(f"the decoder was traced again for one static signature {key[2:]}: "
                         "an input changed dtype, shape or weak type.")


def _init_light_state(tokens: jax.Array) -> Dict[str, Any]:
  return dict(tokens=tokens, log_probs=jnp.zeros(tokens.shape, jnp.float32),
              calls=jnp.zeros((), jnp.int32))


def _recompute_prefill(m, inputs, state, slots: jax.Array):
  """The prefill as one full forward pass (reference mode), read at the prefill slots."""
  index, _, _, _ = slot_inputs(inputs, slots)
  logits = m(state["tokens"], inputs["block_ids"], inputs["positions"])  # [B, N, V]
  logits = jnp.take_along_axis(logits, index[..., None], axis=1)
  tokens = jnp.take_along_axis(state["tokens"], index, axis=1)
  state = dict(state)
  state["log_probs"] = scatter(state["log_probs"], slots, token_log_probs(logits, tokens))
  state["calls"] = state["calls"] + 1
  return state


def _recompute_call(m, sampler, inputs, state, slots: jax.Array, start: jax.Array):
  """One model call without cache: the full one-pass forward, read at the block's slots.

  Positions of later blocks hold placeholders; causality makes them irrelevant.
  """
  del start  # no cache
  index, valid, _, _ = slot_inputs(inputs, slots)
  logits = m(state["tokens"], inputs["block_ids"], inputs["positions"])  # [B, N, V]
  logits = jnp.take_along_axis(logits, index[..., None], axis=1)  # [B, W, V]
  state, _ = choose_tokens(state, inputs, sampler, logits, slots, index, valid)
  return state


def score(model, params, tokens, block_ids, positions=None, mode: str = "cached") -> jax.Array:
  """Per-token log-probs [B, N] float32 of `tokens` under the order `block_ids`.

  Teacher-forced KV-cached decoding, one call per block; equals the one-pass model's
  `token_log_probs(model.apply(params, tokens, block_ids, positions), tokens)`.
  `block_ids` must be dense ids (host array; it sets the call structure).
  """
  tokens = np.asarray(tokens)
  block_ids = np.asarray(block_ids)
  if tokens.ndim != 2 or block_ids.shape != tokens.shape:
    raise ValueError(f"score: tokens [B, N] and block_ids must have one shape, got "
                     f"{tokens.shape} and {block_ids.shape}.")
  if positions is None:
    if tokens.shape[1] > model.config.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_len="
                       f"{model.config.max_len}.")
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  known = np.ones(tokens.shape, bool)
  _, log_probs, _ = decode(model, params, jax.random.PRNGKey(0), tokens, known, block_ids,
                           positions, SamplerConfig(greedy=True), mode)
  return log_probs

