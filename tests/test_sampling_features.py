"""One-call prefill, stopping at EOS and confidence-ordered decoding: each exact, with
its calls counted (docs/method.md, section 4; docs/sampling.md)."""

import jax
import numpy as np
import pytest

from armd_jax import orders, sampling
from armd_jax.losses import token_log_probs
from armd_jax.sampling import SamplerConfig
from conftest import init_model, tiny_config

N = 12
B = 2


@pytest.fixture(scope="module")
def tiny():
  return init_model(tiny_config())


def one_pass(model, params, tokens, block_ids):
  """The one-pass model's log-probs [B, N] of tokens under block_ids."""
  return np.asarray(token_log_probs(model.apply(params, tokens, block_ids), tokens))


def test_a_prompt_is_read_in_one_call_and_scored_as_the_one_pass_model(tiny):
  model, params = tiny
  prompt = np.array([[3, 1, 4, 1], [5, 9, 2, 6]])
  out = sampling.generate(model, params, jax.random.PRNGKey(1), batch_size=B, length=N,
                          streams=4, prompt=prompt)
  assert out.num_calls == 1 + (N - 4) // 4 + 4 - 1  # one prefill call, then strided
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :4], prompt)  # never overwritten
  np.testing.assert_array_equal(out.block_ids[:, :4], [[1, 2, 3, 4]] * 2)  # read first
  want = one_pass(model, params, out.tokens, out.block_ids)
  np.testing.assert_allclose(out.log_probs, want, atol=1e-5, rtol=0)
  assert (np.asarray(out.log_probs)[:, :4] < 0).all()  # the prompt was scored, not skipped


def test_infill_rows_with_different_known_counts_prefill_in_one_call_like_recompute(tiny):
  model, params = tiny
  known = np.zeros((B, N), bool)
  known[0, [1, 5, 6, 10]] = True  # 4 known, 8 to generate
  known[1, [0, 11]] = True  # 2 known, 10 to generate
  infill = (np.full((B, N), 7), known)
  rng = jax.random.PRNGKey(3)
  cached = sampling.generate(model, params, rng, batch_size=B, length=N, infill=infill)
  reference = sampling.generate(model, params, rng, batch_size=B, length=N, infill=infill,
                                mode="recompute")
  assert cached.num_calls == reference.num_calls == 1 + 10  # prefill + the longest row
  np.testing.assert_array_equal(cached.tokens, reference.tokens)
  np.testing.assert_array_equal(np.asarray(cached.tokens)[known], 7)
  for b in range(B):  # the known positions are read first, everything else after them
    assert cached.block_ids[b, known[b]].max() < cached.block_ids[b, ~known[b]].min()
  np.testing.assert_allclose(cached.log_probs,
                             one_pass(model, params, cached.tokens, cached.block_ids),
                             atol=1e-5, rtol=0)


def test_prefill_of_the_leading_known_blocks_of_an_explicit_order(tiny):
  model, params = tiny
  ids = np.asarray(orders.progressive_permutation(jax.random.PRNGKey(2), B, N, N))
  known = ids <= 3  # the first three blocks are known: one prefill call reads them
  infill = (np.full((B, N), 2), known)
  out = sampling.generate(model, params, jax.random.PRNGKey(4), batch_size=B, length=N,
                          order=ids, infill=infill)
  assert out.num_calls == 1 + N - 3
  np.testing.assert_allclose(out.log_probs, one_pass(model, params, out.tokens, ids),
                             atol=1e-5, rtol=0)


def kept_text_alone(model, params, tokens, block_ids, keep):
  """One-pass log-probs [n] of row `tokens[keep]` with nothing else in the sequence: the
  kept tokens at their own positions and block ids, the dropped positions absent."""
  where = np.flatnonzero(keep)
  tokens, ids = np.asarray(tokens)[where][None], np.asarray(block_ids)[where][None]
  logits = model.apply(params, tokens, ids, where[None].astype(np.int32))
  return np.asarray(token_log_probs(logits, tokens))[0]


