"""Properties of KV-cached ARMD decoding (docs/method.md), each stated as a sentence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from armd_jax import orders, sampling
from armd_jax.losses import token_log_probs
from armd_jax.sampling import SamplerConfig
from armd_jax.sampling import cache as cache_lib
from armd_jax.sampling import decoding as decode_lib
from conftest import init_model, tiny_config

N = 12
B = 2


@pytest.fixture(scope="module")
def tiny():
  """One model for the module, so tests share compiled decoders (batch B, length N)."""
  return init_model(tiny_config())


def make_order(name, batch, length):
  rng = jax.random.PRNGKey(7)
  if name == "left_to_right":
    return orders.left_to_right(batch, length)
  if name == "random":
    return orders.progressive_permutation(rng, batch, length, length)
  if name == "strided":
    return orders.strided(batch, length, 4)
  if name == "multi_token_blocks":
    return orders.masked_diffusion(rng, batch, length, num_steps=5)
  raise ValueError(name)


def one_phase_blocks(batch, length, width=3):
  """Multi-token blocks of uneven sizes at random positions whose plan is ONE phase: every
  call is `width` wide, but the rows' blocks are not aligned (row 0's sizes 3, ..., 3, 2, 1,
  row 1's 1, 2, 3, ..., 3), so cache rows start apart per row and narrow blocks pad their
  calls. One scan to compile, where `multi_token_blocks` compiles one per block width."""
  full = [width] * (length // width - 1)
  sizes = (full + [width - 1, 1], [1, width - 1] + full)
  rng = np.random.default_rng(7)
  rows = [rng.permutation(np.repeat(np.arange(1, len(s) + 1), s)) for s in sizes]
  return np.stack([rows[b % 2] for b in range(batch)]).astype(np.int32)


@pytest.mark.parametrize("order", ["left_to_right", "random", "strided", "multi_token_blocks"])
def test_cached_scores_equal_one_pass_log_probs(tiny, order):
  model, params = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, N), 0, model.config.vocab_size)
  ids = make_order(order, 2, N)
  want = token_log_probs(model.apply(params, tokens, ids), tokens)
  got = sampling.score(model, params, tokens, ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides", [
    dict(num_layers=3, num_two_stream_layers=3, query_init="prefix", tie_embeddings=False,
         num_kv_heads=2),  # grouped-query attention: 4 query heads, 2 key/value heads
    dict(num_layers=2, num_two_stream_layers=0),
])
def test_cached_scores_equal_one_pass_log_probs_for_other_architectures(overrides):
  """The caches hold the model's key/value heads only (2 of 4 with grouped queries)."""
  model, params = init_model(tiny_config(**overrides))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, N), 0, model.config.vocab_size)
  ids = one_phase_blocks(2, N)  # uneven multi-token blocks, one scan to compile
  want = token_log_probs(model.apply(params, tokens, ids), tokens)
  np.testing.assert_allclose(sampling.score(model, params, tokens, ids), want, atol=1e-5, rtol=0)
  state = jax.eval_shape(lambda: cache_lib.init_state(model.bind(params), tokens, 1))
  caches = state["content_k"] + state["content_v"] + state["upper_k"] + state["upper_v"]
  assert caches and {c.shape[1] for c in caches} == {model.config.kv_heads}


@pytest.mark.parametrize("attention", [
    pytest.param(dict(attention="auto"), id="auto"),
    pytest.param(dict(prefix_aggregation="chunked", prefix_chunk=4), id="xla-chunked-prefix"),
    pytest.param(dict(attention="pallas", pallas_interpret=True, pallas_block_q=8,
                      pallas_block_kv=8, prefix_chunk=4), id="pallas"),
])
def test_cached_scores_equal_one_pass_log_probs_with_every_attention(attention):
  model, params = init_model(tiny_config(**attention))
  tokens = jax.random.randint(jax.random.PRNGKey(4), (2, N), 0, model.config.vocab_size)
  ids = one_phase_blocks(2, N)  # uneven multi-token blocks, one scan to compile
  want = token_log_probs(model.apply(params, tokens, ids), tokens)
  np.testing.assert_allclose(sampling.score(model, params, tokens, ids), want, atol=1e-5, rtol=0)


