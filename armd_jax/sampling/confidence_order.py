"""Confidence-ordered exact decoding: reveal the k most confident positions per step.

`generate(order='confidence', k, criterion)` runs `decode_confidence`: after the
prompt's prefill, each step probes every unrevealed position in one call (their query
stream on the KV caches, all of them as one hypothetical block), scores each by
`confidence`, and reveals the k most confident in one exact call (`cache.block_call`).
2 ceil(U/k) - 1 calls for U generated positions (`confidence_calls`: the last step needs
no probe), plus one prefill call when there is a prompt. The realized order is returned,
and the log-probs are the one-pass model's under it.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.sampling.cache import (NEVER, block_call, init_state, prefill_call, query_stream,
                                     scatter)
from armd_jax.sampling.decoding import TRACE_COUNTS, count_trace
from armd_jax.sampling.sampler import SamplerConfig

CRITERIA = ("max_prob", "margin", "entropy")


def confidence(logits: jax.Array, criterion: str) -> jax.Array:
  """Confidence [...] of float32 logits [..., V]: larger = more confident.

  'max_prob': the top probability; 'margin': top minus second probability; 'entropy':
  minus the entropy (nats).
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if criterion == "max_prob":
    return jnp.exp(log_p.max(axis=-1))
  if criterion == "margin":
    top2 = jax.lax.top_k(log_p, 2)[0]
    return jnp.exp(top2[..., 0]) - jnp.exp(top2[..., 1])
  if criterion == "entropy":
    return jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  raise ValueError(f"confidence criterion must be one of {CRITERIA}, got {criterion!r}.")


