"""The TPU (Mosaic) launches of the 'ranges' schedule: a tiled grid with clamped index maps.

Grid (B, H, q tiles, kv tiles) with the kv (or q, for dk/dv) axis 'arbitrary' and the
accumulators in VMEM scratch; the ranges of `tiles.query_tile_ranges` /
`key_tile_ranges` are scalar-prefetch operands (SMEM) and the index maps clamp the
streamed axis into the range, so a step outside it keeps the previous block (no copy)
and does no work. No whole-row residency: only one tile of each operand is in VMEM.
Layout [B, H, N, D] inside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from armd_jax.kernels.tiles import (_KV_RANGE_WIDTH, _Q_RANGE_WIDTH, _dkv_step, _dq_step,
                                    _finish_forward, _forward_step, _heads_first,
                                    _ids_layout, _init_carry, _Options, _out_shapes,
                                    _same_varying_axes, _stat_rows, cost_estimate,
                                    key_tile_ranges, query_tile_ranges)


def _clamp_to_range(step, lo, hi):
  """Block index of a streamed tile at grid step `step` for range [lo, hi).

  Outside the range the index stays on the range's nearest end, so the pipeline keeps
  the block it already holds (no copy of a skipped tile).
  """
  return jnp.clip(step, lo, jnp.maximum(hi - 1, lo))


def _clamp_to_runs(step, r):
  """Like `_clamp_to_range` for the two runs of a key tile's query-tile ranges `r`."""
  lo1, end1, lo2, end2 = r[0], r[2], r[3], r[5]
  last1 = jnp.maximum(end1 - 1, lo1)
  last2 = jnp.where(end2 > lo2, end2 - 1, last1)
  return jnp.where(step < end1, jnp.maximum(step, lo1),
                   jnp.where(step < lo2, last1, jnp.minimum(step, last2)))


def _tpu_forward_kernel(r_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, o_ref, lse_ref, m_scr,
                        l_scr, acc_scr, *, scale, nq, nk):
  """Program (b, h, i, j): key tile j's contribution to query tile i."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  base = (b * nq + i) * _Q_RANGE_WIDTH
  lo, full_end, hi = r_ref[base], r_ref[base + 1], r_ref[base + 2]

  @pl.when(j == 0)
  def _init():
    m, l, acc = _init_carry(*acc_scr.shape)
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

  def update(masked):
    ids = (qid_ref[...], kvid_ref[...]) if masked else (None, None)
    m, l, acc = _forward_step((m_scr[...], l_scr[...], acc_scr[...]), q_ref[...], k_ref[...],
                              v_ref[...], *ids, scale)
    m_scr[...], l_scr[...], acc_scr[...] = m, l, acc

  pl.when((j >= lo) & (j < full_end))(lambda: update(False))
  pl.when((j >= full_end) & (j < hi))(lambda: update(True))

  @pl.when(j == nk - 1)
  def _finish():
    out, lse = _finish_forward((m_scr[...], l_scr[...], acc_scr[...]))
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _tpu_dq_kernel(r_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref, delta_ref,
                   dq_ref, dq_scr, *, scale, nq, nk):
  """Program (b, h, i, j): key tile j's contribution to dq of query tile i."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  base = (b * nq + i) * _Q_RANGE_WIDTH
  lo, full_end, hi = r_ref[base], r_ref[base + 1], r_ref[base + 2]

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def update(masked):
    q = q_ref[...]
    ids = (qid_ref[...], kvid_ref[...]) if masked else (None, None)
    lse = lse_ref[...].reshape(q.shape[0], 1)
    delta = delta_ref[...].reshape(q.shape[0], 1)
    dq_scr[...] = _dq_step(dq_scr[...], q, k_ref[...], v_ref[...], do_ref[...], lse, delta,
                           *ids, scale)

  pl.when((j >= lo) & (j < full_end))(lambda: update(False))
  pl.when((j >= full_end) & (j < hi))(lambda: update(True))

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _tpu_dkv_kernel(r_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref, delta_ref,
                    dk_ref, dv_ref, dk_scr, dv_scr, *, scale, nq, nk):
  """Program (b, h, j, i): query tile i's contribution to dk, dv of key tile j."""
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  base = (b * nk + j) * _KV_RANGE_WIDTH
  lo1, c1, end1 = r_ref[base], r_ref[base + 1], r_ref[base + 2]
  lo2, c2, end2 = r_ref[base + 3], r_ref[base + 4], r_ref[base + 5]

  @pl.when(i == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def update(masked):
    q = q_ref[...]
    ids = (qid_ref[...], kvid_ref[...]) if masked else (None, None)
    lse = lse_ref[...].reshape(q.shape[0], 1)
    delta = delta_ref[...].reshape(q.shape[0], 1)
    dk, dv = _dkv_step((dk_scr[...], dv_scr[...]), q, k_ref[...], v_ref[...], do_ref[...], lse,
                       delta, *ids, scale)
    dk_scr[...], dv_scr[...] = dk, dv

  in_run = lambda a, b_: (i >= a) & (i < b_)  # noqa: E731
  pl.when(in_run(lo1, c1) | in_run(lo2, c2))(lambda: update(True))
  pl.when(in_run(c1, end1) | in_run(c2, end2))(lambda: update(False))

  @pl.when(i == nq - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _tpu_call(kernel, grid, in_specs, out_specs, out_shapes, scratch, ranges, operands,
              interpret, name, cost=None):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  ranges, *operands = _same_varying_axes(ranges.reshape(-1), *operands)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in scratch])
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=_out_shapes(operands[0], out_shapes),
      interpret=interpret, name=name, cost_estimate=cost,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
  )(ranges, *operands)


