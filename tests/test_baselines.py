"""The AR and MDLM baselines: exact cross-checks against ARMD and enumerable bounds."""

import functools
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax import orders
from armd_jax.losses import token_log_probs
from armd_jax.models import mdlm as mdlm_lib
from armd_jax.sampling import SamplerConfig
from armd_jax.sampling import ar as ar_sampling
from armd_jax.sampling import mdlm as mdlm_sampling
from armd_jax.sampling import plan as plan_lib
from conftest import init_model, tiny_config


def init_kind(config, length=8, seed=0):
  """(model, unboxed params) of any kind."""
  model = armd_jax.build_model(config)
  tokens = jnp.zeros((1, length), jnp.int32)
  args = (tokens, orders.left_to_right(1, length)) if config.kind == "armd" else (tokens,)
  return model, nn.meta.unbox(model.init(jax.random.PRNGKey(seed), *args))


def all_sequences(vocab, length):
  return jnp.asarray(list(itertools.product(range(vocab), repeat=length)), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def compiled_apply(model, params, tokens, block_ids=None):
  """`model.apply` as one compiled program per model and shapes (op by op, every new model
  or shape compiles each operation on its own, several times the cost); ARMD's block ids
  are traced, so orders of one shape share the program."""
  if model.config.kind == "armd":
    block_ids = orders.left_to_right(*tokens.shape) if block_ids is None else block_ids
    return model.apply(params, tokens, block_ids)
  return model.apply(params, tokens)


def log_likelihood(model, params, tokens, block_ids=None):
  """Per-sequence log p(x) [B] from one pass."""
  return token_log_probs(compiled_apply(model, params, tokens, block_ids), tokens).sum(-1)


# -- AR vs ARMD --------------------------------------------------------------------------


def standardise(rows):
  rows = np.asarray(rows, np.float64)
  rows = rows - rows.mean(-1, keepdims=True)
  return jnp.asarray(rows / rows.std(-1, keepdims=True), jnp.float32)


def armd_equal_to_ar(seed=0, scramble_pe=False):
  """An ARMD and an AR checkpoint that compute the same function (see the test)."""
  fields = dict(num_two_stream_layers=0, query_init="prefix", layer_norm_epsilon=1e-12)
  armd_cfg = tiny_config(**fields)
  armd_cfg = armd_cfg.replace(d_pe=armd_cfg.max_len + 2)
  armd, params = init_model(armd_cfg, seed=seed)
  p = dict(params["params"])
  eye = np.eye(armd_cfg.d_pe, dtype=np.float32)
  # <PE[n], PE[i]> = 1 iff i = n - 1 (BOS for n = 0), else 0 among visible i < n.
  pe = eye[1:armd_cfg.max_len + 1] + eye[2:armd_cfg.max_len + 2]
  if scramble_pe:
    pe = np.random.default_rng(seed).permutation(pe)
  p["pe"], p["bos_pe"] = jnp.asarray(pe), jnp.asarray(eye[0] + eye[1])
  # Rows with mean 0 / variance 1 pass the query LayerNorm (scale 1, bias 0) unchanged.
  p["embedding"] = {"embedding": standardise(p["embedding"]["embedding"])}
  p["bos_embedding"] = standardise(p["bos_embedding"][None])[0]
  ar = armd_jax.build_model(armd_cfg.replace(kind="ar"))
  ar_params = {"params": {k: p[k] for k in {"embedding", "bos_embedding", "final_norm"}
                          | {f"layer_{i}" for i in range(armd_cfg.num_layers)}}}
  return (armd, {"params": p}), (ar, ar_params)


@pytest.mark.parametrize("seed", [0, 1])
def test_ar_and_armd_left_to_right_give_identical_log_likelihoods_on_a_matched_checkpoint(seed):
  # With no two-stream layers ARMD's layers all run causally on the query stream, whose
  # start G0[n] is LN(mean of <PE_n, PE_i> X0_i over i < n). With PE rows chosen so that
  # the weights are one-hot on i = n - 1 (BOS for n = 0) and standardised embeddings,
  # G0[n] = X0[n - 1]: the AR input stream [BOS, x_0 .. x_{N-2}]; the same layers then
  # make them the same function (RoPE sees only relative positions).
  (armd, armd_params), (ar, ar_params) = armd_equal_to_ar(seed)
  tokens = jax.random.randint(jax.random.PRNGKey(seed + 10), (4, 12), 0, 13)
  ar_lp = token_log_probs(compiled_apply(ar, ar_params, tokens), tokens)
  armd_lp = token_log_probs(compiled_apply(armd, armd_params, tokens), tokens)
  np.testing.assert_allclose(armd_lp, ar_lp, atol=2e-5)
  assert float(jnp.std(ar_lp)) > 0.05, "the check needs a non-trivial model"


def test_the_matched_checkpoint_check_fails_when_the_position_table_is_scrambled():
  (armd, armd_params), (ar, ar_params) = armd_equal_to_ar(0, scramble_pe=True)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 12), 0, 13)
  ar_lp = token_log_probs(compiled_apply(ar, ar_params, tokens), tokens)
  armd_lp = token_log_probs(compiled_apply(armd, armd_params, tokens), tokens)
  assert float(jnp.max(jnp.abs(armd_lp - ar_lp))) > 1e-2


