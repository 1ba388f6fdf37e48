"""The GPU (Triton) launches of the 'ranges' schedule: loops over the tile ranges.

Grid (q tiles, B, H) (kv tiles for dk/dv); BlockSpecs on the native [B, N, H, D]
layout (no transposes); the ranges of `tiles.query_tile_ranges` / `key_tile_ranges` are
loaded as 4 or 8 int32 per program, and each program runs one `fori_loop` per range kind
(unmasked, masked) with no branch around the loads; num_warps from the head dim. Wide
rows get smaller tiles (`_gpu_tiles`).
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from armd_jax.kernels.tiles import (_KV_RANGE_WIDTH, _Q_RANGE_WIDTH, _dkv_step, _dq_step,
                                    _finish_forward, _forward_step, _ids_layout,
                                    _init_carry, _num_warps, _Options, _out_shapes,
                                    _same_varying_axes, _stat_rows, cost_estimate,
                                    key_tile_ranges, query_tile_ranges)


def _gpu_loop(start, stop, step, carry):
  return lax.fori_loop(start, stop, step, carry)


def _gpu_forward_kernel(r_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, o_ref, lse_ref, *,
                        scale, block_kv):
  """Program (i, b, h): query tile i against its key tiles, unmasked then masked."""
  lo, full_end, hi = r_ref[0], r_ref[1], r_ref[2]
  q = q_ref[...]  # [bq, D]
  q_ids = qid_ref[...]  # [bq, 1]

  def step(masked):
    def body(j, carry):
      rows = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
      k, v = k_ref[rows, :], v_ref[rows, :]
      if not masked:
        return _forward_step(carry, q, k, v, None, None, scale)
      return _forward_step(carry, q, k, v, q_ids, kvid_ref[j], scale)
    return body

  carry = _gpu_loop(lo, full_end, step(False), _init_carry(*q.shape))
  carry = _gpu_loop(full_end, hi, step(True), carry)
  out, lse = _finish_forward(carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _gpu_dq_kernel(r_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref, delta_ref,
                   dq_ref, *, scale, block_kv):
  """Program (i, b, h): dq of query tile i over its key tiles."""
  lo, full_end, hi = r_ref[0], r_ref[1], r_ref[2]
  q, do = q_ref[...], do_ref[...]
  q_ids = qid_ref[...]
  lse = lse_ref[...].reshape(q.shape[0], 1)  # row [1, bq] -> column [bq, 1]
  delta = delta_ref[...].reshape(q.shape[0], 1)

  def step(masked):
    def body(j, dq):
      rows = pl.ds(pl.multiple_of(j * block_kv, block_kv), block_kv)
      k, v = k_ref[rows, :], v_ref[rows, :]
      ids = (q_ids, kvid_ref[j]) if masked else (None, None)
      return _dq_step(dq, q, k, v, do, lse, delta, *ids, scale)
    return body

  dq = _gpu_loop(lo, full_end, step(False), jnp.zeros(q.shape, jnp.float32))
  dq = _gpu_loop(full_end, hi, step(True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _gpu_dkv_kernel(r_ref, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref, delta_ref,
                    dk_ref, dv_ref, *, scale, block_q):
  """Program (j, b, h): dk, dv of key tile j over its two runs of query tiles."""
  k, v = k_ref[...], v_ref[...]  # [bk, D]
  kv_ids = kvid_ref[...]  # [1, bk]

  def step(masked):
    def body(i, carry):
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, :], do_ref[rows, :]
      lse = lse_ref[i].reshape(block_q, 1)  # row i of [nq, 1, bq] -> column [bq, 1]
      delta = delta_ref[i].reshape(block_q, 1)
      ids = (qid_ref[rows, :], kv_ids) if masked else (None, None)
      return _dkv_step(carry, q, k, v, do, lse, delta, *ids, scale)
    return body

  zeros = jnp.zeros(k.shape, jnp.float32)
  carry = (zeros, zeros)
  for run in range(2):
    lo, c, end = r_ref[3 * run], r_ref[3 * run + 1], r_ref[3 * run + 2]
    carry = _gpu_loop(lo, c, step(True), carry)
    carry = _gpu_loop(c, end, step(False), carry)
  dk, dv = carry
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _gpu_tiles(opts: _Options, q: jax.Array) -> Tuple[Tuple[int, int], Tuple[int, int], int]:
  """(fwd/dq tiles, dk/dv tiles, num_stages) of the Triton launch for q's dtype and head dim.

  Wide rows (float32 with head dim > 64, or head dim > 128) halve every tile of 32 rows
  or more (the padded lengths stay multiples) and use one pipeline stage, so that the tiles
  fit the H100's 227 KiB of shared memory (seen: float32, D=128, 128 x 64 tiles asked for
  289 KiB).
  """
  sizes = opts.block_sizes
  if q.dtype.itemsize * q.shape[-1] <= 256:
    return (sizes.block_q, sizes.block_kv), sizes.dkv, 2
  half = lambda t: t // 2 if t >= 32 else t  # noqa: E731
  return ((half(sizes.block_q), half(sizes.block_kv)),
          (half(sizes.dkv[0]), half(sizes.dkv[1])), 1)


def _gpu_call(kernel, grid, in_specs, out_specs, out_shapes, operands, head_dim, interpret,
              name, num_stages=2, cost=None):
  from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
  operands = _same_varying_axes(*operands)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=_out_shapes(operands[1], out_shapes), interpret=interpret, name=name,
      cost_estimate=cost,
      compiler_params=pltr.CompilerParams(num_warps=_num_warps(head_dim),
                                          num_stages=num_stages))(*operands)


def _gpu_forward(opts: _Options, q, k, v, q_ids, kv_ids):
  """q [B, Nq, H, D], k/v [B, Nk, H, D] (padded) -> (out, lse [B, H, Nq])."""
  b, nq_len, h, d = q.shape
  nk_len = k.shape[1]
  (bq, bk), _, stages = _gpu_tiles(opts, q)
  ranges = query_tile_ranges(q_ids, kv_ids, bq, bk)
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk)
  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  whole_kv = pl.BlockSpec((None, nk_len, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
  in_specs = [pl.BlockSpec((None, None, _Q_RANGE_WIDTH), lambda i, b_, h_: (b_, i, 0)),
              q_tile, whole_kv, whole_kv,
              pl.BlockSpec((None, bq, 1), lambda i, b_, h_: (b_, i, 0)),
              pl.BlockSpec((None, nk_len // bk, 1, bk), lambda i, b_, h_: (b_, 0, 0, 0))]
  out_specs = [q_tile, pl.BlockSpec((None, None, None, 1, bq),
                                    lambda i, b_, h_: (b_, h_, i, 0, 0))]
  out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((b, h, nq_len // bq, 1, bq), jnp.float32)]
  kernel = functools.partial(_gpu_forward_kernel, scale=opts.sm_scale, block_kv=bk)
  out, lse = _gpu_call(kernel, (nq_len // bq, b, h), in_specs, out_specs, out_shapes,
                       (ranges, q, k, v, qid3, kvid4), d, opts.interpret, "block_causal_fwd",
                       stages, cost_estimate(opts, "fwd", b, h, nq_len, nk_len, d, bq, bk,
                                             q.dtype.itemsize))
  return out, lse.reshape(b, h, nq_len)


def _gpu_backward(opts: _Options, q, k, v, q_ids, kv_ids, lse, delta, do):
  """dq, dk, dv (input dtypes) on the native layout; lse, delta [B, H, Nq] float32."""
  b, nq_len, h, d = q.shape
  nk_len = k.shape[1]
  (bq, bk), (bq2, bk2), stages = _gpu_tiles(opts, q)
  ranges = query_tile_ranges(q_ids, kv_ids, bq, bk)
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk)
  q_tile = pl.BlockSpec((None, bq, None, d), lambda i, b_, h_: (b_, i, h_, 0))
  stat_tile = pl.BlockSpec((None, None, None, 1, bq), lambda i, b_, h_: (b_, h_, i, 0, 0))
  whole_kv = pl.BlockSpec((None, nk_len, None, d), lambda i, b_, h_: (b_, 0, h_, 0))
  dq = _gpu_call(
      functools.partial(_gpu_dq_kernel, scale=opts.sm_scale, block_kv=bk),
      (nq_len // bq, b, h),
      [pl.BlockSpec((None, None, _Q_RANGE_WIDTH), lambda i, b_, h_: (b_, i, 0)),
       q_tile, whole_kv, whole_kv, pl.BlockSpec((None, bq, 1), lambda i, b_, h_: (b_, i, 0)),
       pl.BlockSpec((None, nk_len // bk, 1, bk), lambda i, b_, h_: (b_, 0, 0, 0)),
       q_tile, stat_tile, stat_tile],
      [q_tile], [jax.ShapeDtypeStruct(q.shape, q.dtype)],
      (ranges, q, k, v, qid3, kvid4, do, _stat_rows(lse, bq), _stat_rows(delta, bq)), d,
      opts.interpret, "block_causal_dq", stages,
      cost_estimate(opts, "dq", b, h, nq_len, nk_len, d, bq, bk, q.dtype.itemsize))[0]

  ranges = key_tile_ranges(q_ids, kv_ids, bq2, bk2)
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk2)
  whole_q = pl.BlockSpec((None, nq_len, None, d), lambda j, b_, h_: (b_, 0, h_, 0))
  whole_stat = pl.BlockSpec((None, None, nq_len // bq2, 1, bq2),
                            lambda j, b_, h_: (b_, h_, 0, 0, 0))
  kv_tile = pl.BlockSpec((None, bk2, None, d), lambda j, b_, h_: (b_, j, h_, 0))
  dk, dv = _gpu_call(
      functools.partial(_gpu_dkv_kernel, scale=opts.sm_scale, block_q=bq2),
      (nk_len // bk2, b, h),
      [pl.BlockSpec((None, None, _KV_RANGE_WIDTH), lambda j, b_, h_: (b_, j, 0)),
       whole_q, kv_tile, kv_tile, pl.BlockSpec((None, nq_len, 1), lambda j, b_, h_: (b_, 0, 0)),
       pl.BlockSpec((None, None, 1, bk2), lambda j, b_, h_: (b_, j, 0, 0)),
       whole_q, whole_stat, whole_stat],
      [kv_tile, kv_tile],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      (ranges, q, k, v, qid3, kvid4, do, _stat_rows(lse, bq2), _stat_rows(delta, bq2)), d,
      opts.interpret, "block_causal_dkv", stages,
      cost_estimate(opts, "dkv", b, h, nq_len, nk_len, d, bq2, bk2, q.dtype.itemsize))
  return dq, dk, dv
