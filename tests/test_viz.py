"""armd_jax.viz: the computations behind the notebooks' pictures, and that plots draw."""

import flax
import jax
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import armd_jax  # noqa: E402
from armd_jax import orders, viz  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
  config = armd_jax.ModelConfig(vocab_size=11, d_model=32, num_layers=2, num_heads=2,
                                mlp_dim=64, max_len=12, d_pe=8)
  model = armd_jax.build_model(config)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 12), 0, 11)
  ids = orders.progressive_permutation(jax.random.PRNGKey(1), 1, 12, 12)
  return model, jax.jit(model.init)(jax.random.PRNGKey(2), tokens, ids), tokens, ids


def test_attention_masks_are_the_id_comparisons_with_bos_always_visible():
  ids = np.array([2, 1, 2, 3])
  content, query = viz.attention_masks(ids)
  assert content.shape == query.shape == (4, 5)
  assert content[:, 0].all() and query[:, 0].all()  # BOS
  np.testing.assert_array_equal(query[:, 1:], ids[None, :] < ids[:, None])
  np.testing.assert_array_equal(content[:, 1:], ids[None, :] <= ids[:, None])
  # Left to right: strict lower triangle (plus BOS) for the query stream.
  _, lr = viz.attention_masks(orders.left_to_right(1, 5))
  np.testing.assert_array_equal(lr, np.tril(np.ones((5, 6), bool)))


def test_logit_change_is_zero_exactly_up_to_the_changed_block_and_not_after(tiny):
  model, params, tokens, ids = tiny
  ids = np.asarray(ids[0])
  position = int(np.argsort(ids)[5])  # revealed sixth
  change = viz.logit_change(model, params, tokens, ids, position)
  assert change.shape == (12,)
  assert np.all(change[ids <= ids[position]] == 0.0)
  assert np.all(change[ids > ids[position]] > 0.0)


def test_prefix_aggregation_weights_match_the_position_table(tiny):
  model, params, _, ids = tiny
  weights = viz.prefix_aggregation_weights(model, params, ids)
  raw = flax.linen.meta.unbox(params)["params"]
  pe = np.asarray(raw["pe"])[:12]
  bos_pe = np.asarray(raw["bos_pe"])
  ctx = np.concatenate([bos_pe[None], pe])
  _, visible = viz.attention_masks(ids)
  expected = np.where(visible, pe @ ctx.T, 0.0) / visible.sum(-1, keepdims=True)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
  assert np.all(weights[~visible] == 0.0)


def test_prefix_weights_reject_a_model_without_prefix_aggregation():
  config = armd_jax.ModelConfig(vocab_size=11, d_model=32, num_layers=2, num_heads=2,
                                mlp_dim=64, max_len=12, kind="ar")
  with pytest.raises(ValueError, match="ARMD"):
    viz.prefix_aggregation_weights(armd_jax.build_model(config), {}, np.arange(1, 13))


def test_fill_steps_of_strided_decoding_follow_the_streams():
  steps = viz.fill_steps(orders.strided(1, 8, streams=2))
  assert len(steps) == 8 // 2 + 2 - 1
  assert sorted(np.concatenate(steps).tolist()) == list(range(8))
  assert [s.tolist() for s in steps[:2]] == [[0], [4]]  # the two stream heads first
  assert steps[2].tolist() == [1, 5]  # then one token of each stream per call


def test_every_plot_draws_a_figure(tiny):
  model, params, tokens, ids = tiny
  figures = [
      viz.plot_block_ids({"l2r": orders.left_to_right(1, 12), "random": ids}),
      viz.plot_masks({"l2r": orders.left_to_right(1, 12), "random": ids}),
      viz.plot_logit_change(viz.logit_change(model, params, tokens, ids, 3), ids, 3),
      viz.plot_prefix_weights(viz.prefix_aggregation_weights(model, params, ids), ids),
      viz.plot_fill_steps(orders.strided(1, 12, streams=3), tokens[0], lambda t: "ab"[t[0] % 2]),
      viz.plot_decode_speed([{"label": "S=1", "calls": 12, "seconds": 0.5},
                             {"label": "S=2", "calls": 7, "seconds": 0.3}]),
      viz.plot_tradeoff([{"method": "a", "calls": c, "gen_ppl": 10.0 / c, "entropy": 3.0}
                         for c in (1, 2, 4)], evaluator="x"),
      viz.plot_loss([{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0,
                                                     "eval/nll": 2.1}]),
  ]
  for fig in figures:
    assert fig.axes and any(ax.has_data() for ax in fig.axes)
    matplotlib.pyplot.close(fig)


def test_viz_import_does_not_import_matplotlib():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  code = "import sys, armd_jax.viz; assert 'matplotlib' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)
