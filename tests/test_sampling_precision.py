"""Categorical draws with float64-equivalent precision in float32 (no jax_enable_x64).

Gumbel-max draws token i iff E_i / p_i is the smallest, E_i standard exponential noise.
jax's float32 Gumbel noise makes E = -log(u) from a uniform on a 2^-23 grid, so small E
(what a rare token needs to win) are quantised to multiples of about 1.2e-7. The precise
noise (`noise='precise'`, the default) keeps float32 relative precision down to 2^-48.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from armd_jax import sampling
from armd_jax.sampling import SamplerConfig
from armd_jax.sampling.sampler import exponential_from_bits


def test_precise_noise_equals_float64_exponentials_from_the_same_bits_at_every_scale():
  # Words whose 24-bit halves place v = (a + b 2^-24) 2^-24 from 2^-48 up to 1 - 2^-48.
  a = np.array([0, 0, 0, 1, 7, 2**10, 2**20, 2**23 - 1, 2**23, 2**24 - 9, 2**24 - 1, 2**24 - 1])
  b = np.array([1, 5, 2**23, 0, 3, 99, 12345, 2**24 - 1, 0, 2**20, 1, 2**24 - 1])
  hi, lo = (a << 8).astype(np.uint32), (b << 8).astype(np.uint32)
  got = np.asarray(exponential_from_bits(jnp.asarray(hi), jnp.asarray(lo)), np.float64)
  v = (a + b / 2.0**24) / 2.0**24
  u = ((2.0**24 - a) - b / 2.0**24) / 2.0**24
  want = np.where(a < 2**23, -np.log1p(-v), -np.log(u))  # float64
  np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)
  assert got.min() < 1e-14 and got.max() > 33  # 2^-48 and -log(2^-48) are reached


def test_fast_float32_gumbel_cannot_produce_the_small_noise_rare_tokens_need():
  # The mechanism of the tail bias, shown exactly: a rare token with probability p beside a
  # dominant one wins iff E_rare < p E_dom. With jax's float32 Gumbel, E = exp(-g) never
  # falls below ~1.19e-7 and sits on a 1.19e-7 grid, so P(win) is off at p = 1e-6 by about
  # -6%: summed exactly over that grid below (not sampled: it would take ~1e10 draws).
  step = 2.0**-23
  k = np.arange(1, 4096)  # u = 1 - k 2^-23: the largest uniforms, i.e. the smallest E
  u = jnp.asarray(1.0 - k * step, jnp.float32)
  e_fast = np.asarray(-jnp.log(u), np.float64)  # what jax's float32 gumbel computes
  assert e_fast.min() > 1.1e-7
  p = 1e-6
  win_fast = np.sum(step * np.exp(-e_fast * (1 - p) / p))  # E_dom ~ Exp(1)
  assert win_fast / p < 0.96  # today's sampler draws it >= 4% too rarely
  # The precise noise on the same events: v = k 2^-48 near 0 keeps relative precision.
  kk = np.arange(1, 4096)
  e_precise = np.asarray(exponential_from_bits(jnp.zeros(kk.shape, jnp.uint32),
                                               jnp.asarray(kk << 8, jnp.uint32)), np.float64)
  np.testing.assert_allclose(e_precise, kk * 2.0**-48, rtol=1e-6)


def _frequencies(noise: str, probs: np.ndarray, draws: int, chunk: int = 2**19) -> np.ndarray:
  logits = jnp.asarray(np.log(probs), jnp.float32)
  sampler = SamplerConfig(noise=noise)

  @jax.jit
  def counts(key):
    tokens = sampling.sample_logits(key, jnp.broadcast_to(logits, (chunk, len(probs))), sampler)
    return jnp.bincount(tokens, length=len(probs))

  total = np.zeros(len(probs), np.int64)
  for i in range(draws // chunk):
    total += np.asarray(counts(jax.random.PRNGKey(i)))
  return total


@pytest.mark.slow
def test_precise_draws_match_expected_counts_from_1e_2_down_to_1e_6():
  probs = np.array([1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
  probs = np.append(probs, 1.0 - probs.sum())
  draws = 2**23
  counts = _frequencies("precise", probs, draws)
  for p, c in zip(probs, counts):
    pvalue = stats.binomtest(int(c), draws, p).pvalue
    assert pvalue > 1e-4, (p, c, draws * p, pvalue)


def test_precise_noise_is_the_default_and_fast_stays_available():
  assert SamplerConfig().noise == "precise"
  logits = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
  fast = sampling.sample_logits(jax.random.PRNGKey(0), jnp.broadcast_to(logits, (4000, 3)),
                                SamplerConfig(noise="fast"))
  freq = np.bincount(np.asarray(fast), minlength=3) / 4000
  np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)
  with pytest.raises(ValueError, match="noise"):
    SamplerConfig(noise="float16")


def test_first_argmax_equals_argmax_with_ties_and_infinities():
  from armd_jax.sampling.sampler import first_argmax  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  values = rng.integers(0, 4, size=(64, 7)).astype(np.float32)  # many ties
  values[3, 5] = np.inf
  values[4] = -np.inf  # every entry -inf: index 0, as argmax
  values[5, [1, 6]] = np.inf  # tied +inf: the first
  got = np.asarray(first_argmax(jnp.asarray(values)))
  np.testing.assert_array_equal(got, np.argmax(values, axis=-1))
  assert got.dtype == np.int32
