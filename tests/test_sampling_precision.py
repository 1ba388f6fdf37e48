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

from armd_jax import sampling
from armd_jax.sampling import SamplerConfig
from armd_jax.sampling.sampler import exponential_from_bits, first_argmax, sample_with_gumbel


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


def test_each_sampler_draws_with_exactly_its_own_noise():
  # The tokens of `sample_logits` are the first argmax of the filtered logits plus the
  # noise of its mode, drawn from the same key: so the draw probabilities of each mode are
  # those of its noise, which the next test sums exactly.
  logits = jax.random.normal(jax.random.PRNGKey(3), (512, 50)) * 4
  key = jax.random.PRNGKey(7)
  for noise, gumbel in (
      ("precise", lambda: -jnp.log(sampling.exponential_noise(key, logits.shape))),
      ("fast", lambda: jax.random.gumbel(key, logits.shape, jnp.float32))):
    sampler = SamplerConfig(noise=noise, top_k=20)
    want = first_argmax(sampling.filter_logits(logits, sampler) + gumbel())
    np.testing.assert_array_equal(sampling.sample_logits(key, logits, sampler), want)


def _win_probability(noise_e: np.ndarray, weights: np.ndarray, p: float) -> float:
  """P(a token of probability p beats one of 1 - p) under Gumbel-max, summed exactly over
  the rare token's noise values E (each of probability `weights`); the dominant token's
  E_d ~ Exp(1) (its noise is exact away from 0): P = sum_j w_j P(E_d > E_j (1 - p) / p)."""
  return float(np.sum(weights * np.exp(-noise_e * (1 - p) / p)))


@pytest.mark.parametrize("p", [1e-6, 1e-7, 1e-8, 1e-10])
def test_rare_token_probabilities_summed_over_each_noise_grid(p):
  # Fast: jax's float32 Gumbel makes E = -log(u) from u = 1 - k 2^-23 (its largest
  # uniforms give its smallest E), so E never falls below ~1.19e-7: a token of p <= 1e-7
  # beside a dominant one is drawn far too rarely (and ~never at 1e-8).
  k = np.arange(1, 2**16)
  e_fast = np.asarray(-jnp.log(jnp.asarray(1.0 - k * 2.0**-23, jnp.float32)), np.float64)
  fast = _win_probability(e_fast, np.full(k.shape, 2.0**-23), p) / p
  # Precise: E from two 32-bit words, v on the 2^-48 grid (sampled every m grid steps up
  # to v = 40 p, trapezoid weights: the integrand is smooth on that scale).
  m = max(1, int(p * 2.0**48 / 4000))
  n = np.arange(0, 160_001, dtype=np.int64) * m  # grid indices: v = n 2^-48
  hi = ((n >> 24) << 8).astype(np.uint32)
  lo = ((n & (2**24 - 1)) << 8).astype(np.uint32)
  e_precise = np.asarray(exponential_from_bits(jnp.asarray(hi), jnp.asarray(lo)), np.float64)
  weights = np.full(n.shape, m * 2.0**-48)
  weights[[0, -1]] /= 2
  precise = _win_probability(e_precise, weights, p) / p
  # The exact answer is p: precise gets it, fast is off by the tail bias.
  assert abs(precise - 1) < 2e-3, precise
  bound = {1e-6: 0.96, 1e-7: 0.6, 1e-8: 1e-3, 1e-10: 1e-3}[p]
  assert fast < bound, fast


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
  rng = np.random.default_rng(0)
  values = rng.integers(0, 4, size=(64, 7)).astype(np.float32)  # many ties
  values[3, 5] = np.inf
  values[4] = -np.inf  # every entry -inf: index 0, as argmax
  values[5, [1, 6]] = np.inf  # tied +inf: the first
  got = np.asarray(first_argmax(jnp.asarray(values)))
  np.testing.assert_array_equal(got, np.argmax(values, axis=-1))
  assert got.dtype == np.int32


@pytest.mark.parametrize("sampler", [SamplerConfig(top_k=2), SamplerConfig(top_p=0.5)],
                         ids=["top_k", "top_p"])
def test_a_filtered_token_is_never_drawn_even_by_the_most_extreme_precise_noise(sampler):
  # Words of zeros are the uniform draw v = 0 (probability 2^-48 per element): unclamped,
  # E = 0 and the Gumbel noise -log E = +inf would lift a filtered logit (-1e30) above
  # every kept one. Each row gives that draw to one filtered token and the largest draw
  # (E ~ 33, noise ~ -3.5) to every other token, so only the clamp can keep it out.
  probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
  logits = jnp.log(jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (3, 5)))
  filtered_out = np.array([2, 3, 4])  # outside top-2 and outside the 0.5 nucleus
  words = np.full((3, 5), 2**32 - 1, np.uint32)
  words[np.arange(3), filtered_out] = 0
  smallest = exponential_from_bits(jnp.asarray(words), jnp.asarray(words))
  assert float(smallest.min()) > 0
  gumbel = -jnp.log(smallest)
  assert bool(jnp.isfinite(gumbel).all())
  drawn = np.asarray(sample_with_gumbel(logits, gumbel, sampler))
  kept = np.asarray(sampling.filter_logits(logits, sampler))[0] > -1e29
  assert kept[drawn].all(), (drawn, kept)
  # The same noise without a filter does draw those tokens: the noise is extreme enough.
  np.testing.assert_array_equal(sample_with_gumbel(logits, gumbel, SamplerConfig()),
                                filtered_out)
