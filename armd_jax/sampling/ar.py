"""KV-cached left-to-right sampling for the AR baseline, on ARMD's decoder machinery.

An AR model is ARMD's content stream with block ids = positions (`armd_jax.models.ar`):
stream row j holds BOS (j = 0) or x_{j-1}, has id and RoPE position j, and its last-layer
state predicts x_j. So the AR decoder is ARMD's sequential decoder with that one stream:
its caches are ARMD content-stream caches ([B, Hkv, rows, Dh], row j = stream row j, id j)
for every layer; call j runs row j through all layers with `cache.content_layers` (each
layer writes the row's K/V in place, then `cache.attend_on_cache` lets it see rows 0..j:
unwritten rows hold larger ids, so the `kv_id <= q_id` mask hides them) and draws x_j; and
`decoding.run_phases` strings the calls of the plan of N singleton blocks together
(`plan.make_plan`), on XLA:CPU in segments that attend only over the rows their calls can
see, as it does for ARMD. N network calls for N tokens; prompt tokens are forced instead of
drawn (each still costs its call).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.sampling import plan as plan_lib
from armd_jax.sampling.cache import content_layers, empty_caches
from armd_jax.sampling.decoding import run_phases
from armd_jax.sampling.generation import BaselineOutput
from armd_jax.sampling.sampler import SamplerConfig, sample_logits


def generate(model: nn.Module, params, rng: jax.Array, *, batch_size: int, length: int,
             prompt=None, sampler: SamplerConfig = SamplerConfig()) -> BaselineOutput:
  """Samples [batch_size, length] tokens from an `AR` model, one network call per token.

  Args:
    prompt: optional int [P] or [B, P] forced at positions 0..P-1.
    sampler: how each token is drawn (temperature / top-k / top-p / greedy).

  Returns:
    BaselineOutput (tokens [B, N], num_calls = N, num_calls_per_row [B]).
  """
  run, args = generation_program(model, params, rng, batch_size=batch_size, length=length,
                                 prompt=prompt, sampler=sampler)
  tokens = run(*args)
  calls = jnp.asarray(length, jnp.int32)
  return BaselineOutput(tokens, calls, jnp.full((batch_size,), length, jnp.int32))


def generation_program(model: nn.Module, params, rng: jax.Array, *, batch_size: int,
                       length: int, prompt=None, sampler: SamplerConfig = SamplerConfig()):
  """The jitted sampler and its arguments, not yet called: (run, args), `run(*args)` ->
  tokens [B, N] as `generate` draws them (for FLOP counts: `armd_jax.flops`)."""
  if length > model.config.max_len:
    raise ValueError(f"length {length} exceeds ModelConfig.max_len={model.config.max_len}.")
  forced = jnp.zeros((batch_size, length), jnp.int32)
  is_forced = jnp.zeros((batch_size, length), bool)
  if prompt is not None:
    prompt = jnp.atleast_2d(jnp.asarray(prompt, jnp.int32))
    prompt = jnp.broadcast_to(prompt, (batch_size, prompt.shape[1]))
    if prompt.shape[1] > length:
      raise ValueError(f"prompt length {prompt.shape[1]} exceeds length {length}.")
    forced = forced.at[:, :prompt.shape[1]].set(prompt)
    is_forced = is_forced.at[:, :prompt.shape[1]].set(True)
  run, args = decode_program(model, params, rng, forced, is_forced, sampler)
  return (lambda *a: run(*a)[0]), args


def decode(model: nn.Module, params, rng: jax.Array, forced: jax.Array, is_forced: jax.Array,
           sampler: SamplerConfig = SamplerConfig(), keep_logits: bool = False):
  """Left-to-right KV-cached decoding of an `AR` model, one network call per position.

  Args:
    forced: int [B, N]: tokens kept where is_forced (bool [B, N]) is true.
    sampler: how the other tokens are drawn; call j draws with `fold_in(rng, j)`.
    keep_logits: also return every call's logits (what tests compare with one pass).

  Returns:
    (tokens int32 [B, N], float32 logits [B, N, V] of call j = the distribution of
    token j, or None without keep_logits).
  """
  run, args = decode_program(model, params, rng, forced, is_forced, sampler, keep_logits)
  return run(*args)


def decode_program(model: nn.Module, params, rng: jax.Array, forced: jax.Array,
                   is_forced: jax.Array, sampler: SamplerConfig = SamplerConfig(),
                   keep_logits: bool = False):
  """The jitted decoder of `decode` and its arguments, not yet called: (run, args)."""
  batch, length = forced.shape
  ids = np.broadcast_to(np.arange(1, length + 1, dtype=np.int32), (batch, length))
  plan = plan_lib.make_plan(ids)  # N width-1 calls, with ARMD's segments
  tables = tuple((jnp.asarray(p.slots), jnp.asarray(p.starts)) for p in plan.phases)
  run = functools.partial(_decode, model, sampler, plan.structure, keep_logits)
  return run, (params, rng, jnp.asarray(forced, jnp.int32), jnp.asarray(is_forced, bool),
               tables)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _decode(model, sampler, structure, keep_logits, params, rng, forced, is_forced,
            slot_tables):
  *phases, _, _ = structure  # no prefill; uniform
  cfg = model.config
  batch, length = forced.shape
  rows = length + 2  # as ARMD's content caches for width-1 calls: 1 + N + 1
  state = dict(tokens=forced, content_k=empty_caches(cfg, batch, rows, cfg.num_layers),
               content_v=empty_caches(cfg, batch, rows, cfg.num_layers))
  if keep_logits:
    state["logits"] = jnp.zeros((batch, length, cfg.vocab_size), jnp.float32)
  inputs = dict(rng=rng, known=is_forced,  # cache row j holds stream row j, id j
                content_ids=jnp.broadcast_to(jnp.arange(rows, dtype=jnp.int32), (batch, rows)))
  call = functools.partial(_call, model.bind(params), sampler)
  state = run_phases(call, state, inputs, phases, slot_tables)
  return state["tokens"], state.get("logits")


def _call(m, sampler, inputs, state, slots: jax.Array, start: jax.Array):
  """Model call j = start [B] (every row's position j; slots [B, 1] = j): stream row j
  (BOS if j = 0, else token j - 1 at row j) through every layer on the caches, then token
  j drawn from its logits, or kept where known."""
  batch = slots.shape[0]
  j = start[0]
  row = jnp.broadcast_to(j, (batch, 1)).astype(jnp.int32)  # its id and RoPE position
  prev = jax.lax.dynamic_slice_in_dim(state["tokens"], jnp.maximum(j - 1, 0), 1, axis=1)
  x = jnp.where(j == 0, m.bos(batch), m.embed(prev, row))  # [B, 1, D]
  x, content_k, content_v = content_layers(
      m.layers, x, row, row, start, None, True, state["content_k"], state["content_v"],
      inputs["content_ids"], last_output=True)
  logits = m.logits(x)[:, 0]  # [B, V] float32
  draw = sample_logits(jax.random.fold_in(inputs["rng"], j), logits, sampler)  # [B]
  take = lambda a: jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)  # noqa: E731
  token = jnp.where(take(inputs["known"]), take(state["tokens"]), draw.astype(jnp.int32))
  state = dict(state, content_k=content_k, content_v=content_v,
               tokens=jax.lax.dynamic_update_slice_in_dim(state["tokens"], token[:, None], j,
                                                          axis=1))
  if "logits" in state:
    state["logits"] = jax.lax.dynamic_update_slice_in_dim(state["logits"], logits[:, None],
                                                          j, axis=1)
  return state