@pytest.mark.parametrize("order", ["strided", "random"])
def test_stop_at_eos_ends_each_row_at_its_first_eos_in_text_order(tiny, order):
  model, params = tiny
  kwargs = dict(batch_size=B, length=N)
  if order == "strided":
    kwargs["streams"] = 2
  else:
    kwargs["order"] = np.asarray(orders.progressive_permutation(jax.random.PRNGKey(9), B, N, N))
  rng = jax.random.PRNGKey(6)
  free = sampling.generate(model, params, rng, **kwargs)
  eos = int(np.asarray(free.tokens)[0, 4])  # row 0 meets this token at position <= 4
  out = sampling.generate(model, params, rng, stop_at_eos=True, eos_id=eos, pad_id=12, **kwargs)
  assert out.num_calls == free.num_calls + 1  # one call rescores the kept text
  drawn, tokens, valid = (np.asarray(x) for x in (out.drawn, out.tokens, out.valid))
  np.testing.assert_array_equal(drawn, free.tokens)  # decoding itself is unchanged
  log_probs = np.asarray(out.log_probs)
  for b in range(B):
    hits = np.flatnonzero(drawn[b] == eos)
    end = hits[0] if len(hits) else N - 1
    np.testing.assert_array_equal(valid[b], np.arange(N) <= end)
    np.testing.assert_array_equal(tokens[b, :end + 1], drawn[b, :end + 1])
    assert (tokens[b, end + 1:] == 12).all()
    np.testing.assert_allclose(
        log_probs[b, :end + 1],
        kept_text_alone(model, params, tokens[b], out.block_ids[b], valid[b]),
        atol=1e-5, rtol=0)
  assert not valid[0].all()
  assert (log_probs[~valid] == 0).all()


def test_stop_at_eos_log_probs_are_the_kept_texts_not_conditioned_on_dropped_tokens(tiny):
  # Right to left with a given EOS at position 5: positions 11..6 are drawn first and
  # then dropped, so every kept generated token was drawn conditioned on them.
  model, params = tiny
  ids = np.broadcast_to(N - np.arange(N), (B, N)).astype(np.int32)
  known = np.arange(N) == 5
  eos = 1
  infill = (np.where(known, eos, 0), known)
  out = sampling.generate(model, params, jax.random.PRNGKey(11), batch_size=B, length=N,
                          order=ids, infill=infill, stop_at_eos=True, eos_id=eos)
  tokens, valid, log_probs = (np.asarray(x) for x in (out.tokens, out.valid, out.log_probs))
  conditioned = one_pass(model, params, out.drawn, ids)  # the scores while drawing
  for b in range(B):
    alone = kept_text_alone(model, params, tokens[b], ids[b], valid[b])
    np.testing.assert_allclose(log_probs[b][valid[b]], alone, atol=1e-5, rtol=0)
    # The test can tell: the drawing scores differ, because the dropped tokens differ.
    assert np.abs(conditioned[b][valid[b]] - alone).max() > 1e-3
  assert (log_probs[~valid] == 0).all()


def test_stop_at_eos_keeps_given_infill_tokens_after_the_eos(tiny):
  model, params = tiny
  known = np.zeros(N, bool)
  known[[3, 8, 9]] = True  # an EOS at 3, then two given tokens after it
  given = np.zeros(N, np.int32)
  given[[3, 8, 9]] = [1, 7, 4]
  out = sampling.generate(model, params, jax.random.PRNGKey(12), batch_size=B, length=N,
                          infill=(given, known), stop_at_eos=True, eos_id=1, pad_id=12)
  tokens, drawn, valid = (np.asarray(x) for x in (out.tokens, out.drawn, out.valid))
  for b in range(B):
    end = np.flatnonzero(drawn[b] == 1)[0]  # <= 3: a drawn EOS may come first
    want_valid = (np.arange(N) <= end) | known
    np.testing.assert_array_equal(valid[b], want_valid)
    np.testing.assert_array_equal(tokens[b, [8, 9]], [7, 4])  # kept as given, not padding
    np.testing.assert_array_equal(tokens[b][~want_valid], 12)
    np.testing.assert_allclose(
        np.asarray(out.log_probs)[b][want_valid],
        kept_text_alone(model, params, tokens[b], out.block_ids[b], want_valid),
        atol=1e-5, rtol=0)