@pytest.mark.parametrize("kind", ["ar", "armd"])
def test_one_pass_log_likelihood_equals_the_chain_rule_of_prefix_calls(kind):
  model, params = init_kind(tiny_config(kind=kind))
  # 4 positions (first, middle, last): every prefix length is its own compiled program.
  length = 4
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, length), 0, 13)
  one_pass = log_likelihood(model, params, tokens)
  # Call n only ever receives tokens[:n+1]: log p(x_n | x_<n) computed with no later token.
  step_by_step = sum(
      token_log_probs(compiled_apply(model, params, tokens[:, :n + 1]),
                      tokens[:, :n + 1])[:, n]
      for n in range(length))
  np.testing.assert_allclose(one_pass, step_by_step, atol=1e-5)


@pytest.mark.parametrize("kind,streams", [("ar", 1), ("armd", 1), ("armd", 2)])
def test_exact_likelihoods_sum_to_one_over_every_sequence(kind, streams):
  model, params = init_kind(tiny_config(kind=kind, vocab_size=3))
  seqs = all_sequences(3, 4)  # 81 sequences
  ids = orders.strided(len(seqs), 4, streams)
  total = float(jnp.exp(log_likelihood(model, params, seqs, ids)).sum())
  assert abs(total - 1.0) < 1e-4, total


def test_ar_greedy_kv_cached_decoding_matches_the_one_pass_argmax():
  # The shapes of the restacking test below and of the cached-decoding tests' one pass
  # (3 x 32): the decoder and the forward are each compiled once for all of them.
  model, params = init_kind(tiny_config(kind="ar"))
  out = ar_sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=3, length=32,
                             prompt=jnp.array([[1, 2], [3, 4], [5, 6]]),
                             sampler=SamplerConfig(greedy=True))
  argmax = jnp.argmax(compiled_apply(model, params, out.tokens), -1)
  np.testing.assert_array_equal(out.tokens[:, 2:], argmax[:, 2:])
  np.testing.assert_array_equal(out.tokens[:, :2], [[1, 2], [3, 4], [5, 6]])
  assert int(out.num_calls) == 32


@pytest.mark.parametrize("prompt_len,segments,kv_heads", [(0, False, 2), (5, False, None),
                                                           (5, True, None)])
def test_cached_ar_decoding_equals_the_one_pass_logits(prompt_len, segments, kv_heads,
                                                       monkeypatch):
  # Call j of the cached decoder sees only rows 0..j of the shared ARMD caches, so its
  # logits must be the one-pass causal logits of the sequence it produced, forced prompt
  # positions included; with segments the calls attend over a prefix of the caches only;
  # kv_heads=2: grouped-query attention (4 query heads on 2 cached key/value heads).
  if segments:
    monkeypatch.setattr(plan_lib, "SEGMENT_MIN_ROWS", 8)
    monkeypatch.setattr(plan_lib, "SEGMENT_MIN_CALLS", 4)
  model, params = init_kind(tiny_config(kind="ar", num_kv_heads=kv_heads))
  batch, length = 3, 32
  ids = np.broadcast_to(np.arange(1, length + 1), (batch, length))
  assert any(rows for phase in plan_lib.make_plan(ids).segments for _, rows in phase) == segments
  forced = jax.random.randint(jax.random.PRNGKey(2), (batch, length), 0, 13)
  is_forced = jnp.arange(length)[None, :].repeat(batch, 0) < prompt_len
  tokens, logits = ar_sampling.decode(model, params, jax.random.PRNGKey(3), forced, is_forced,
                                      SamplerConfig(), keep_logits=True)
  np.testing.assert_array_equal(tokens[:, :prompt_len], forced[:, :prompt_len])
  assert len(np.unique(np.asarray(tokens))) > 5, "drawn tokens, not a constant chain"
  np.testing.assert_allclose(logits, compiled_apply(model, params, tokens), atol=1e-5, rtol=0)


