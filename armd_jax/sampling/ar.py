"""KV-cached left-to-right sampling for the AR baseline, reusing the `AR` module's pieces.

Row j of the AR stream holds BOS (j = 0) or x_{j-1} and predicts x_j. Step j embeds
that row, runs it through every layer with `Block.keys_values` (appended to a per-layer
cache) and `Block.attend` (query id j sees cache slots with id <= j; empty slots hold
later ids, so the same `kv_id <= q_id` mask hides them), then draws x_j. N network calls
for N tokens; prompt tokens are forced instead of drawn.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  return ((lambda p, r, f, i: _generate(model, p, r, f, i, sampler)),
          (params, rng, forced, is_forced))


def _decode_row(module, row, position, k_cache, v_cache):
  """Runs one stream row [B, 1, D] at `position` through all layers; updates the caches."""
  batch = row.shape[0]
  ids = jnp.full((batch, 1), position, jnp.int32)
  slot_ids = jnp.broadcast_to(jnp.arange(k_cache.shape[2], dtype=jnp.int32),
                              (batch, k_cache.shape[2]))
  x = row
  new_k, new_v = [], []
  for i, layer in enumerate(module.layers):
    k, v = layer.keys_values(x, ids)  # [B, 1, H, Dh]
    ks = jax.lax.dynamic_update_slice_in_dim(k_cache[i], k, position, axis=1)
    vs = jax.lax.dynamic_update_slice_in_dim(v_cache[i], v, position, axis=1)
    x = layer.attend(x, ids, ids, ks, vs, slot_ids)
    new_k.append(ks)
    new_v.append(vs)
  return module.logits(x)[:, 0], jnp.stack(new_k), jnp.stack(new_v)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(model, params, rng, forced, is_forced, sampler):
  cfg = model.config
  batch, length = forced.shape
  cache_shape = (cfg.num_layers, batch, length, cfg.num_heads, cfg.head_dim)
  k_cache = jnp.zeros(cache_shape, cfg.compute_dtype)
  v_cache = jnp.zeros(cache_shape, cfg.compute_dtype)

  def step(j, carry):
    tokens, k_cache, v_cache = carry
    prev = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(j - 1, 0), 1, axis=1)  # [B, 1]

    def run(module):
      row = jnp.where(j == 0, module.bos(batch),
                      module.embed(prev, jnp.full_like(prev, j)))  # [B, 1, D] at row j
      return _decode_row(module, row, j, k_cache, v_cache)

    logits, k_cache, v_cache = nn.apply(run, model)(params)
    draw = sample_logits(jax.random.fold_in(rng, j), logits, sampler)  # [B]
    new = jnp.where(is_forced[:, j], forced[:, j], draw.astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], j, axis=1)
    return tokens, k_cache, v_cache

  tokens, _, _ = jax.lax.fori_loop(0, length, step, (forced, k_cache, v_cache))
  return tokens
