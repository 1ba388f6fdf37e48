"""The Pallas block-id flash attention against the jnp reference (interpret mode on CPU).

Shapes are tiny and tiles are 8 or 16 rows: the interpreter runs every grid step on the
CPU, and several tiles per axis are needed for padding and skipping to be exercised.
"""

import functools
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax import kernels, orders
from armd_jax.kernels import BlockSizes, block_causal_attention_reference, live_tiles, tile_plan
from armd_jax.kernels import flash, tiles
from armd_jax.kernels.flash import block_causal_flash_attention
from armd_jax.kernels.tiles import key_tile_ranges, query_tile_ranges
from armd_jax.losses import token_log_probs
from armd_jax.models.armd import generation_order
from conftest import init_model, tiny_config

# dtype -> (forward atol, gradient tolerance relative to the largest gradient entry).
# bfloat16: the kernel and the reference round p and ds to bfloat16 at different
# points (per tile vs. whole row), so they agree to a few bfloat16 ulps.
TOLERANCES = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))  # one program, not op by op
def make_ids(kind, rng, batch, nq, nk):
  """(q_ids [B, Nq], kv_ids [B, Nk]) for one of the id layouts the model produces."""
  k1, k2 = jax.random.split(rng)
  if kind == "random_ties":  # unsorted, few distinct ids, queries and keys independent
    return (jax.random.randint(k1, (batch, nq), 0, 6), jax.random.randint(k2, (batch, nk), 0, 6))
  if kind == "sorted":  # generation order: non-decreasing ids with ties
    ids = jnp.sort(orders.masked_diffusion(k1, batch, nk, num_steps=nk // 3), axis=1)
    return ids[:, :nq] if nq <= nk else None, ids
  if kind == "two_streams":  # [content ids b (BOS 0 first); query ids b - 1], keys = content
    n = nk - 1
    ids = jnp.sort(orders.masked_diffusion(k1, batch, n, num_steps=n // 2), axis=1)
    content = jnp.concatenate([jnp.zeros((batch, 1), ids.dtype), ids], axis=1)
    return jnp.concatenate([content, ids - 1], axis=1), content
  raise ValueError(kind)


def random_qkv(seed, batch, nq, nk, heads, dim, dtype):
  """Standard normal q, k, v, do drawn by NumPy (jax.random would compile a program for
  every new shape and dtype)."""
  rng = np.random.default_rng(seed)
  normal = lambda n: jnp.asarray(rng.standard_normal((batch, n, heads, dim)), dtype)  # noqa: E731
  return normal(nq), normal(nk), normal(nk), normal(nq)


@functools.partial(jax.jit, static_argnames="settings")
def _kernel_value_and_grads(q, k, v, do, q_ids, kv_ids, settings):
  attention = lambda q, k, v: block_causal_flash_attention(  # noqa: E731
      q, k, v, q_ids, kv_ids, interpret=True, **dict(settings))
  out, vjp = jax.vjp(attention, q, k, v)
  return out, vjp(do)


def kernel_value_and_grads(q, k, v, do, q_ids, kv_ids, **settings):
  """(out, (dq, dk, dv)) of the interpreted kernel with `settings` at cotangent `do`, as one
  program per settings and shapes (the ids traced, as in the jitted model), so a test's
  calls with other values of the same shapes reuse it."""
  return _kernel_value_and_grads(q, k, v, do, q_ids, kv_ids,
                                 settings=tuple(sorted(settings.items())))


@jax.jit
def reference_value_and_grads(q, k, v, do, q_ids, kv_ids):
  """`value_and_grads` of the float32 reference, the ids traced: one program per shapes,
  shared by every case of those shapes whatever its ids."""
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  out, vjp = jax.vjp(lambda q, k, v: block_causal_attention_reference(q, k, v, q_ids, kv_ids),
                     f32(q), f32(k), f32(v))
  return out, vjp(f32(do))


RANGES, PER_TILE = {}, {"schedule": "per_tile"}
CASES = [
    # (ids kind, Nq, Nk, head dim, block sizes, backend, dtype, extra kernel kwargs)
    ("random_ties", 37, 37, 16, BlockSizes(16, 8), "tpu", jnp.float32, RANGES),
    ("random_ties", 37, 37, 16, BlockSizes(16, 8), "gpu", jnp.float32, RANGES),
    ("sorted", 29, 40, 32, BlockSizes(8, 16), "gpu", jnp.bfloat16, RANGES),
    ("sorted", 40, 40, 24, BlockSizes(8, 8, 16, 8), "tpu", jnp.float32, RANGES),
    ("two_streams", 21, 11, 8, BlockSizes(8, 8), "tpu", jnp.bfloat16, RANGES),
    ("two_streams", 21, 11, 8, BlockSizes(8, 8), "gpu", jnp.float32, RANGES),
    # Each stream padded to its own tiles: no tile straddles the two streams.
    ("two_streams", 37, 19, 16, BlockSizes(8, 8), "tpu", jnp.float32, {"q_segments": (19, 18)}),
    ("two_streams", 37, 19, 16, BlockSizes(8, 8, 16, 8), "gpu", jnp.bfloat16,
     {"q_segments": (19, 18)}),
    ("random_ties", 24, 45, 64, BlockSizes(16, 16), "tpu", jnp.bfloat16, RANGES),
    # The fallback schedule (whole-row residency, per-tile skip test).
    ("random_ties", 37, 37, 16, BlockSizes(16, 8), "tpu", jnp.float32, PER_TILE),
    ("two_streams", 21, 11, 8, BlockSizes(8, 8), "gpu", jnp.bfloat16, PER_TILE),
]


@pytest.mark.parametrize("kind, nq, nk, dim, block_sizes, backend, dtype, extra", CASES)
def test_kernel_output_and_gradients_match_the_reference(kind, nq, nk, dim, block_sizes,
                                                         backend, dtype, extra):
  q_ids, kv_ids = make_ids(kind, jax.random.PRNGKey(nq * nk + dim), 2, nq, nk)
  assert q_ids.shape == (2, nq) and kv_ids.shape == (2, nk)
  q, k, v, do = random_qkv(nq * nk + dim, 2, nq, nk, 2, dim, dtype)
  out, grads = kernel_value_and_grads(q, k, v, do, q_ids, kv_ids, block_sizes=block_sizes,
                                      backend=backend, **extra)
  # The reference in float32 on the same (possibly bfloat16-rounded) inputs.
  ref_out, ref_grads = reference_value_and_grads(q, k, v, do, q_ids, kv_ids)
  atol, gtol = TOLERANCES[dtype]
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731  (NumPy: no program per shape)
  np.testing.assert_allclose(f32(out), ref_out, atol=atol, rtol=atol)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    scale = float(np.max(np.abs(ref_g)))
    np.testing.assert_allclose(f32(g), ref_g, atol=gtol * scale, rtol=gtol, err_msg=f"d{name}")


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_rows_without_visible_keys_give_zeros_and_finite_gradients(backend):
  q, k, v, do = random_qkv(0, 1, 16, 16, 1, 16, jnp.float32)
  q_ids = jnp.arange(16)[None] - 8  # the first 8 queries (ids < 0) see no key at all
  kv_ids = jnp.arange(16)[None]
  out, grads = kernel_value_and_grads(q, k, v, do, q_ids, kv_ids, block_sizes=BlockSizes(8, 8),
                                      backend=backend)
  np.testing.assert_array_equal(out[:, :8], 0.0)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_array_equal(grads[0][:, :8], 0.0)
  ref, _ = reference_value_and_grads(q, k, v, do, q_ids, kv_ids)
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_live_tiles_of_a_left_to_right_order_are_the_lower_triangle():
  n, block = 64, 8
  ids = orders.left_to_right(1, n)
  live = live_tiles(ids, ids, BlockSizes(block, block))
  tiles = n // block
  assert int(live.sum()) == tiles * (tiles + 1) // 2  # 36 of 64 computed, 28 skipped
  np.testing.assert_array_equal(live[0], np.tril(np.ones((tiles, tiles), bool)))


def test_live_tiles_of_two_streams_count_as_two_lower_triangles():
  n, block = 63, 8  # content rows: BOS + 63 tokens = 64 = 8 tiles; query rows 63 -> 8 tiles
  ids = orders.left_to_right(1, n) + 1  # ids 1..n
  content = jnp.concatenate([jnp.zeros((1, 1), ids.dtype), ids], axis=1)
  q_ids = jnp.concatenate([content, ids - 1], axis=1)  # [1, 127] -> 16 tiles (last padded)
  live = np.asarray(live_tiles(q_ids, content, BlockSizes(block, block)))[0]
  tiles = 8
  # Content tile i sees key tiles 0..i; query tile i (ids 8i .. 8i+7 after the shift)
  # also sees key tiles 0..i: two lower triangles.
  assert live.sum() == 2 * tiles * (tiles + 1) // 2
  np.testing.assert_array_equal(live[:tiles], np.tril(np.ones((tiles, tiles), bool)))
  np.testing.assert_array_equal(live[tiles:], np.tril(np.ones((tiles, tiles), bool)))


@pytest.mark.parametrize("backend, schedule", [("tpu", "ranges"), ("gpu", "ranges"),
                                               ("tpu", "per_tile")])
def test_kernel_never_touches_skipped_tiles(backend, schedule):
  """NaN in every tile the kernel should skip: any read of one would poison the result."""
  n, block = 32, 8
  ids = orders.left_to_right(1, n)
  q, k, v, do = random_qkv(1, 1, n, n, 1, 16, jnp.float32)
  live = np.asarray(live_tiles(ids, ids, BlockSizes(block, block)))[0]  # [4, 4]
  assert not live.all()
  settings = dict(block_sizes=BlockSizes(block, block), backend=backend, schedule=schedule)
  ref_out, ref_grads = reference_value_and_grads(q, k, v, do, ids, ids)
  # Forward and dq: queries of tile 0 only read key tile 0, so NaN in key tiles 1.. must
  # not reach them.
  k_bad = k.at[:, block:].set(jnp.nan)
  v_bad = v.at[:, block:].set(jnp.nan)
  out, (dq, _, _) = kernel_value_and_grads(q, k_bad, v_bad, do, ids, ids, **settings)
  np.testing.assert_allclose(out[:, :block], ref_out[:, :block], atol=2e-5)
  np.testing.assert_allclose(dq[:, :block], ref_grads[0][:, :block], atol=2e-5)
  # dk, dv: the last key tile is only read by the last query tile, so NaN queries and
  # output gradients in every earlier query tile must not reach its dk, dv.
  q_bad = q.at[:, :n - block].set(jnp.nan)
  do_bad = do.at[:, :n - block].set(jnp.nan)
  _, (_, dk, dv) = kernel_value_and_grads(q_bad, k, v, do_bad, ids, ids, **settings)
  _, (_, ref_dk, ref_dv) = reference_value_and_grads(
      q.at[:, :n - block].set(0.0), k, v, do.at[:, :n - block].set(0.0), ids, ids)
  np.testing.assert_allclose(dk[:, -block:], ref_dk[:, -block:], atol=2e-5)
  np.testing.assert_allclose(dv[:, -block:], ref_dv[:, -block:], atol=2e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_two_stream_kernel_never_touches_skipped_tiles(backend):
  """Two streams, each padded to its tiles: NaN in every skipped tile never reaches the
  exact rows, forward (key tiles) and dk/dv (query tiles of *both* streams)."""
  n, block = 31, 8  # content rows: BOS + 31 = 32 (4 tiles); query rows: 31 (4 tiles, padded)
  ids = orders.left_to_right(1, n) + 1
  content = jnp.concatenate([jnp.zeros((1, 1), ids.dtype), ids], axis=1)  # ids 0..31
  q_ids = jnp.concatenate([content, ids - 1], axis=1)  # [1, 63]; query ids 0..30
  q, k, v, do = random_qkv(3, 1, 2 * n + 1, n + 1, 1, 16, jnp.float32)
  settings = dict(block_sizes=BlockSizes(block, block), backend=backend, q_segments=(n + 1, n))
  ref_out, ref_grads = reference_value_and_grads(q, k, v, do, q_ids, content)
  # The first tile of each stream reads key tile 0 only.
  first = np.r_[0:block, n + 1:n + 1 + block]
  out, (dq, _, _) = kernel_value_and_grads(q, k.at[:, block:].set(jnp.nan),
                                           v.at[:, block:].set(jnp.nan), do, q_ids, content,
                                           **settings)
  np.testing.assert_allclose(out[:, first], ref_out[:, first], atol=2e-5)
  np.testing.assert_allclose(dq[:, first], ref_grads[0][:, first], atol=2e-5)
  # The last key tile (ids 24..31) is read by the last tile of each stream only: NaN in
  # every earlier query tile of both streams must not reach its dk, dv.
  earlier = np.r_[0:n + 1 - block, n + 1:n + 1 + 3 * block]
  poison = lambda x, value: x.at[:, earlier].set(value)  # noqa: E731
  _, (_, dk, dv) = kernel_value_and_grads(poison(q, jnp.nan), k, v, poison(do, jnp.nan), q_ids,
                                          content, **settings)
  _, (_, ref_dk, ref_dv) = reference_value_and_grads(poison(q, 0.0), k, v, poison(do, 0.0),
                                                     q_ids, content)
  np.testing.assert_allclose(dk[:, -block:], ref_dk[:, -block:], atol=2e-5)
  np.testing.assert_allclose(dv[:, -block:], ref_dv[:, -block:], atol=2e-5)


def test_tile_plan_masks_only_the_diagonal_of_a_left_to_right_order():
  """Mask arithmetic only on partial tiles: for distinct sorted ids the diagonal ones."""
  n, block = 64, 8
  ids = orders.left_to_right(2, n)
  computed, masked = (np.asarray(x) for x in tile_plan(ids, ids, BlockSizes(block, block)))
  tiles = n // block
  np.testing.assert_array_equal(computed[0], np.tril(np.ones((tiles, tiles), bool)))
  np.testing.assert_array_equal(masked[0], np.eye(tiles, dtype=bool))
  # Masked-diffusion ties: only tiles straddling a block boundary run the mask.
  ids = jnp.sort(orders.masked_diffusion(jax.random.PRNGKey(0), 1, n, num_steps=4), axis=1)
  computed, masked = (np.asarray(x)[0] for x in tile_plan(ids, ids, BlockSizes(block, block)))
  ids_np = np.asarray(ids)[0].reshape(tiles, block)
  for i in range(tiles):
    for j in range(tiles):
      visible = ids_np[j][None, :] <= ids_np[i][:, None]
      assert computed[i, j] == visible.any(), (i, j)
      assert masked[i, j] == (visible.any() and not visible.all()), (i, j)


def test_key_tile_ranges_cover_both_streams_exactly():
  """dk/dv ranges of the two-stream layout: one run per stream, no dead tile between."""
  n, block = 31, 8
  ids = orders.left_to_right(1, n) + 1
  content = jnp.concatenate([jnp.zeros((1, 1), ids.dtype), ids], axis=1)  # 32 = 4 tiles
  query = jnp.pad(ids - 1, ((0, 0), (0, 1)), constant_values=-(2 ** 30))  # 32 = 4 tiles
  q_ids = jnp.concatenate([content, query], axis=1)
  ranges = np.asarray(key_tile_ranges(q_ids, content, block, block))[0]  # [4, 8]
  # Key tile 0 is live for every query tile: one run, masked up to the query stream's
  # diagonal tile 4 (the fully visible content tiles 1..3 before it run masked too).
  np.testing.assert_array_equal(ranges[0, :6], [0, 5, 8, 8, 8, 8])
  for j in range(1, 4):  # key tile j: content tiles j..3 and query tiles 4+j..7
    lo1, c1, end1, lo2, c2, end2 = ranges[j, :6]
    assert (lo1, end1, lo2, end2) == (j, 4, 4 + j, 8), ranges[j]
    assert (c1, c2) == (j + 1, 4 + j + 1), ranges[j]  # only the diagonal tiles are masked
  fwd = np.asarray(query_tile_ranges(q_ids, content, block, block))[0]  # [8, 4]
  for i in range(8):  # query tile i of either stream: key tiles 0..i%4, last one masked
    assert tuple(fwd[i, :3]) == (0, i % 4, i % 4 + 1), fwd[i]


@pytest.mark.parametrize("kind", ["random_ties", "sorted"])
def test_tile_ranges_hold_every_visible_pair(kind):
  """For any ids, every (query, key) pair the mask allows lies in a computed tile, and
  every pair in an unmasked tile is allowed."""
  q_ids, kv_ids = make_ids(kind, jax.random.PRNGKey(5), 2, 48, 48)
  block = 8
  fwd = np.asarray(query_tile_ranges(q_ids, kv_ids, block, block))
  bwd = np.asarray(key_tile_ranges(q_ids, kv_ids, block, block))
  allowed = np.asarray(kv_ids[:, None, :] <= q_ids[:, :, None]).reshape(2, 6, block, 6, block)
  for b in range(2):
    for i in range(6):
      for j in range(6):
        pair = allowed[b, i, :, j, :]
        lo, full_end, hi = fwd[b, i, :3]
        assert not pair.any() or lo <= j < hi
        assert not (lo <= j < full_end) or pair.all()
        lo1, c1, end1, lo2, c2, end2 = bwd[b, j, :6]
        in_runs = lo1 <= i < end1 or lo2 <= i < end2
        assert not pair.any() or in_runs
        assert not (c1 <= i < end1 or c2 <= i < end2) or pair.all()


@pytest.mark.slow  # the interpreted kernel inside a whole model, forward and backward
def test_model_logits_and_gradients_are_the_same_with_the_kernel():
  length = 19
  config = tiny_config(max_len=length, num_layers=2)  # one two-stream, one causal layer
  model, params = init_model(config, length=length)
  kernel_model = armd_jax.ARMD(config.replace(attention="pallas", pallas_interpret=True,
                                              pallas_block_q=8, pallas_block_kv=8))
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  tokens = jax.random.randint(k1, (2, length), 0, config.vocab_size)
  ids = orders.masked_diffusion(k2, 2, length, num_steps=7)

  # Each model compiled once (logits with the gradients) rather than run op by op; tokens
  # and ids traced, so the tile plans are part of the program, not run op by op at tracing.
  @jax.jit
  def logits_value_and_grads(params, tokens, ids):
    def log_likelihood(module, params):
      logits = module.apply(params, tokens, ids)
      return token_log_probs(logits, tokens).sum(), logits
    return [jax.value_and_grad(lambda p, m=module: log_likelihood(m, p), has_aux=True)(params)
            for module in (model, kernel_model)]

  ((value, logits), grads), ((kernel_value, kernel_logits), kernel_grads) = (
      logits_value_and_grads(params, tokens, ids))
  np.testing.assert_allclose(kernel_value, value, rtol=1e-5)
  np.testing.assert_allclose(kernel_logits, logits, atol=2e-5)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(grads),
                        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(kernel_grads)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path[0]))


def test_generation_order_sorts_stably_and_inverts():
  ids = jnp.array([[3, 1, 3, 0, 1], [0, 0, 2, 1, 2]])
  order, inverse = generation_order(ids)
  np.testing.assert_array_equal(order, [[3, 1, 4, 0, 2], [0, 1, 3, 2, 4]])
  sorted_ids = jnp.take_along_axis(ids, order, axis=1)
  assert bool(jnp.all(jnp.diff(sorted_ids, axis=1) >= 0))
  np.testing.assert_array_equal(jnp.take_along_axis(sorted_ids, inverse, axis=1), ids)


def test_gpu_kernel_lowers_to_triton_for_cuda():
  """Forward and both backward kernels lower to Triton calls (no GPU needed to lower)."""
  shape = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

  def loss(q, k, v, q_ids, kv_ids):
    out = block_causal_flash_attention(q, k, v, q_ids, kv_ids, backend="gpu",
                                       block_sizes=BlockSizes(64, 64))
    return out.astype(jnp.float32).sum()

  exported = jax.export.export(
      jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          shape, shape, shape, ids, ids)
  module = exported.mlir_module()
  assert module.count("__gpu$xla.gpu.triton") == 3
  # Native [B, N, H, D] layout: no transpose of q, k, v, o or their gradients (only the
  # [B, nq, nk] tile tables are transposed, for the dk/dv ranges).
  transposed = re.findall(r"stablehlo\.transpose .*?: \(tensor<([0-9x]+)x[a-z0-9]+>\)", module)
  assert transposed and all(shape.count("x") < 3 for shape in transposed), transposed


def test_without_block_sizes_each_platform_lowers_with_its_own_tiles():
  """GPU: the H200 sweep's 64-wide tiles (Triton grids of N / 64 query tiles); TPU 128."""
  assert kernels.default_block_sizes("tpu", 64) == BlockSizes(128, 128)
  assert kernels.default_block_sizes("gpu", 64) == BlockSizes(64, 64)
  assert kernels.default_block_sizes("gpu", 128) == BlockSizes(128, 64, 64, 64)
  shape = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

  def grids(block_sizes):
    def loss(q, k, v, q_ids, kv_ids):
      return block_causal_flash_attention(q, k, v, q_ids, kv_ids,
                                          block_sizes=block_sizes).astype(jnp.float32).sum()
    module = jax.export.export(
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
            shape, shape, shape, ids, ids).mlir_module()
    return re.findall(r"grid_x = (\d+)", module)

  assert grids(None) == grids(BlockSizes(64, 64)) == ["4"] * 3  # 256 / 64 tiles
  assert grids(BlockSizes(128, 128)) == ["2"] * 3


def test_tpu_kernel_lowers_to_mosaic_for_tpu():
  """Forward and both backward kernels lower to Mosaic calls (compiling needs libtpu:
  see benchmarks/tpu_aot.py)."""
  shape = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((1, 256), jnp.int32)

  def loss(q, k, v, q_ids, kv_ids):
    out = block_causal_flash_attention(q, k, v, q_ids, kv_ids, backend="auto")
    return out.astype(jnp.float32).sum()

  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
      shape, shape, shape, ids, ids)
  assert exported.mlir_module().count("tpu_custom_call") == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="cuda"), "backend must be one of"),
    (dict(backend="tpu", block_sizes=BlockSizes(64, 128)), "block_q=64 must be a multiple of 128"),
    (dict(backend="gpu", block_sizes=BlockSizes(128, 48)), "block_kv=48 must be a power of two"),
    (dict(interpret=True, block_sizes=BlockSizes(12, 8)), "multiple of 8"),
    (dict(interpret=True, schedule="rows"), "schedule must be one of"),
    (dict(interpret=True, q_segments=(3, 4)), "must be positive and sum to Nq=8"),
])
def test_bad_kernel_settings_raise_clear_errors(kwargs, message):
  q = jnp.zeros((1, 8, 1, 16))
  ids = jnp.zeros((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=message):
    block_causal_flash_attention(q, q, q, ids, ids, **kwargs)


def test_bad_block_sizes_and_shapes_raise_clear_errors():
  with pytest.raises(ValueError, match="BlockSizes.block_kv"):
    BlockSizes(128, 0)
  q = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="q_ids must be"):
    kernels.block_causal_attention(q, q, q, jnp.zeros((1, 7), jnp.int32),
                                   jnp.zeros((1, 8), jnp.int32), implementation="pallas")
  with pytest.raises(ValueError, match="pallas_block_q=12"):
    tiny_config(pallas_block_q=12, pallas_block_kv=16)
  with pytest.raises(ValueError, match="set together"):
    tiny_config(pallas_block_q=0, pallas_block_kv=64)