# (5, 0) and (5, 3): U % k != 0 generated positions (12 and 9 with k = 5), so the last
# block is partial (2 and 4 positions), with and without a prompt read by the prefill;
# (1, 0) and (5, 2): every block full. Each case also checks one confidence criterion.
@pytest.mark.parametrize("k,prompt_len,criterion", [
    (1, 0, "max_prob"), (5, 2, "margin"), (5, 0, "entropy"), (5, 3, "max_prob")])
def test_confidence_order_reveals_the_most_confident_first_is_exact_and_counts_every_probe(
    tiny, k, prompt_len, criterion):
  model, params = tiny
  prompt = np.array([[4, 8, 3], [1, 2, 7]])[:, :prompt_len] if prompt_len else None
  out = sampling.generate(model, params, jax.random.PRNGKey(5), batch_size=B, length=N,
                          order="confidence", k=k, criterion=criterion, prompt=prompt)
  steps = -(-(N - prompt_len) // k)
  assert out.num_calls == (prompt_len > 0) + 2 * steps - 1
  assert out.num_calls == sampling.confidence_calls(N, prompt_len, k)
  ids = np.asarray(out.block_ids)
  orders.check_block_ids(ids)
  last = (N - prompt_len) - k * (steps - 1)  # the rest: k unless U % k != 0
  for b in range(B):  # prompt singletons in text order, then blocks of k, then the rest
    sizes = np.bincount(ids[b])[1:]
    np.testing.assert_array_equal(sizes, [1] * prompt_len + [k] * (steps - 1) + [last])
    np.testing.assert_array_equal(ids[b, :prompt_len], np.arange(1, prompt_len + 1))
  if prompt_len:
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :prompt_len], prompt)
  np.testing.assert_allclose(out.log_probs, one_pass(model, params, out.tokens, ids),
                             atol=1e-5, rtol=0)
  # The first probe is the one-pass model with the prompt's singletons and every other
  # position in block P + 1 (their tokens do not matter to it): its k most confident
  # generated positions must form the realized block P + 1.
  probe_ids = np.broadcast_to(np.minimum(np.arange(1, N + 1), prompt_len + 1), (B, N))
  logits = model.apply(params, np.asarray(out.tokens), probe_ids)
  conf = np.asarray(sampling.confidence(logits, criterion))[:, prompt_len:]
  for b in range(B):
    np.testing.assert_array_equal(
        np.sort(prompt_len + np.argsort(-conf[b], kind="stable")[:k]),
        np.flatnonzero(ids[b] == prompt_len + 1))


def test_confidence_rejects_what_it_does_not_support(tiny):
  model, params = tiny
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="per_call"):
    sampling.generate(model, params, rng, batch_size=1, length=N, order="confidence", k=0)
  with pytest.raises(ValueError, match="prompt only"):
    sampling.generate(model, params, rng, batch_size=1, length=N, order="confidence", streams=2)
  with pytest.raises(ValueError, match="criterion"):
    sampling.generate(model, params, rng, batch_size=1, length=N, order="confidence",
                      criterion="luck")
  with pytest.raises(ValueError, match="eos_id"):
    sampling.generate(model, params, rng, batch_size=1, length=N, stop_at_eos=True)


def test_config_sample_noise_reaches_the_samples_the_trainer_prints(capsys):
  from armd_jax.data.vocab import ByteVocabulary
  from armd_jax.sampling.sampler import NOISES
  from armd_jax.train import defaults, loop, settings

  model, params = init_model(tiny_config(vocab_size=259))
  vocab = ByteVocabulary()
  printed = {}
  for noise in NOISES:
    config = defaults.base_config()
    config.sample.num_samples, config.sample.length, config.sample.noise = B, N, noise
    loop.print_samples(model, params, vocab, settings.settings_from(config))
    printed[noise] = capsys.readouterr().out
    # The sampler the trainer builds from config.sample (top_k 0 and top_p 1 are off), so
    # this reruns the decoder print_samples compiled.
    sampler = SamplerConfig(top_k=0, top_p=1.0, noise=noise)
    want = sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=B, length=N,
                             sampler=sampler)
    for row in np.asarray(want.tokens):
      assert f"\n{vocab.decode(row.tolist())}\n" in printed[noise]
  assert printed["precise"] != printed["fast"]  # the same key draws differently
  config.sample.noise = "float16"
  with pytest.raises(ValueError, match=r"config\.sample\.noise"):
    settings.settings_from(config)