def test_ar_greedy_samples_are_the_ones_the_per_step_restacking_sampler_drew():
  # Tokens of the sampler that restacked a separate K/V layout every step (before the AR
  # decoder ran on ARMD's cache code), for this checkpoint, prompt and seed.
  model, params = init_kind(tiny_config(kind="ar"))
  out = ar_sampling.generate(model, params, jax.random.PRNGKey(4), batch_size=3, length=32,
                             prompt=jnp.array([[1, 2], [3, 4], [5, 6]]),
                             sampler=SamplerConfig(greedy=True))
  np.testing.assert_array_equal(out.tokens, [
      [1, 2, 7, 4, 11, 4, 11, 11, 3, 4, 1, 4, 4, 4, 3, 4, 1, 4, 4, 4, 4, 11, 11, 11, 11, 3, 3,
       3, 3, 4, 3, 3],
      [3, 4, 11] + [3] * 29,
      [5, 6] + [5] * 30])


def test_build_model_names_each_kind_and_rejects_unknown_ones():
  for kind, cls in (("armd", armd_jax.ARMD), ("ar", armd_jax.models.AR),
                    ("mdlm", armd_jax.models.MDLM)):
    assert isinstance(armd_jax.build_model(tiny_config(kind=kind)), cls)
  with pytest.raises(ValueError, match="ModelConfig.kind"):
    tiny_config(kind="gpt")


# -- MDLM ---------------------------------------------------------------------------------

V, N = 3, 3


def sharp_mdlm(seed=0):
  """A tiny MDLM whose conditionals are far from uniform (scaled output head); two layers
  (the sampler test runs it 100 times on 4000 rows: its cost is the network's run time)."""
  model, params = init_kind(tiny_config(kind="mdlm", vocab_size=V, tie_embeddings=False,
                                        num_layers=2), length=N, seed=seed)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 40.0 if "head" in jax.tree_util.keystr(path) else x, params)
  return model, params


def revealed_log_probs(model, params):
  """log p(x_n | x revealed on subset S, [MASK] elsewhere): [X, 2^N, N] for all x, S."""
  seqs = np.asarray(all_sequences(V, N))
  subsets = np.array([[(s >> n) & 1 for n in range(N)] for s in range(2 ** N)], bool)
  z = np.where(subsets[None], seqs[:, None], V)  # [X, S, N]
  logits = compiled_apply(model, params, jnp.asarray(z.reshape(-1, N)))
  lp = token_log_probs(logits, jnp.asarray(np.repeat(seqs, len(subsets), 0)))
  return seqs, subsets, np.asarray(lp, np.float64).reshape(len(seqs), len(subsets), N)


def subset_index(members):
  return sum(1 << n for n in members)


def exact_sampler_nll(lp):
  """-log p(x) of the continuous-time ancestral sampler: uniform random reveal order."""
  orders_ = list(itertools.permutations(range(N)))
  per_order = np.stack([sum(lp[:, subset_index(o[:k]), o[k]] for k in range(N))
                        for o in orders_])  # [N!, X]
  return -(np.logaddexp.reduce(per_order, axis=0) - math.log(len(orders_))), per_order


def exact_elbo(lp):
  """Continuous-time NELBO, linear schedule, integrated exactly over t and mask sets.

  Given t each token is masked w.p. t, so NELBO = sum_M int t^{|M|-1} (1-t)^{N-|M|} dt
  sum_{n in M} -log p(x_n | x outside M), and the integral is (|M|-1)! (N-|M|)! / N!.
  """
  total = np.zeros(lp.shape[0])
  for masked in range(1, 2 ** N):
    members = [n for n in range(N) if (masked >> n) & 1]
    k = len(members)
    weight = math.factorial(k - 1) * math.factorial(N - k) / math.factorial(N)
    revealed = (2 ** N - 1) ^ masked
    total += weight * sum(-lp[:, revealed, n] for n in members)
  return total


@pytest.mark.parametrize("seed", [0, 1])
def test_mdlm_elbo_is_at_least_the_exact_nll_of_its_ancestral_sampler(seed):
  model, params = sharp_mdlm(seed)
  _, _, lp = revealed_log_probs(model, params)
  nll, per_order = exact_sampler_nll(lp)
  elbo = exact_elbo(lp)
  np.testing.assert_allclose(np.exp(-nll).sum(), 1.0, atol=1e-5)  # a normalised distribution
  assert np.all(elbo >= nll - 1e-9)
  assert np.exp(-elbo).sum() < 1.0
  # The continuous-time ELBO is the any-order AR loss: the mean over orders of -log p.
  np.testing.assert_allclose(elbo, -per_order.mean(0), rtol=1e-9)
  assert np.max(elbo - nll) > 1e-3, "a sharp model has a strict gap somewhere"