def test_cached_scores_equal_one_pass_log_probs_at_shifted_positions(tiny):
  model, params = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, N), 0, model.config.vocab_size)
  ids = make_order("random", 2, N)
  positions = jnp.stack([jnp.arange(N) + 5, jnp.arange(N)[::-1] * 2])
  want = token_log_probs(model.apply(params, tokens, ids, positions), tokens)
  got = sampling.score(model, params, tokens, ids, positions)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_score_comparison_catches_an_upper_cache_that_hides_the_own_block(tiny, monkeypatch):
  # If the upper half never wrote a block's own rows before attending (so a target saw
  # only earlier blocks), the scores of multi-token blocks would differ.
  model, params = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, N), 0, model.config.vocab_size)
  ids = one_phase_blocks(2, N)  # blocks of 3, 2 and 1 tokens in one scan
  upper_rows = N + sampling.make_plan(np.asarray(ids)).max_width
  real = cache_lib.write_cache_rows
  monkeypatch.setattr(decode_lib, "_compiled", decode_lib._compiled.__wrapped__)

  def no_upper_write(cache, values, start, valid, uniform):
    return cache if cache.shape[2] == upper_rows else real(cache, values, start, valid, uniform)

  monkeypatch.setattr(cache_lib, "write_cache_rows", no_upper_write)
  want = token_log_probs(model.apply(params, tokens, ids), tokens)
  got = sampling.score(model, params, tokens, ids)
  assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-3


@pytest.mark.parametrize("streams,sampler", [
    (1, SamplerConfig()),
    # Full recompute compiles a whole-sequence call per step: the second case is slow.
    pytest.param(3, SamplerConfig(temperature=0.7, top_k=6, top_p=0.9),
                 marks=pytest.mark.slow),
])
def test_cached_sampler_draws_the_same_tokens_as_full_recompute(tiny, streams, sampler):
  model, params = tiny
  kwargs = dict(batch_size=B, length=N, streams=streams, sampler=sampler)
  rng = jax.random.PRNGKey(11)
  cached = sampling.generate(model, params, rng, **kwargs)
  reference = sampling.generate(model, params, rng, mode="recompute", **kwargs)
  np.testing.assert_array_equal(cached.tokens, reference.tokens)
  np.testing.assert_allclose(cached.log_probs, reference.log_probs, atol=1e-5)
  assert cached.num_calls == reference.num_calls


@pytest.mark.slow  # full recompute at every step
def test_cached_sampler_matches_full_recompute_in_a_multi_token_order_with_infill(tiny):
  model, params = tiny
  ids = one_phase_blocks(2, N)  # one scan per mode, rows not aligned
  known = np.zeros((2, N), bool)
  known[0, [1, 5]] = True
  infill = (np.full((2, N), 4), known)
  rng = jax.random.PRNGKey(5)
  cached = sampling.generate(model, params, rng, batch_size=2, length=N, order=ids, infill=infill)
  reference = sampling.generate(model, params, rng, batch_size=2, length=N, order=ids,
                                infill=infill, mode="recompute")
  np.testing.assert_array_equal(cached.tokens, reference.tokens)
  np.testing.assert_array_equal(np.asarray(cached.tokens)[known], 4)


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_strided_generation_makes_n_over_s_plus_s_minus_one_calls_and_fills_every_position(
    tiny, streams):
  model, params = tiny
  out = sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=B, length=N,
                          streams=streams)
  assert out.num_calls == N // streams + streams - 1
  np.testing.assert_array_equal(out.block_ids, orders.strided(B, N, streams))
  # A position never decoded keeps log-prob 0; every drawn token has probability < 1.
  assert (np.asarray(out.log_probs) < 0).all()
  assert out.tokens.shape == (B, N) and out.tokens.dtype == jnp.int32


def test_generation_is_a_deterministic_function_of_the_rng(tiny):
  model, params = tiny
  gen = lambda seed: np.asarray(sampling.generate(  # noqa: E731
      model, params, jax.random.PRNGKey(seed), batch_size=B, length=N, streams=2).tokens)
  np.testing.assert_array_equal(gen(0), gen(0))
  assert not np.array_equal(gen(0), gen(1))


def test_greedy_generation_takes_the_argmax_of_the_one_pass_model(tiny):
  model, params = tiny
  out = sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=B, length=N,
                          streams=4, sampler=SamplerConfig(greedy=True))
  logits = model.apply(params, out.tokens, out.block_ids)
  np.testing.assert_array_equal(out.tokens, jnp.argmax(logits, -1))


def test_repeated_generation_reuses_one_compiled_decoder(tiny):
  model, params = tiny
  for seed in range(3):
    sampling.generate(model, params, jax.random.PRNGKey(seed), batch_size=B, length=N, streams=2)
  # (width, calls, one scan over the whole cache) per phase; 0: no prefill; uniform
  structure = ((1, 2, ((2, None),)), (2, 5, ((5, None),)), 0, True)
  key = (model, SamplerConfig(), structure, B, N, "cached")
  assert decode_lib.TRACE_COUNTS[key] == 1


