"""Properties of the ARMD network (docs/method.md, section 2), each stated as a sentence."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from armd_jax import kernels, orders
from armd_jax.losses import token_log_probs
from conftest import init_model, tiny_config

LENGTH = 10
# Eager `model.apply` compiles each operation once per shapes, then reuses it: tests at the
# batch of the causality check (a row per perturbed token plus the original) reuse its
# compiled operations instead of compiling a second set for another batch size.
BATCH = LENGTH + 1
# Attention settings every core property must hold under: the XLA reference (dense and
# chunked prefix aggregation), 'auto' (XLA on CPU) and the Pallas kernel (interpreted on
# CPU, tiles of 8 so that several tiles and skips occur; chunked prefix aggregation in
# chunks of 4 so that blocks straddle chunks).
PALLAS = dict(attention="pallas", pallas_interpret=True, pallas_block_q=8, pallas_block_kv=8,
              prefix_chunk=4)
CHUNKED = dict(prefix_aggregation="chunked", prefix_chunk=4)
ATTENTIONS = [pytest.param({}, id="xla"), pytest.param(CHUNKED, id="xla-chunked-prefix"),
              pytest.param(dict(attention="auto"), id="auto"),
              pytest.param(PALLAS, id="pallas")]


@functools.partial(jax.jit, static_argnums=0)
def compiled_apply(model, params, tokens, ids):
  """`model.apply` as one compiled program per model and shapes, for the tests whose dtype
  or shapes no other test runs op by op (the inputs are traced: values are not checked)."""
  return model.apply(params, tokens, ids)


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
  tokens = jax.random.randint(k1, (BATCH, LENGTH), 0, model.config.vocab_size)
  ids = random_ids_with_ties(k2, BATCH, LENGTH)
  positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
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
  # Compiled as a whole (no other test runs these shapes); ids are traced, so the three
  # orders share one program per attention setting.
  log_p = token_log_probs(compiled_apply(model, params, seqs, ids), seqs).sum(-1)
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


def bfloat16_inputs():
  """Tokens and tied block ids the two bfloat16 tests share (one compiled forward)."""
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 13)
  return tokens, random_ids_with_ties(jax.random.PRNGKey(1), 2, 12)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model, params = init_model(tiny_config(dtype="bfloat16"))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  logits = compiled_apply(model, params, *bfloat16_inputs())
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
    (dict(block_ids=jnp.zeros((1, 8), jnp.int32)), "block ids must be >= 1"),
    (dict(block_ids=jnp.arange(-1, 7)[None]), "block ids must be >= 1"),
    (dict(positions=jnp.arange(8)[None] + 30), r"positions must lie in \[0, .*max_len=32"),
    (dict(positions=jnp.arange(8)[None] - 1), "positions must lie in"),
])
def test_bad_inputs_raise_clear_errors(tiny, bad, message):
  model, params = tiny
  args = dict(tokens=jnp.zeros((1, 8), jnp.int32), block_ids=jnp.ones((1, 8), jnp.int32),
              positions=None)
  args.update(bad)
  with pytest.raises(ValueError, match=message):
    model.apply(params, args["tokens"], args["block_ids"], args["positions"])


def test_traced_inputs_skip_the_value_checks_but_eager_calls_do_not(tiny):
  model, params = tiny
  tokens, ids = jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32)
  jax.jit(model.apply)(params, tokens, ids)  # traced: values unknown, no check
  with pytest.raises(ValueError, match="block ids must be >= 1"):
    model.apply(params, tokens, ids)


def test_inputs_captured_as_constants_inside_jit_are_checked_not_traced(tiny):
  model, params = tiny
  tokens = jnp.zeros((1, 8), jnp.int32)
  good = orders.left_to_right(1, 8)
  jax.make_jaxpr(lambda p: model.apply(p, tokens, good))(params)  # no ConcretizationTypeError
  bad = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match="block ids must be >= 1"):
    jax.jit(lambda p: model.apply(p, tokens, bad))(params)


# -- the leaner forward and the chunked prefix aggregation ------------------------------

def full_two_stream_forward(module, tokens, block_ids):
  """The formulation before the lean last layer, kept as the reference: dense prefix aggregation
  and every two-stream layer (the last one included) runs content and query rows."""
  from armd_jax.models import prefix
  cfg = module.config
  batch, length = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
  x0, pe = module.embed(tokens, positions)
  bos_x0, bos_pe = module.bos(batch)
  x = jnp.concatenate([bos_x0, x0], axis=1)
  ctx_pe = jnp.concatenate([bos_pe, pe], axis=1)
  ctx_ids = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), block_ids], axis=1)
  rope = positions + 1
  ctx_rope = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), rope], axis=1)
  aggregate, count = prefix.prefix_aggregate_dense(pe, block_ids, ctx_pe, x, ctx_ids)
  g = module.query_stream_init(aggregate, count, pe)
  both_ids = jnp.concatenate([ctx_ids, block_ids - 1], axis=1)
  both_rope = jnp.concatenate([ctx_rope, rope], axis=1)
  for layer in module.layers[:cfg.num_two_stream_layers]:
    both = layer(jnp.concatenate([x, g], axis=1), both_rope, both_ids, kv_len=length + 1)
    x, g = both[:, :length + 1], both[:, length + 1:]
  for layer in module.layers[cfg.num_two_stream_layers:]:
    g = layer(g, rope, block_ids)
  return module.logits(g)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("n2s", [1, 2])
def test_lean_forward_gives_the_logits_of_the_full_two_stream_forward(attention, n2s):
  model, params = init_model(tiny_config(num_two_stream_layers=n2s, **attention),
                             length=LENGTH)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (BATCH, LENGTH), 0, 13)
  ids = random_ids_with_ties(jax.random.PRNGKey(4), BATCH, LENGTH)
  lean = np.asarray(model.apply(params, tokens, ids))
  full = np.asarray(model.apply(params, tokens, ids, method=full_two_stream_forward))
  assert np.abs(lean - full).max() <= 1e-6 * np.abs(full).max()


def test_the_lean_check_catches_a_forward_that_drops_the_last_content_layer(tiny):
  model, params = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(3), (BATCH, LENGTH), 0, 13)
  ids = random_ids_with_ties(jax.random.PRNGKey(4), BATCH, LENGTH)
  full = np.asarray(model.apply(params, tokens, ids, method=full_two_stream_forward))
  shallower = init_model(tiny_config(num_two_stream_layers=1))[0]  # same parameter tree
  wrong = np.asarray(shallower.apply(params, tokens, ids))
  assert np.abs(wrong - full).max() > 1e-3 * np.abs(full).max()


@pytest.mark.parametrize("chunk", [1, 3, 4, 16, 64])
@pytest.mark.parametrize("blocks", ["singletons", "ties", "one_block", "long_blocks"])
def test_chunked_prefix_aggregation_equals_the_dense_one(chunk, blocks):
  from armd_jax.models import prefix
  batch, length, p, d = 3, 23, 5, 6  # 23 rows: the last chunk is padded
  rng = np.random.default_rng(chunk)
  steps = {"singletons": length, "ties": 6, "one_block": 1, "long_blocks": 2}[blocks]
  ids = rng.integers(1, steps + 1, (batch, length))
  if blocks == "singletons":
    ids = np.stack([rng.permutation(length) + 1 for _ in range(batch)])
  ids = np.sort(ids, axis=1)  # generation order of a random order
  ids[:, 0] = 0  # the start row
  pe = jnp.asarray(rng.normal(size=(batch, length, p)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(batch, length, d)), jnp.float32)
  ids = jnp.asarray(ids, jnp.int32)
  # Compiled as wholes (the 20 cases share one dense program, one chunked one per chunk).
  dense, dense_count = jax.jit(prefix.prefix_aggregate_dense)(pe, ids, pe, x, ids)
  chunked, count = jax.jit(prefix.prefix_aggregate_chunked, static_argnums=3)(pe, x, ids, chunk)
  np.testing.assert_array_equal(count, dense_count)
  np.testing.assert_allclose(chunked, dense, rtol=1e-5, atol=1e-5 * float(jnp.abs(dense).max()))


def test_chunked_prefix_aggregation_excludes_the_own_block_across_chunks():
  from armd_jax.models import prefix
  ids = jnp.array([[0, 1, 1, 1, 1, 1, 2]])  # block 1 spans three chunks of 2
  x = jnp.arange(1.0, 8.0)[None, :, None]
  pe = jnp.ones((1, 7, 1))
  aggregate, count = prefix.prefix_aggregate_chunked(pe, x, ids, chunk=2)
  np.testing.assert_array_equal(count[0], [0, 1, 1, 1, 1, 1, 6])
  np.testing.assert_array_equal(aggregate[0, :, 0], [0, 1, 1, 1, 1, 1, 21])


def test_prefix_mean_is_exact_in_float32_above_256_tokens():
  from armd_jax.models import prefix
  mean = prefix.prefix_mean(jnp.full((1, 1, 2), 257.0), jnp.array([[257]]))
  assert mean.dtype == jnp.float32
  np.testing.assert_array_equal(mean, 1.0)  # a bfloat16 count would be 256


def test_bfloat16_model_with_chunked_prefix_matches_dense_prefix():
  tokens, ids = bfloat16_inputs()
  model, params = init_model(tiny_config(dtype="bfloat16"))
  chunked_model = model.clone(config=model.config.replace(**CHUNKED))  # the same parameters
  dense = compiled_apply(model, params, tokens, ids)
  chunked = compiled_apply(chunked_model, params, tokens, ids)
  np.testing.assert_allclose(chunked, dense, atol=0.1)


def test_auto_attention_resolves_by_backend_and_tile_sizes_are_validated():
  assert tiny_config(attention="auto").attention_implementation == (
      "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla")
  assert tiny_config(attention="pallas").prefix_implementation == "chunked"
  assert tiny_config(attention="xla").prefix_implementation == "dense"
  with pytest.raises(ValueError, match="pallas_block_kv=12 must be 0 .per platform. or a "
                     "positive multiple of 8"):
    tiny_config(pallas_block_q=16, pallas_block_kv=12)
  with pytest.raises(ValueError, match="prefix_aggregation"):
    tiny_config(prefix_aggregation="sparse")