def test_monte_carlo_diffusion_loss_is_unbiased_for_the_exact_elbo():
  model, params = sharp_mdlm(0)
  seqs, _, lp = revealed_log_probs(model, params)
  x = 5
  tokens = jnp.tile(jnp.asarray(seqs[x])[None], (4096, 1))

  @jax.jit  # one program for the four draws
  def draw(params, i):
    t = mdlm_lib.stratified_times(jax.random.PRNGKey(2 * i), 4096)
    noisy, masked = mdlm_lib.corrupt(jax.random.PRNGKey(2 * i + 1), tokens, t, model.config)
    return mdlm_lib.elbo_terms(model.apply(params, noisy), tokens, masked, t)

  draws = np.concatenate([np.asarray(draw(params, i)) for i in range(4)])
  stderr = draws.std() / math.sqrt(len(draws))
  assert abs(draws.mean() - exact_elbo(lp)[x]) < 5 * stderr + 1e-3, (
      draws.mean(), exact_elbo(lp)[x], stderr)


@pytest.mark.slow
def test_mdlm_ancestral_sampler_draws_from_its_exact_distribution():
  model, params = sharp_mdlm(0)
  seqs, _, lp = revealed_log_probs(model, params)
  nll, per_order = exact_sampler_nll(lp)
  exact = np.exp(-nll)
  left_to_right = np.exp(per_order[0])  # what a fixed-order sampler would draw
  assert 0.5 * np.abs(left_to_right - exact).sum() > 0.1, "the check must tell orders apart"
  out = mdlm_sampling.generate(model, params, jax.random.PRNGKey(7), batch_size=4000,
                               length=N, num_steps=100)
  index = np.asarray(out.tokens) @ (V ** np.arange(N - 1, -1, -1))
  empirical = np.bincount(index, minlength=len(seqs)) / 4000
  # 4000 draws over 27 outcomes: expected total variation ~0.025 from sampling noise;
  # T = 100 steps reveal two of the 3 tokens together with probability ~3%, which moves
  # the distribution by less than that. A wrong sampler (e.g. a fixed left-to-right
  # reveal order) is off by > 0.1 on this sharp model.
  assert 0.5 * np.abs(empirical - exact).sum() < 0.06


def test_skipping_the_network_changes_the_cost_and_never_the_samples():
  model, params = sharp_mdlm(1)
  kwargs = dict(batch_size=4, length=N, num_steps=64)
  cached = mdlm_sampling.generate(model, params, jax.random.PRNGKey(3), **kwargs)
  full = mdlm_sampling.generate(model, params, jax.random.PRNGKey(3), use_cache=False, **kwargs)
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  assert int(full.num_calls) == 64
  assert int(cached.num_calls) < 64
  assert np.all(np.asarray(cached.num_calls_per_row) <= N + 1)  # one call per change + start


def test_mdlm_reads_a_mask_token_but_never_predicts_it():
  model, params = init_kind(tiny_config(kind="mdlm"))
  assert params["params"]["embedding"]["embedding"].shape[0] == 13 + 1
  logits = compiled_apply(model, params, jnp.full((2, 6), mdlm_lib.mask_id(model.config)))
  assert logits.shape == (2, 6, 13)
  out = mdlm_sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=2, length=6,
                               num_steps=3, prompt=jnp.array([4, 5]))
  assert int(out.tokens.max()) < 13
  np.testing.assert_array_equal(out.tokens[:, :2], [[4, 5], [4, 5]])


def test_mdlm_infill_keeps_known_tokens_and_fills_the_rest():
  model, params = init_kind(tiny_config(kind="mdlm"))
  known = jnp.array([[1, 0, 1, 0, 0, 1]] * 2, bool)
  tokens = jnp.array([[7, 0, 8, 0, 0, 9]] * 2)
  out = mdlm_sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=2, length=6,
                               num_steps=4, infill=(tokens, known))
  np.testing.assert_array_equal(np.asarray(out.tokens)[np.asarray(known)], [7, 8, 9] * 2)
  with pytest.raises(ValueError, match="infill"):
    mdlm_sampling.generate(model, params, jax.random.PRNGKey(0), batch_size=2, length=5,
                           num_steps=4, infill=(tokens, known))