def _tpu_forward(opts: _Options, q, k, v, q_ids, kv_ids):
  """As `gpu._gpu_forward`; the kernel runs on [B, H, N, D]."""
  b, nq_len, h, d = q.shape
  nk_len = k.shape[1]
  bq, bk = opts.block_sizes.block_q, opts.block_sizes.block_kv
  nq, nk = nq_len // bq, nk_len // bk
  ranges = query_tile_ranges(q_ids, kv_ids, bq, bk)
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk)

  def kv_index(b_, h_, i, j, r):
    base = (b_ * nq + i) * _Q_RANGE_WIDTH
    return _clamp_to_range(j, r[base], r[base + 2])

  q_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, r: (b_, h_, i, 0))
  kv_tile = pl.BlockSpec((None, None, bk, d),
                         lambda b_, h_, i, j, r: (b_, h_, kv_index(b_, h_, i, j, r), 0))
  in_specs = [q_tile, kv_tile, kv_tile,
              pl.BlockSpec((None, bq, 1), lambda b_, h_, i, j, r: (b_, i, 0)),
              pl.BlockSpec((None, None, 1, bk),
                           lambda b_, h_, i, j, r: (b_, kv_index(b_, h_, i, j, r), 0, 0))]
  out_specs = [q_tile, pl.BlockSpec((None, None, None, 1, bq),
                                    lambda b_, h_, i, j, r: (b_, h_, i, 0, 0))]
  out_shapes = [jax.ShapeDtypeStruct((b, h, nq_len, d), q.dtype),
                jax.ShapeDtypeStruct((b, h, nq, 1, bq), jnp.float32)]
  kernel = functools.partial(_tpu_forward_kernel, scale=opts.sm_scale, nq=nq, nk=nk)
  out, lse = _tpu_call(kernel, (b, h, nq, nk), in_specs, out_specs, out_shapes,
                       [(bq, 1), (bq, 1), (bq, d)], ranges,
                       (_heads_first(q), _heads_first(k), _heads_first(v), qid3, kvid4),
                       opts.interpret, "block_causal_fwd",
                       cost_estimate(opts, "fwd", b, h, nq_len, nk_len, d, bq, bk,
                                     q.dtype.itemsize))
  return _heads_first(out), lse.reshape(b, h, nq_len)


