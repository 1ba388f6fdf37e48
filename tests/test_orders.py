"""Every order generator returns a valid block assignment of the stated shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from armd_jax import orders

B, N = 3, 24


def assert_valid(ids, batch=B, length=N):
  assert ids.shape == (batch, length) and ids.dtype == jnp.int32
  orders.check_block_ids(ids)


def test_left_to_right_is_one_token_per_block_in_text_order():
  ids = orders.left_to_right(B, N)
  assert_valid(ids)
  np.testing.assert_array_equal(ids[1], np.arange(1, N + 1))


@pytest.mark.parametrize("k", [0, 1, 2, 7, N])
def test_progressive_permutation_moves_at_most_k_tokens_and_stays_a_permutation(k):
  ids = orders.progressive_permutation(jax.random.PRNGKey(k), B, N, k)
  assert_valid(ids)
  for row in np.asarray(ids):
    np.testing.assert_array_equal(np.sort(row), np.arange(1, N + 1))
    assert (row != np.arange(1, N + 1)).sum() <= k


def test_progressive_permutation_with_all_tokens_shuffled_is_a_uniform_random_order():
  ids = jax.jit(orders.progressive_permutation, static_argnums=(1, 2))(
      jax.random.PRNGKey(0), 4000, 3, 3)
  counts = np.unique(np.asarray(ids), axis=0, return_counts=True)[1]
  assert len(counts) == 6 and counts.min() > 4000 / 6 * 0.85


def test_progressive_permutation_accepts_a_traced_k_inside_jit():
  fn = jax.jit(lambda rng, k: orders.progressive_permutation(rng, B, N, k))
  ids = fn(jax.random.PRNGKey(1), jnp.int32(5))
  assert_valid(ids)
  assert int((np.asarray(ids) != np.arange(1, N + 1)).sum()) > 0


def test_num_shuffled_is_zero_before_i_ar_then_ramps_linearly_to_rho():
  k = lambda s: int(orders.num_shuffled_schedule(s, i_ar=100, i_perm=200, rho=11))  # noqa: E731
  assert [k(0), k(99), k(100), k(150), k(200), k(10_000)] == [0, 0, 1, 6, 11, 11]
  with pytest.raises(ValueError, match="i_ar <= i_perm"):
    orders.num_shuffled_schedule(0, 10, 5, 4)


@pytest.mark.parametrize("streams", [1, 2, 4, 8])
def test_strided_puts_heads_first_then_tokens_n_over_s_apart(streams):
  ids = np.asarray(orders.strided(B, N, streams))
  assert_valid(jnp.asarray(ids))
  stride = N // streams
  row = ids[0]
  assert row.max() == N // streams + streams - 1
  for s in range(streams):
    assert row[s * stride] == s + 1  # heads one per block, in stream order
  for block in range(streams + 1, row.max() + 1):
    members = np.flatnonzero(row == block)
    assert len(members) == streams and np.all(np.diff(members) == stride)


def test_strided_rejects_a_length_not_divisible_by_streams():
  with pytest.raises(ValueError, match="not divisible"):
    orders.strided(1, 10, 4)


def test_strided_ids_take_any_length_and_are_the_strided_order_when_streams_divide():
  np.testing.assert_array_equal(orders.strided_ids(12, 4),
                                np.asarray(orders.strided(1, 12, 4))[0])
  # Streams of ceil(5 / 4) = 2: heads 0, 2, 4 one per block, then 1 and 3 together.
  np.testing.assert_array_equal(orders.strided_ids(5, 4), [1, 4, 2, 4, 3])
  np.testing.assert_array_equal(orders.strided_ids(3, 1), [1, 2, 3])
  np.testing.assert_array_equal(orders.strided_ids(2, 8), [1, 2])  # more streams than tokens
  for length in range(1, 20):
    ids = orders.strided_ids(length, 3)
    orders.check_block_ids(ids[None])  # dense from 1
    assert ids.dtype == np.int32 and np.bincount(ids).max() <= 3  # <= S tokens per block


def test_conditional_strided_reads_the_known_positions_first_then_strides_the_others():
  known = np.array([[1, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], bool)
  ids = orders.conditional_strided(known, 2)
  # Row 0: known positions 0 and 3 are blocks 1, 2; the 5 others are strided_ids(5, 2) + 2.
  np.testing.assert_array_equal(ids[0], [1, 3, 5, 2, 6, 4, 5])
  np.testing.assert_array_equal(ids[1], orders.strided_ids(7, 2))
  orders.check_block_ids(ids)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_masked_diffusion_gives_dense_multi_token_blocks_at_most_t(schedule):
  ids = orders.masked_diffusion(jax.random.PRNGKey(2), B, N, num_steps=5, schedule=schedule)
  assert_valid(ids)
  assert int(ids.max()) <= 5 and len(np.unique(ids[0])) < N


def test_masked_diffusion_with_many_steps_tends_to_singleton_blocks():
  ids = orders.masked_diffusion(jax.random.PRNGKey(3), 1, 16, num_steps=100_000)
  np.testing.assert_array_equal(np.sort(np.asarray(ids[0])), np.arange(1, 17))


def test_cosine_schedule_reveals_more_tokens_early_than_linear():
  # alpha_cos(t) >= alpha_lin(t): tokens are masked later, so revealed earlier.
  lin = orders.masking_times(jax.random.PRNGKey(0), (20000,), "linear")
  cos = orders.masking_times(jax.random.PRNGKey(0), (20000,), "cosine")
  assert float(cos.mean()) > float(lin.mean()) + 0.05
  np.testing.assert_allclose(float((lin > 0.5).mean()), 0.5, atol=0.02)
  np.testing.assert_allclose(float((cos > 0.5).mean()), np.cos(np.pi / 4), atol=0.02)


def test_bad_arguments_are_rejected_clearly():
  with pytest.raises(ValueError, match="schedule"):
    orders.masked_diffusion(jax.random.PRNGKey(0), 1, 4, 2, schedule="square")
  with pytest.raises(ValueError, match="num_steps"):
    orders.masked_diffusion(jax.random.PRNGKey(0), 1, 4, 0)
  with pytest.raises(ValueError, match="streams"):
    orders.strided(1, 4, 0)
  with pytest.raises(ValueError, match="positive"):
    orders.left_to_right(0, 4)


def test_dense_block_ids_keeps_order_and_ties():
  ids = orders.dense_block_ids(jnp.array([[7, 3, 7, 10, 3]]))
  np.testing.assert_array_equal(ids, [[2, 1, 2, 3, 1]])


def test_check_block_ids_rejects_gaps():
  with pytest.raises(ValueError, match="not dense"):
    orders.check_block_ids(np.array([[1, 3, 3]]))


def test_padding_last_puts_padding_after_every_real_token():
  ids = orders.padding_last(jnp.array([[3, 1, 2, 4]]), jnp.array([[1, 1, 1, 0]]))
  np.testing.assert_array_equal(ids, [[3, 1, 2, 4]])
  ids = orders.padding_last(jnp.array([[4, 1, 2, 3]]), jnp.array([[0, 1, 1, 0]]))
  np.testing.assert_array_equal(ids, [[3, 1, 2, 3]])


def _order_settings(**kw):
  from armd_jax.train.settings import OrderConfig  # pylint: disable=import-outside-toplevel
  return OrderConfig(**{"kind": "progressive_permutation", "i_ar": 0, "i_perm": 1, "rho": 4,
                        "streams": (2, 4), **kw})


def test_a_zero_mix_share_draws_exactly_what_the_main_order_draws():
  rng, step = jax.random.PRNGKey(3), jnp.asarray(5, jnp.int32)
  plain = orders.get_order("progressive_permutation").draw(_order_settings(), rng, step, 8, 16)
  mixed = orders.draw_block_ids(_order_settings(mix_share=0.0), rng, step, 8, 16)
  np.testing.assert_array_equal(plain[0], mixed[0])


def test_a_mixed_batch_has_rows_of_both_orders_in_about_the_share_asked():
  settings = _order_settings(mix_share=0.25)
  ids, metrics = jax.jit(lambda r: orders.draw_block_ids(settings, r, jnp.asarray(5), 512, 16))(
      jax.random.PRNGKey(0))
  ids = np.asarray(ids)
  strided = [any(np.array_equal(row, orders.strided(1, 16, s)[0]) for s in (2, 4))
             for row in ids]
  share = sum(strided) / len(ids)
  assert 0.18 < share < 0.32, share  # 128 of 512 expected; binomial sd 0.019
  assert abs(float(metrics["order/mix_rows"]) - share) < 1e-6
  for row, is_strided in zip(ids, strided):  # the others: progressive permutations
    assert is_strided or sorted(row.tolist()) == list(range(1, 17))


def test_a_full_random_mix_draws_permutations_far_from_left_to_right():
  settings = _order_settings(mix_kind="random", mix_share=1.0)
  ids, _ = orders.draw_block_ids(settings, jax.random.PRNGKey(1), jnp.asarray(0), 64, 32)
  ids = np.asarray(ids)
  assert all(sorted(r.tolist()) == list(range(1, 33)) for r in ids)
  moved = (ids != np.arange(1, 33)).sum(axis=1)
  assert moved.mean() > 25  # uniform orders move all but about one of 32 tokens


def test_bad_mix_settings_are_rejected_naming_the_field():
  with pytest.raises(ValueError, match="mix_share"):
    _order_settings(mix_share=1.5)
  with pytest.raises(ValueError, match="mix_kind"):
    _order_settings(mix_kind="masked_diffusion", mix_share=0.1)
  with pytest.raises(ValueError, match="streams"):
    _order_settings(mix_share=0.1, streams=(3,)).check_length(16)