def test_plan_segments_cover_every_row_a_call_can_see_and_grow_with_the_calls():
  ids = np.asarray(orders.strided(2, 1024, 4))
  plan = sampling.make_plan(ids)
  heads, body = plan.segments  # S = 4: 4 stream heads (too few calls to split), 255 calls
  assert heads == ((4, None),)
  assert [end for end, _ in body] == [64, 128, 191, 255]
  visible = [rows for _, rows in body]
  assert visible[:-1] == sorted(visible[:-1]) and visible[0] < 1024 // 3
  phase, begin = plan.phases[1], 0
  for end, rows in body:  # every call's block ends within its segment's visible rows
    assert (phase.starts[begin:end] + phase.width).max() <= (rows or 1024 + plan.max_width)
    begin = end
  short = sampling.make_plan(np.asarray(orders.strided(2, 64, 1)))
  assert short.segments == (((64, None),),), "short caches keep one scan per phase"


def split_into_segments(monkeypatch, min_rows=8):
  """Plans split phases of >= 4 calls on caches of >= `min_rows` rows into 2 segments (each
  segment is one more scan to compile; 2 already cut the caches as 4 would)."""
  monkeypatch.setattr(sampling.plan, "SEGMENT_MIN_ROWS", min_rows)
  monkeypatch.setattr(sampling.plan, "SEGMENT_MIN_CALLS", 4)
  monkeypatch.setattr(sampling.plan, "SEGMENTS", 2)


@pytest.fixture
def segmented(monkeypatch):
  split_into_segments(monkeypatch)


@pytest.mark.parametrize("order", [
    "left_to_right",
    # Each order compiles its own segmented program: one runs in the quick tier.
    pytest.param("strided", marks=pytest.mark.slow),
    pytest.param("multi_token_blocks", marks=pytest.mark.slow)])
def test_segmented_decoding_reads_a_prefix_of_the_cache_and_scores_like_one_pass(
    tiny, segmented, monkeypatch, order):
  model, params = tiny
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 2 * N), 0, model.config.vocab_size)
  ids = make_order(order, 2, 2 * N)
  if order == "multi_token_blocks":  # enough blocks (of uneven sizes) to split
    ids = orders.masked_diffusion(jax.random.PRNGKey(7), 2, 2 * N, num_steps=16)
  plan = sampling.make_plan(np.asarray(ids))
  full_rows = 2 * N + plan.max_width
  assert any(rows is not None for phase in plan.segments for _, rows in phase)
  read_rows = []
  real_attend = cache_lib.attend_on_cache

  def recording_attend(layer, x, rope, q_ids, cache_k, cache_v, kv_ids):
    read_rows.append(kv_ids.shape[1])
    return real_attend(layer, x, rope, q_ids, cache_k, cache_v, kv_ids)

  monkeypatch.setattr(cache_lib, "attend_on_cache", recording_attend)
  want = token_log_probs(model.apply(params, tokens, ids), tokens)
  got = sampling.score(model, params, tokens, ids)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert min(read_rows) < full_rows, "some calls attend over only the rows they can see"


@pytest.mark.slow  # four lowerings of the whole decoder
def test_segments_are_lowered_for_cpu_only(tiny, monkeypatch):
  """Cutting the caches is measured on CPU only: a TPU lowering keeps one scan per phase."""
  model, params = tiny
  monkeypatch.setattr(decode_lib, "_compiled", decode_lib._compiled.__wrapped__)  # fresh traces
  ids = np.asarray(orders.left_to_right(2, 2 * N))
  zeros = np.zeros((2, 2 * N), np.int32)
  positions = np.broadcast_to(np.arange(2 * N, dtype=np.int32), (2, 2 * N))

  def loops(platform, split):
    split_into_segments(monkeypatch, min_rows=8 if split else 10**9)
    run, inputs, plan = decode_lib.decode_program(model, zeros, zeros.astype(bool), ids,
                                                  positions)
    assert (len(plan.segments[0]) > 1) == split
    lowered = run.trace(params, jax.random.PRNGKey(0), *inputs).lower(
        lowering_platforms=(platform,))
    return lowered.as_text().count("stablehlo.while")

  assert loops("cpu", split=True) == loops("cpu", split=False) + 1  # 2 scans instead of 1
  assert loops("tpu", split=True) == loops("tpu", split=False)


@pytest.mark.slow  # two decoders of length 2N compiled
def test_segmented_generation_draws_the_same_tokens_as_one_scan(tiny, monkeypatch):
  model, params = tiny
  kwargs = dict(batch_size=B, length=2 * N, streams=2)
  one_scan = sampling.generate(model, params, jax.random.PRNGKey(4), **kwargs)
  split_into_segments(monkeypatch)
  segmented = sampling.generate(model, params, jax.random.PRNGKey(4), **kwargs)
  np.testing.assert_array_equal(segmented.tokens, one_scan.tokens)
  np.testing.assert_allclose(segmented.log_probs, one_scan.log_probs, atol=1e-6, rtol=0)
  assert segmented.num_calls == one_scan.num_calls == 2 * N // 2 + 1