# -- cost estimates: XLA's totals (and the compile reports' roofline) count the kernels --

# ARMD's two streams at N = 511: content rows 0..511, query rows 0..510, keys 0..511; with
# 128-row tiles each stream is 4 query tiles against 4 key tiles, a lower triangle each.
COST_N, COST_B, COST_H, COST_D = 511, 2, 2, 128
COST_TILES = 2 * (4 * 5 // 2)  # per (batch row, head), for every one of the three kernels


def _two_stream_grad(q, k, v, q_ids, kv_ids):
  def loss(q, k, v):
    out = block_causal_flash_attention(q, k, v, q_ids, kv_ids, backend="tpu",
                                       q_segments=(COST_N + 1, COST_N))
    return out.astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _two_stream_args(sharding=None):
  q = jax.ShapeDtypeStruct((COST_B, 2 * COST_N + 1, COST_H, COST_D), jnp.bfloat16,
                           sharding=sharding)
  kv = jax.ShapeDtypeStruct((COST_B, COST_N + 1, COST_H, COST_D), jnp.bfloat16,
                            sharding=sharding)
  ids = lambda n: jax.ShapeDtypeStruct((COST_B, n), jnp.int32, sharding=sharding)  # noqa: E731
  return q, kv, kv, ids(2 * COST_N + 1), ids(COST_N + 1)


def test_visited_tiles_of_one_token_blocks_are_what_the_kernel_computes():
  """The tiles a cost estimate counts for its typical ids (one token per block) are the
  tiles `tile_plan` computes for ARMD's left-to-right order: two lower triangles."""
  q_ids, kv_ids = tiles.typical_ids((COST_N + 1, COST_N), 128, COST_N + 1, 1024, 512)
  assert tiles.visited_tiles(q_ids, kv_ids, 128, 128, "kv") == COST_TILES
  assert tiles.visited_tiles(q_ids, kv_ids, 128, 128, "q") == COST_TILES
  ids = orders.left_to_right(1, COST_N)
  content = jnp.concatenate([jnp.zeros((1, 1), ids.dtype), ids], axis=1)
  both = jnp.concatenate([flash._pad_axis(content, 1, 128, tiles._Q_PAD_ID), ids - 1], axis=1)
  computed, _ = tile_plan(both, content, BlockSizes(128, 128))
  assert int(computed.sum()) == COST_TILES
  # per_tile counts the live tiles, the same here; one unsorted run makes every tile live
  assert tiles.visited_tiles(q_ids, kv_ids, 128, 128, "kv", "per_tile") == COST_TILES


def test_every_tpu_kernel_carries_a_cost_estimate_of_its_visited_tiles():
  """Forward, dq and dk/dv Mosaic calls declare 4, 6 and 8 x bq x bk x D FLOPs per
  visited tile, one exp per score, and their streamed tiles' bytes."""
  module = jax.export.export(jax.jit(_two_stream_grad), platforms=["tpu"])(
      *_two_stream_args()).mlir_module()
  found = [(int(f), int(t), int(b)) for b, f, t in re.findall(
      r"bytes_accessed\\22:(\d+),\\0A\\22flops\\22:(\d+),.*?transcendentals\\22:(\d+)", module)]
  per_tile = 128 * 128 * COST_D * COST_TILES * COST_B * COST_H
  assert [f for f, _, _ in found] == [4 * per_tile, 6 * per_tile, 8 * per_tile]
  exps = 128 * 128 * COST_TILES * COST_B * COST_H
  assert found[0][1] == exps + 128 * COST_TILES * COST_B * COST_H  # + one rescale per row
  assert [t for _, t, _ in found[1:]] == [exps, exps]
  kv_tile_bytes = COST_TILES * COST_B * COST_H * 128 * (2 * COST_D * 2 + 4)
  assert found[0][2] > kv_tile_bytes and found[1][2] > kv_tile_bytes


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e .[tpu])")
def test_xla_cost_analysis_of_a_tpu_compile_counts_the_visited_tiles():
  """Compiled for a TPU chip on this host, the forward and backward kernels' FLOPs in
  XLA's cost analysis are within 10% of 18 x bq x bk x D per visited tile (the rest of
  the program is the tile tables, transposes and one einsum)."""
  code = textwrap.dedent(f"""
      import jax, sys
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      from jax.experimental import topologies
      from jax.sharding import SingleDeviceSharding
      import test_kernels as t
      jax.config.update("jax_default_matmul_precision", None)  # conftest's 'highest': fp32 dots
      device = topologies.get_topology_desc("v5e:2x2", "tpu").devices[0]
      cost = jax.jit(t._two_stream_grad).lower(
          *t._two_stream_args(SingleDeviceSharding(device))).compile().cost_analysis()
      print("FLOPS", cost["flops"])
  """)
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                                         "JAX_PLATFORMS": ""})
  found = re.findall(r"FLOPS ([\d.e+]+)", run.stdout)
  assert run.returncode == 0 and found, run.stdout[-2000:] + run.stderr[-3000:]
  analytic = 18 * 128 * 128 * COST_D * COST_TILES * COST_B * COST_H
  assert abs(float(found[0]) - analytic) <= 0.1 * analytic, (found[0], analytic)