def _tpu_backward(opts: _Options, q, k, v, q_ids, kv_ids, lse, delta, do):
  """As `gpu._gpu_backward`; the kernels run on [B, H, N, D]."""
  b, nq_len, h, d = q.shape
  nk_len = k.shape[1]
  qt, kt, vt, dot = (_heads_first(x) for x in (q, k, v, do))
  bq, bk = opts.block_sizes.block_q, opts.block_sizes.block_kv
  nq, nk = nq_len // bq, nk_len // bk
  ranges = query_tile_ranges(q_ids, kv_ids, bq, bk)
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk)

  def kv_index(b_, i, j, r):
    base = (b_ * nq + i) * _Q_RANGE_WIDTH
    return _clamp_to_range(j, r[base], r[base + 2])

  q_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i, j, r: (b_, h_, i, 0))
  kv_tile = pl.BlockSpec((None, None, bk, d),
                         lambda b_, h_, i, j, r: (b_, h_, kv_index(b_, i, j, r), 0))
  stat = pl.BlockSpec((None, None, None, 1, bq), lambda b_, h_, i, j, r: (b_, h_, i, 0, 0))
  dq = _tpu_call(
      functools.partial(_tpu_dq_kernel, scale=opts.sm_scale, nq=nq, nk=nk), (b, h, nq, nk),
      [q_tile, kv_tile, kv_tile, pl.BlockSpec((None, bq, 1), lambda b_, h_, i, j, r: (b_, i, 0)),
       pl.BlockSpec((None, None, 1, bk), lambda b_, h_, i, j, r: (b_, kv_index(b_, i, j, r), 0,
                                                                  0)),
       q_tile, stat, stat],
      [q_tile], [jax.ShapeDtypeStruct(qt.shape, q.dtype)], [(bq, d)], ranges,
      (qt, kt, vt, qid3, kvid4, dot, _stat_rows(lse, bq), _stat_rows(delta, bq)),
      opts.interpret, "block_causal_dq",
      cost_estimate(opts, "dq", b, h, nq_len, nk_len, d, bq, bk, q.dtype.itemsize))[0]

  bq2, bk2 = opts.block_sizes.dkv
  nq2, nk2 = nq_len // bq2, nk_len // bk2
  ranges = key_tile_ranges(q_ids, kv_ids, bq2, bk2)
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk2)

  def q_index(b_, j, i, r):
    base = (b_ * nk2 + j) * _KV_RANGE_WIDTH
    return _clamp_to_runs(i, [r[base + n] for n in range(6)])

  kv_tile = pl.BlockSpec((None, None, bk2, d), lambda b_, h_, j, i, r: (b_, h_, j, 0))
  q_tile = pl.BlockSpec((None, None, bq2, d),
                        lambda b_, h_, j, i, r: (b_, h_, q_index(b_, j, i, r), 0))
  stat = pl.BlockSpec((None, None, None, 1, bq2),
                      lambda b_, h_, j, i, r: (b_, h_, q_index(b_, j, i, r), 0, 0))
  dk, dv = _tpu_call(
      functools.partial(_tpu_dkv_kernel, scale=opts.sm_scale, nq=nq2, nk=nk2),
      (b, h, nk2, nq2),
      [q_tile, kv_tile, kv_tile,
       pl.BlockSpec((None, bq2, 1), lambda b_, h_, j, i, r: (b_, q_index(b_, j, i, r), 0)),
       pl.BlockSpec((None, None, 1, bk2), lambda b_, h_, j, i, r: (b_, j, 0, 0)),
       q_tile, stat, stat],
      [kv_tile, kv_tile],
      [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      [(bk2, d), (bk2, d)], ranges,
      (qt, kt, vt, qid3, kvid4, dot, _stat_rows(lse, bq2), _stat_rows(delta, bq2)),
      opts.interpret, "block_causal_dkv",
      cost_estimate(opts, "dkv", b, h, nq_len, nk_len, d, bq2, bk2, q.dtype.itemsize))
  return _heads_first(dq), _heads_first(dk), _heads_first(dv)
