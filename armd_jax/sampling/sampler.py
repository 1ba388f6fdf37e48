"""Turning float32 logits into tokens: temperature, top-k, nucleus (top-p), greedy.

Precision. Categorical draws use the Gumbel-max trick, `argmax(logits - log E)` with E
standard exponential noise. The float32 Gumbel noise of `jax.random.gumbel` comes from a
uniform on a 2^-23 grid, so E = -log(u) is quantised near 0 (its smallest value is about
1.2e-7): tokens far below the most likely one are drawn too rarely (about -6% relative at
p = 1e-6 beside a dominant token, about -50% at 1e-7, never below), the tail truncation
that lowers measured generative perplexity in masked-diffusion work. `noise='precise'`
(the default) builds E from two 32-bit words: a uniform on a 2^-48 grid whose small values
(and whose distance from 1) keep float32 *relative* precision, then E = -log1p(-v) or
-log(1 - v) on whichever side keeps it exact. E then has float32 relative precision
everywhere down to 2^-48 and up to 33, which is what float64 sampling buys, without
`jax_enable_x64` and under jit on any backend. `noise='fast'` keeps jax's float32 Gumbel
noise (half the random bits). See docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

# Logit given to filtered-out tokens: exp() of it underflows to 0 in float32 but adding
# Gumbel noise keeps it finite (no inf - inf NaNs).
_FILTERED = -1e30
NOISES = ("precise", "fast")
_TWO24 = float(2**24)
# Smallest exponential noise: the grid cell v = 0 (probability 2^-48) would give E = 0 and
# Gumbel noise +inf, which beats even a filtered logit (-1e30 + inf = inf). E is clamped
# to half the grid step, so the noise stays finite (at most 49 log 2 ~ 34) and the CDF of
# E is unchanged at every x >= 2^-48.
_MIN_EXPONENTIAL = float(2**-49)


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
    noise: 'precise' (default; exponential noise with float32 relative precision down to
      2^-48, from two 32-bit words) or 'fast' (jax's float32 Gumbel noise, 2^-23 grid).
  """

  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: Optional[float] = None
  greedy: bool = False
  noise: str = "precise"

  def __post_init__(self):
    if not self.temperature > 0.0:
      raise ValueError(f"SamplerConfig.temperature must be > 0, got {self.temperature!r}.")
    if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
      raise ValueError(f"SamplerConfig.top_k must be None or an int >= 0, got {self.top_k!r}.")
    if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p!r}.")
    if self.noise not in NOISES:
      raise ValueError(f"SamplerConfig.noise must be one of {NOISES}, got {self.noise!r}.")


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


def exponential_noise(rng: jax.Array, shape) -> jax.Array:
  """Standard exponential float32 noise [shape] with float32 relative precision everywhere.

  Two 32-bit words give a = 24 high bits and b = 24 more: v = (a + b 2^-24) 2^-24 is
  uniform on a 2^-48 grid in [0, 1). E = -log(1 - v) is computed as -log1p(-v) when
  v < 1/2 (small E keep v's relative precision) and as -log(u) with u = 1 - v =
  ((2^24 - a) - b 2^-24) 2^-24 formed exactly otherwise (large E keep u's). E lies in
  [2^-49, 33.3] (v = 0 is clamped up to 2^-49, so -log E is always finite); its CDF matches
  1 - exp(-x) to float32 relative precision for x >= 2^-48.
  """
  words = jax.random.bits(rng, (2,) + tuple(shape), jnp.uint32)
  return exponential_from_bits(words[0], words[1])


def exponential_from_bits(hi: jax.Array, lo: jax.Array) -> jax.Array:
  """The map of `exponential_noise` from two uint32 words to E (float32; exposed for tests)."""
  a = (hi >> 8).astype(jnp.float32)  # exact integers in [0, 2^24)
  frac = (lo >> 8).astype(jnp.float32) * jnp.float32(1.0 / _TWO24)  # [0, 1)
  v = (a + frac) * jnp.float32(1.0 / _TWO24)  # uniform [0, 1); float32 rel. precision
  u = ((jnp.float32(_TWO24) - a) - frac) * jnp.float32(1.0 / _TWO24)  # 1 - v in (0, 1]
  e = jnp.where(a < _TWO24 / 2, -jnp.log1p(-v), -jnp.log(u))
  return jnp.maximum(e, jnp.float32(_MIN_EXPONENTIAL))


def sample_logits(rng: jax.Array, logits: jax.Array, sampler: SamplerConfig) -> jax.Array:
  """Draws int32 tokens [...] from logits [..., V] (Gumbel-max, or argmax if greedy).

  `sampler.noise` picks the noise: 'precise' (argmax of logits - log E, E from
  `exponential_noise`) or 'fast' (float32 `jax.random.gumbel`).
  """
  if sampler.greedy:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  if sampler.noise == "fast":
    gumbel = jax.random.gumbel(rng, logits.shape, dtype=jnp.float32)
  else:
    gumbel = -jnp.log(exponential_noise(rng, logits.shape))  # finite: E >= 2^-49
  return sample_with_gumbel(logits, gumbel, sampler)


def sample_with_gumbel(logits: jax.Array, gumbel: jax.Array,
                       sampler: SamplerConfig) -> jax.Array:
  """int32 tokens [...]: argmax of the filtered logits [..., V] plus Gumbel noise [..., V].

  The draw of `sample_logits` once its noise is fixed (exposed so tests can pass extreme
  noise). A filtered token (logit -1e30) can only win against finite noise of the kept
  ones if its own noise is about 1e30, which neither noise produces.
  """
  return first_argmax(filter_logits(logits, sampler) + gumbel)


def first_argmax(values: jax.Array) -> jax.Array:
  """int32 index of the first maximum over the last axis (= `jnp.argmax` without NaNs).

  Computed as a max and then the smallest index attaining it: two plain reductions. On
  XLA:CPU `jnp.argmax` of the noisy logits fuses the noise into one (value, index)
  reduction that runs as a slow scalar loop (it made sampling ~2x slower at batch 8;
  benchmarks/decode_call_parts.py). A NaN row gives the last index instead of the NaN's.
  """
  size = values.shape[-1]
  best = values.max(axis=-1, keepdims=True)
  index = jnp.min(jnp.where(values == best, jnp.arange(size, dtype=jnp.int32), size), axis=-1)
  return jnp.minimum(index, size - 1)
