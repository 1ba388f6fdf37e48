"""Properties of the ARMD network (spec section 2), each stated as a sentence."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from armd_jax import kernels, orders
from armd_jax.losses import token_log_probs
from conftest import init_model, tiny_config

LENGTH = 10
# Attention settings every core property must hold under: the XLA reference and the
# Pallas kernel (interpreted on CPU, tiles of 8 so that several tiles and skips occur).
PALLAS = dict(attention="pallas", pallas_interpret=True, pallas_block_q=8, pallas_block_kv=8)
ATTENTIONS = [pytest.param({}, id="xla"), pytest.param(PALLAS, id="pallas")]


def random_ids_with_ties(rng, batch, length):
  """Dense block ids with ties: random masking-diffusion blocks over few steps."""
  return orders.masked_diffusion(rng, batch, length, num_steps=4)


def causality_violations(model, params, tokens, ids):
  """Perturbs each token in turn; returns (leaks, misses) as lists of (n, i) pairs.

  A leak: logits[n] changed although b(i) >= b(n). A miss: logits[n] unchanged although
  b(i) < b(n) (the model ignored visible context).
  """
  n_tok = tokens.shape[1]
  # Row 0 is the original, row 1 + i has token i changed: one batch, so every row goes
  # through the same compiled computation and bitwise comparison is meaningful.
  batch = jnp.tile(tokens, (n_tok + 1, 1))
  batch = batch.at[1 + jnp.arange(n_tok), jnp.arange(n_tok)].set(
      (tokens[0] + 1) % model.config.vocab_size)
  out = np.asarray(model.apply(params, batch, jnp.tile(ids, (n_tok + 1, 1))))
  base, out = out[0], out[1:]
  b = np.asarray(ids)[0]
  leaks, misses = [], []
  for i, n in itertools.product(range(n_tok), range(n_tok)):
    same = np.array_equal(out[i, n], base[n])
    if b[i] >= b[n] and not same:
      leaks.append((n, i))
    if b[i] < b[n] and same:
      misses.append((n, i))
  return leaks, misses


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_depend_exactly_on_earlier_blocks_bit_for_bit(seed, attention):
  model, params = init_model(tiny_config(**attention))
  rng_ids, rng_tok = jax.random.split(jax.random.PRNGKey(seed))
  ids = random_ids_with_ties(rng_ids, 1, LENGTH)
  assert len(np.unique(ids)) < LENGTH, "the order must contain ties"
  tokens = jax.random.randint(rng_tok, (1, LENGTH), 0, model.config.vocab_size)
  leaks, misses = causality_violations(model, params, tokens, ids)
  assert leaks == [] and misses == []


def test_causality_check_catches_a_leaky_mask(tiny, monkeypatch):
  model, params = tiny
  real = kernels.block_causal_attention

  def leaky(q, k, v, q_ids, kv_ids, **kwargs):
    return real(q, k, v, q_ids + 1, kv_ids, **kwargs)  # lets every query see its own block

  monkeypatch.setattr(kernels, "block_causal_attention", leaky)
  ids = orders.left_to_right(1, LENGTH)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (1, LENGTH), 0, model.config.vocab_size)
  leaks, _ = causality_violations(model, params, tokens, ids)
  assert leaks, "a mask that shows a token its own block must be caught"


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("query_init", ["prefix", "prefix_plus_position"])
def test_permuting_tokens_ids_and_positions_together_permutes_the_logits(query_init, attention):
  model, params = init_model(tiny_config(query_init=query_init, **attention))
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
  tokens = jax.random.randint(k1, (2, LENGTH), 0, model.config.vocab_size)
  ids = random_ids_with_ties(k2, 2, LENGTH)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (2, LENGTH))
  perm = jax.random.permutation(k3, LENGTH)
  logits = model.apply(params, tokens, ids, positions)
  permuted = model.apply(params, tokens[:, perm], ids[:, perm], positions[:, perm])
  np.testing.assert_allclose(permuted, logits[:, perm], atol=1e-5)


def all_sequences(vocab, length):
  return jnp.asarray(list(itertools.product(range(vocab), repeat=length)), jnp.int32)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("order", ["left_to_right", "random", "multi_token_blocks"])
def test_probabilities_of_all_sequences_sum_to_one(order, attention):
  vocab, length = 3, 4
  model, params = init_model(tiny_config(vocab_size=vocab, **attention), length=length, seed=5)
  seqs = all_sequences(vocab, length)  # [81, 4]
  ids = {
      "left_to_right": jnp.array([1, 2, 3, 4]),
      "random": jnp.array([3, 1, 4, 2]),
      "multi_token_blocks": jnp.array([2, 1, 2, 1]),
  }[order]
  ids = jnp.broadcast_to(ids, seqs.shape)
  log_p = token_log_probs(model.apply(params, seqs, ids), seqs).sum(-1)
  np.testing.assert_allclose(jnp.exp(log_p).sum(), 1.0, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_two_stream_depth_and_attention_settings_keep_strict_causality(attention):
  for n2s in (0, 1, 4):
    model, params = init_model(tiny_config(num_two_stream_layers=n2s, tie_embeddings=False,
                                           **attention))
    ids = random_ids_with_ties(jax.random.PRNGKey(n2s), 1, LENGTH)
    tokens = jax.random.randint(jax.random.PRNGKey(7), (1, LENGTH), 0, 13)
    leaks, misses = causality_violations(model, params, tokens, ids)
    assert leaks == [] and misses == [], n2s


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, params = init_model(tiny_config(dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  logits = model.apply(params, jnp.zeros((1, 8), jnp.int32), orders.left_to_right(1, 8))
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


def test_dropout_is_active_only_when_not_deterministic():
  model, params = init_model(tiny_config(dropout_rate=0.5))
  tokens, ids = jnp.ones((1, 8), jnp.int32), orders.left_to_right(1, 8)
  a = model.apply(params, tokens, ids)
  b = model.apply(params, tokens, ids, deterministic=True)
  c = model.apply(params, tokens, ids, deterministic=False,
                  rngs={"dropout": jax.random.PRNGKey(0)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("bad, message", [
    (dict(tokens=jnp.zeros((8,), jnp.int32)), "tokens must be"),
    (dict(block_ids=jnp.ones((1, 7), jnp.int32)), "block_ids shape"),
    (dict(tokens=jnp.zeros((1, 40), jnp.int32), block_ids=jnp.ones((1, 40), jnp.int32)),
     "max_len"),
    (dict(block_ids=jnp.ones((1, 8), jnp.float32)), "integer"),
    (dict(positions=jnp.zeros((1, 3), jnp.int32)), "positions"),
])
def test_bad_inputs_raise_clear_errors(tiny, bad, message):
  model, params = tiny
  args = dict(tokens=jnp.zeros((1, 8), jnp.int32), block_ids=jnp.ones((1, 8), jnp.int32),
              positions=None)
  args.update(bad)
  with pytest.raises(ValueError, match=message):
    model.apply(params, args["tokens"], args["block_ids"], args["positions"])
