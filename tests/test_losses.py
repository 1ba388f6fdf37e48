"""The objective: per-token cross-entropy given earlier blocks, weights and padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from armd_jax import losses, orders


def test_cross_entropy_matches_a_hand_computed_value_and_counts_tokens():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
  tokens = jnp.array([[0, 1, 1]])
  loss, m = losses.cross_entropy(logits, tokens, orders.left_to_right(1, 3))
  expected = -(np.log(0.5) + np.log(0.1) + np.log(0.8)) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["nll"], expected, rtol=1e-6)
  assert float(m["num_tokens"]) == 3 and float(m["correct_sum"]) == 2  # argmax ties -> 0


def test_padding_is_never_a_target():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
  tokens = jnp.arange(10).reshape(2, 5) % 7
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  loss, m = losses.cross_entropy(logits, tokens, orders.left_to_right(2, 5), mask=mask)
  changed = tokens.at[0, 3:].set(0)
  loss2, _ = losses.cross_entropy(logits, changed, orders.left_to_right(2, 5), mask=mask)
  assert float(m["num_tokens"]) == 8 and float(loss) == float(loss2)


def test_mismatched_shapes_raise():
  with pytest.raises(ValueError, match="must match"):
    losses.cross_entropy(jnp.zeros((1, 3, 4)), jnp.zeros((1, 4), jnp.int32),
                         jnp.ones((1, 4), jnp.int32))