def test_decoder_trace_guard_fires_on_a_second_trace():
  key = ("fake",)
  decode_lib.TRACE_COUNTS[key] = 0
  decode_lib.count_trace(key)
  with pytest.raises(AssertionError, match="traced again"):
    decode_lib.count_trace(key)


# -- sampling controls ----------------------------------------------------------------------


def test_draws_follow_the_softmax_distribution_in_float32():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  draws = sampling.sample_logits(jax.random.PRNGKey(0), jnp.broadcast_to(logits, (20000, 4)),
                                 SamplerConfig())
  freq = np.bincount(np.asarray(draws), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_temperature_sharpens_the_distribution():
  logits = jnp.broadcast_to(jnp.log(jnp.array([0.6, 0.4])), (20000, 2))
  draws = sampling.sample_logits(jax.random.PRNGKey(1), logits, SamplerConfig(temperature=0.5))
  # p ~ 0.6^2 : 0.4^2 = 0.692 : 0.308
  assert abs(float(np.mean(np.asarray(draws) == 0)) - 0.692) < 0.015


def test_top_k_draws_only_among_the_k_most_likely_tokens():
  logits = jax.random.normal(jax.random.PRNGKey(2), (500, 10))
  draws = sampling.sample_logits(jax.random.PRNGKey(3), logits, SamplerConfig(top_k=3))
  top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
  assert all(d in row for d, row in zip(np.asarray(draws), top3))


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.asarray(sampling.filter_logits(logits, SamplerConfig(top_p=0.75)))[0] > -1e29
  np.testing.assert_array_equal(kept, [True, True, False, False])
  kept = np.asarray(sampling.filter_logits(logits, SamplerConfig(top_p=0.1)))[0] > -1e29
  np.testing.assert_array_equal(kept, [True, False, False, False])


def test_greedy_sampling_is_the_argmax():
  logits = jax.random.normal(jax.random.PRNGKey(4), (50, 7))
  draws = sampling.sample_logits(jax.random.PRNGKey(5), logits, SamplerConfig(greedy=True))
  np.testing.assert_array_equal(draws, jnp.argmax(logits, -1))


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,match", [
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampler_fields_are_rejected_by_name(fields, match):
  with pytest.raises(ValueError, match=match):
    SamplerConfig(**fields)


def test_bad_generation_requests_give_clear_errors(tiny):
  model, params = tiny
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="max_len"):
    sampling.generate(model, params, rng, batch_size=1, length=model.config.max_len + 1)
  with pytest.raises(ValueError, match="streams=5 must divide"):
    sampling.generate(model, params, rng, batch_size=1, length=N, streams=5)
  with pytest.raises(ValueError, match="either prompt or infill"):
    sampling.generate(model, params, rng, batch_size=1, length=N, prompt=[1],
                      infill=(np.zeros(N), np.zeros(N, bool)))
  with pytest.raises(ValueError, match="more than length"):
    sampling.generate(model, params, rng, batch_size=1, length=4, prompt=[1] * 5)
  with pytest.raises(ValueError, match="vocab_size"):
    sampling.generate(model, params, rng, batch_size=1, length=N, prompt=[99])
  with pytest.raises(ValueError, match="dense"):
    sampling.score(model, params, np.zeros((1, 4), int), np.array([[1, 3, 3, 4]]))


def test_the_cpu_only_attention_split_is_lowered_for_cpu_only(tiny, monkeypatch):
  """A TPU lowering of the decode built on this CPU host holds no one-query split of the
  attention (XLA:CPU's fast form); the CPU lowering of the same program still does."""
  model, params = tiny
  monkeypatch.setattr(decode_lib, "_compiled", decode_lib._compiled.__wrapped__)  # fresh traces
  known = np.zeros((2, 2 * N), bool)
  ids = sampling.plan.conditional_strided_order(known, 4)  # calls of 4 queries
  positions = np.broadcast_to(np.arange(2 * N, dtype=np.int32), known.shape)
  run, inputs, _ = decode_lib.decode_program(model, np.zeros(known.shape, np.int32), known,
                                             ids, positions)
  traced = run.trace(params, jax.random.PRNGKey(0), *inputs)

  def split_ops(platform):
    text = traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)
    return text.count(cache_lib.CPU_SPLIT_SCOPE)

  assert split_ops("cpu") > 0
  assert split_ops("tpu") == 0
