"""Ancestral sampling for the MDLM baseline, with the network skipped when nothing changed.

Reverse process of the linear schedule alpha_t = 1 - t on the grid t_i = 1 - i / T:
going from t to s < t, every still-masked position is revealed with probability
(alpha_s - alpha_t) / (1 - alpha_t) = (t - s) / t, its value drawn from the denoiser's
p(x_n | z_t); revealed tokens never change (carry-over), and the last step (s = 0)
reveals everything left. The network is deterministic in z_t, so when a step reveals
nothing the next step's logits are the cached ones: such steps cost no network call
(MDLM's caching trick). `num_calls` counts the calls actually made for the batch;
`num_calls_per_row` counts the calls each row on its own would have needed.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from armd_jax.models.mdlm import mask_id
from armd_jax.sampling.generation import BaselineOutput
from armd_jax.sampling.sampler import SamplerConfig, sample_logits


def initial_state(config, batch_size: int, length: int, prompt=None,
                  infill: Optional[Tuple[jax.Array, jax.Array]] = None) -> jax.Array:
  """All-[MASK] z_1 [B, N] with a prompt (positions 0..P-1) or infill tokens revealed."""
  z = jnp.full((batch_size, length), mask_id(config), jnp.int32)
  if prompt is not None and infill is not None:
    raise ValueError("pass either prompt or infill, not both.")
  if prompt is not None:
    prompt = jnp.broadcast_to(jnp.atleast_2d(jnp.asarray(prompt, jnp.int32)),
                              (batch_size, jnp.shape(prompt)[-1]))
    if prompt.shape[1] > length:
      raise ValueError(f"prompt length {prompt.shape[1]} exceeds length {length}.")
    z = z.at[:, :prompt.shape[1]].set(prompt)
  if infill is not None:
    tokens, known = (jnp.asarray(a) for a in infill)
    if tokens.shape != (batch_size, length) or known.shape != tokens.shape:
      raise ValueError(f"infill tokens and known_mask must both be {(batch_size, length)}, "
                       f"got {tokens.shape} and {known.shape}.")
    z = jnp.where(known.astype(bool), tokens.astype(jnp.int32), z)
  return z


def generate(model: nn.Module, params, rng: jax.Array, *, batch_size: int, length: int,
             num_steps: int, prompt=None, infill=None,
             sampler: SamplerConfig = SamplerConfig(), use_cache: bool = True) -> BaselineOutput:
  """Samples [batch_size, length] tokens from an `MDLM` in `num_steps` reverse steps.

  Args:
    model, params: the MDLM module and its variables.
    num_steps: T, the number of reverse steps (an upper bound on network calls).
    prompt: optional int [P] or [B, P] placed at positions 0..P-1 and kept.
    infill: optional (tokens [B, N], known_mask [B, N]); known tokens are kept.
    sampler: how a revealed token is drawn (temperature / top-k / top-p / greedy).
    use_cache: skip the network when the previous step revealed nothing (turning it
      off only changes the cost, never the samples; the tests check that).

  Returns:
    BaselineOutput with tokens, num_calls and num_calls_per_row.
  """
  run, args = generation_program(model, params, rng, batch_size=batch_size, length=length,
                                 num_steps=num_steps, prompt=prompt, infill=infill,
                                 sampler=sampler, use_cache=use_cache)
  return BaselineOutput(*run(*args))


def generation_program(model: nn.Module, params, rng: jax.Array, *, batch_size: int,
                       length: int, num_steps: int, prompt=None, infill=None,
                       sampler: SamplerConfig = SamplerConfig(), use_cache: bool = True):
  """The jitted sampler and its arguments, not yet called: (run, args), `run(*args)` ->
  (tokens [B, N], calls, calls per row [B]) as `generate` returns them (for FLOP counts:
  `armd_jax.flops`; a step's network call is a `cond`, counted as if always made)."""
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
  if length > model.config.max_len:
    raise ValueError(f"length {length} exceeds ModelConfig.max_len={model.config.max_len}.")
  z = initial_state(model.config, batch_size, length, prompt, infill)
  return ((lambda p, r, z_: _generate(model, p, r, z_, num_steps, sampler, bool(use_cache))),
          (params, rng, z))


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _generate(model, params, rng, z, num_steps, sampler, use_cache):
  masked_id = mask_id(model.config)
  batch = z.shape[0]
  logits0 = jnp.zeros(z.shape + (model.config.vocab_size,), jnp.float32)

  def step(i, carry):
    z, logits, dirty, calls, row_calls = carry
    recompute = jnp.any(dirty) | (not use_cache)
    logits = jax.lax.cond(recompute, lambda: model.apply(params, z), lambda: logits)
    calls = calls + recompute.astype(jnp.int32)
    row_calls = row_calls + (dirty | (not use_cache)).astype(jnp.int32)
    t = 1.0 - i / num_steps
    s = 1.0 - (i + 1) / num_steps
    draw_key, reveal_key = jax.random.split(jax.random.fold_in(rng, i))
    draw = sample_logits(draw_key, logits, sampler)  # [B, N]
    reveal = (jax.random.uniform(reveal_key, z.shape) < (t - s) / t) | (i == num_steps - 1)
    new_z = jnp.where((z == masked_id) & reveal, draw.astype(jnp.int32), z)
    return new_z, logits, jnp.any(new_z != z, axis=-1), calls, row_calls

  init = (z, logits0, jnp.ones((batch,), bool), jnp.zeros((), jnp.int32),
          jnp.zeros((batch,), jnp.int32))
  z, _, _, calls, row_calls = jax.lax.fori_loop(0, num_steps, step, init)
  return z, calls, row_calls
