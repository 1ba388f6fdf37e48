"""Turning float32 logits into tokens: temperature, top-k, nucleus (top-p), greedy.

Precision: logits are cast to float32 and categorical draws use the Gumbel-max trick
with float32 Gumbel noise (`jax.random.gumbel(..., dtype=float32)`), never bfloat16 or
float16. Low-precision Gumbel noise truncates the noise tail, which acts like a lower
temperature and is known to lower measured generative perplexity artificially in
masked-diffusion work. float64 is not enabled by default in JAX, so float32 is what we use
and state.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

# Logit given to filtered-out tokens: exp() of it underflows to 0 in float32 but adding
# Gumbel noise keeps it finite (no inf - inf NaNs).
_FILTERED = -1e30


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How the next tokens are drawn from the model's logits.

  Attributes:
    temperature: divides the logits before filtering; > 0 (ignored when greedy).
    top_k: keep only the k most likely tokens; None or 0 keeps all.
    top_p: nucleus sampling; keep the smallest set of most likely tokens whose
      probability reaches top_p (the most likely token is always kept); None or 1.0
      keeps all.
    greedy: take the argmax (temperature, top-k and top-p are then irrelevant).
  """

  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  greedy: bool = False

  def __post_init__(self):
    if not self.temperature > 0.0:
      raise ValueError(f"SamplerConfig.temperature must be > 0, got {self.temperature!r}.")
    if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
      raise ValueError(f"SamplerConfig.top_k must be None or an int >= 0, got {self.top_k!r}.")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p!r}.")


def filter_logits(logits: jax.Array, sampler: SamplerConfig) -> jax.Array:
  """Float32 logits [..., V] scaled by 1/temperature with top-k / top-p filtered out."""
  logits = logits.astype(jnp.float32) / jnp.float32(sampler.temperature)
  vocab = logits.shape[-1]
  if sampler.top_k and sampler.top_k < vocab:
    kth = jax.lax.top_k(logits, sampler.top_k)[0][..., -1:]  # [..., 1]
    logits = jnp.where(logits >= kth, logits, _FILTERED)
  if sampler.top_p is not None and sampler.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
    keep_sorted = mass_before < sampler.top_p  # always keeps the first
    # Smallest kept logit is the threshold (ties at the threshold are all kept).
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, _FILTERED)
  return logits


def sample_logits(rng: jax.Array, logits: jax.Array, sampler: SamplerConfig) -> jax.Array:
  """Draws int32 tokens [...] from logits [..., V] (float32 Gumbel-max, or argmax if greedy)."""
  if sampler.greedy:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, sampler)
  gumbel = jax.random.gumbel(rng, filtered.shape, dtype=jnp.float32)
  return jnp.argmax(filtered + gumbel, axis=-1).astype(jnp.int32)