def confidence_calls(length: int, prompt_len: int, per_call: int) -> int:
  """Network calls of confidence decoding: 1 prefill (if a prompt), then per step one
  probe and one exact call, except the last step (it takes every remaining position, so
  it needs no probe): 2 ceil(U / k) - 1 for U generated positions."""
  steps = -(-(length - prompt_len) // per_call)
  return (prompt_len > 0) + 2 * steps - 1


def decode_confidence(model, params, rng: jax.Array, tokens: np.ndarray, prompt_len: int,
                      per_call: int, sampler: SamplerConfig = SamplerConfig(),
                      criterion: str = "max_prob") -> Tuple[jax.Array, jax.Array, jax.Array,
                                                            int]:
  """Confidence-ordered exact decoding (see `generate(order='confidence')`).

  Returns (tokens int32 [B, N], log_probs float32 [B, N], realized block ids int32
  [B, N], number of model calls).
  """
  run, args = confidence_program(model, params, rng, tokens, prompt_len, per_call, sampler,
                                 criterion)
  out_tokens, log_probs, block_ids, calls = run(*args)
  calls = int(calls)
  length = np.shape(tokens)[1]
  want = confidence_calls(length, prompt_len, per_call)
  if calls != want:
    raise RuntimeError(f"confidence decoder made {calls} calls, expected {want}.")
  return out_tokens, log_probs, block_ids, calls


def confidence_program(model, params, rng: jax.Array, tokens: np.ndarray, prompt_len: int,
                       per_call: int, sampler: SamplerConfig = SamplerConfig(),
                       criterion: str = "max_prob"):
  """The jitted confidence decoder and its arguments, not yet called: (run, args), where
  `run(*args)` returns what `decode_confidence` unpacks (tokens, log-probs, block ids,
  calls). Arguments as for `decode_confidence`, checked here."""
  batch, length = np.shape(tokens)
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
  if not isinstance(per_call, (int, np.integer)) or not 1 <= per_call <= length - prompt_len:
    raise ValueError(f"per_call (k) must be an int in [1, {length - prompt_len}] (the number "
                     f"of generated positions), got {per_call!r}.")
  run = _compiled_confidence(model, sampler, batch, length, int(prompt_len), int(per_call),
                             criterion)
  return run, (params, rng, jnp.asarray(tokens, jnp.int32))


@functools.lru_cache(maxsize=32)
def _compiled_confidence(model, sampler: SamplerConfig, batch: int, length: int,
                         prompt_len: int, k: int, criterion: str):
  """The jitted confidence decoder of one static signature.

  Cache rows in reveal order: rows < P hold the prompt (block ids 1..P), then k rows
  per step (step t = block P + t + 1); room for N more rows, where a probe writes the
  upper-half K/V of every candidate (rows it does not own are hidden by their ids or
  overwritten by the exact call before any query may see them).
  """
  key = ("confidence", model, sampler, batch, length, prompt_len, k, criterion)
  TRACE_COUNTS[key] = 0
  num_gen = length - prompt_len
  steps = -(-num_gen // k)

  def run(params, rng, tokens):
    count_trace(key)
    m = model.bind(params)
    rows = jnp.arange(2 * length)
    row_ids = jnp.where(rows < prompt_len, rows + 1,
                        jnp.where(rows < length, prompt_len + (rows - prompt_len) // k + 1,
                                  NEVER)).astype(jnp.int32)
    upper_ids = jnp.broadcast_to(row_ids, (batch, 2 * length))
    content_ids = jnp.pad(upper_ids, ((0, 0), (1, 0)))  # BOS id 0
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    known = jnp.broadcast_to(jnp.arange(length) < prompt_len, (batch, length))
    inputs = dict(known=known, block_ids=jnp.zeros((batch, length), jnp.int32),
                  positions=positions, rng=rng, upper_ids=upper_ids, content_ids=content_ids)
    state = init_state(m, tokens, length)
    state["block_ids"] = jnp.where(known, jnp.arange(1, length + 1), 0).astype(jnp.int32)
    if prompt_len:
      inputs["block_ids"] = state["block_ids"]
      prompt_slots = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32),
                                      (batch, prompt_len))
      state = prefill_call(m, inputs, state, prompt_slots)

    def candidates(state):
      """Unrevealed positions first (text order), then revealed ones: [B, N]."""
      return jnp.argsort(state["block_ids"] > 0, axis=1, stable=True).astype(jnp.int32)

    def exact_call(state, slots, valid, t):
      """The chosen block (slots [B, k]) as block P + t + 1: one exact model call."""
      block = prompt_len + t + 1
      ids = jnp.full(slots.shape, block, jnp.int32)
      slots = jnp.where(valid, slots, length)
      index = jnp.minimum(slots, length - 1)
      pos = jnp.take_along_axis(positions, index, axis=1)
      start = jnp.full((batch,), prompt_len + t * k, jnp.int32)
      state = block_call(m, sampler, inputs, state, slots, index, valid, ids, pos, start,
                         True, content_ids, upper_ids)
      state["block_ids"] = scatter(state["block_ids"], slots, ids)
      return state

    def step(state, t):
      """Probe every unrevealed position (one call), reveal the k most confident (one)."""
      block = prompt_len + t + 1
      start = prompt_len + t * k
      cand = candidates(state)  # [B, N]
      remaining = num_gen - t * k
      valid = jnp.broadcast_to(jnp.arange(length) < remaining, (batch, length))
      ids = jnp.full((batch, length), block, jnp.int32)
      pos = jnp.take_along_axis(positions, cand, axis=1)
      placeholder = jnp.take_along_axis(state["tokens"], cand, axis=1)
      _, q_pe = m.embed(placeholder, pos)
      aggregate = jnp.einsum("bwp,bpd->bwd", q_pe.astype(jnp.float32), state["aggregate"])
      count = jnp.broadcast_to(state["count"][:, None], ids.shape)
      # Probe: every candidate as one hypothetical block (its members see each other in
      # the upper half, as one multi-token block of the one-pass model would).
      probe_ids = jnp.where(rows < start, row_ids, jnp.where(rows < start + remaining, block,
                                                             NEVER))
      probe_ids = jnp.broadcast_to(probe_ids, (batch, 2 * length)).astype(jnp.int32)
      logits, _, _ = query_stream(m, state, ids, pos, q_pe, aggregate, count,
                                  jnp.full((batch,), start, jnp.int32), valid, True,
                                  content_ids, probe_ids)
      state = dict(state)
      state["calls"] = state["calls"] + 1  # the probe is a model call
      score = jnp.where(valid, confidence(logits, criterion), -jnp.inf)
      top = jax.lax.top_k(score, k)[1]  # [B, k] indices into the candidates
      chosen = jnp.sort(jnp.take_along_axis(cand, top, axis=1), axis=1)  # text order
      return exact_call(state, chosen, jnp.ones((batch, k), bool), t), None

    if steps > 1:
      state, _ = jax.lax.scan(step, state, jnp.arange(steps - 1))
    # Last step: every remaining position (<= k) in one exact call, no probe needed.
    last = steps - 1
    remaining = num_gen - last * k
    slots = candidates(state)[:, :k]
    state = exact_call(state, slots, jnp.broadcast_to(jnp.arange(k) < remaining, (batch, k)),
                       last)
    return state["tokens"], state["log_probs"], state["block_ids"], state["calls"]

  return jax.jit(run)

