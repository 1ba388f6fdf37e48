"""The 'per_tile' schedule: the fallback for ids with no useful order, TPU and GPU.

The previous control structure: one program per query tile (per key tile for dk/dv)
holding the whole K/V (Q) row, looping over every tile with a skip test (min key id <=
max query id) around each. Tile math and cost estimates as in `tiles.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from armd_jax.kernels.tiles import (_dkv_step, _dq_step, _finish_forward, _forward_step,
                                    _heads_first, _ids_layout, _init_carry, _num_warps,
                                    _Options, _out_shapes, _same_varying_axes, _stat_rows,
                                    _tile_min_max, cost_estimate)


def _per_tile_forward_body(live, q_ref, k_ref, v_ref, qid_ref, kvid_ref, o_ref, lse_ref, *,
                           scale, block_kv, num_kv_tiles):
  """Program (b, h, i): query tile i against every live key tile."""
  q = q_ref[...]  # [bq, D]
  q_ids = qid_ref[...]  # [bq, 1]

  def body(j, carry):
    def compute(c):
      start = pl.multiple_of(j * block_kv, block_kv)
      k = k_ref[pl.ds(start, block_kv), :]  # [bk, D]
      v = v_ref[pl.ds(start, block_kv), :]
      return _forward_step(c, q, k, v, q_ids, kvid_ref[j], scale)
    return lax.cond(live(j, q_ids, kvid_ref), compute, lambda c: c, carry)

  out, lse = _finish_forward(lax.fori_loop(0, num_kv_tiles, body, _init_carry(*q.shape)))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def _per_tile_dq_body(live, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref,
                      delta_ref, dq_ref, *, scale, block_kv, num_kv_tiles):
  """Program (b, h, i): dq of query tile i, looping over live key tiles."""
  q, do = q_ref[...], do_ref[...]
  q_ids = qid_ref[...]
  lse = lse_ref[...].reshape(q.shape[0], 1)  # row [1, bq] -> column [bq, 1]
  delta = delta_ref[...].reshape(q.shape[0], 1)

  def body(j, dq):
    def compute(dq):
      start = pl.multiple_of(j * block_kv, block_kv)
      k = k_ref[pl.ds(start, block_kv), :]
      v = v_ref[pl.ds(start, block_kv), :]
      return _dq_step(dq, q, k, v, do, lse, delta, q_ids, kvid_ref[j], scale)
    return lax.cond(live(j, q_ids, kvid_ref), compute, lambda c: c, dq)

  dq = lax.fori_loop(0, num_kv_tiles, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _per_tile_dkv_body(live, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref,
                       delta_ref, dk_ref, dv_ref, *, scale, block_q, num_q_tiles):
  """Program (b, h, j): dk, dv of key tile j, looping over live query tiles."""
  k, v = k_ref[...], v_ref[...]  # [bk, D]
  kv_ids = kvid_ref[...]  # [1, bk]

  def body(i, carry):
    def compute(carry):
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, :], do_ref[rows, :]
      lse = lse_ref[i].reshape(block_q, 1)  # row i of [nq, 1, bq] -> column [bq, 1]
      delta = delta_ref[i].reshape(block_q, 1)
      return _dkv_step(carry, q, k, v, do, lse, delta, qid_ref[rows, :], kv_ids, scale)
    return lax.cond(live(i, qid_ref, kv_ids), compute, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, num_q_tiles, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _per_tile_tpu_kernel(body, axis_of_loop, **kw):
  """Adapts a body to the TPU signature (two scalar-prefetch SMEM refs first)."""

  def kernel(q_max_ref, kv_min_ref, *refs):
    b, tile = pl.program_id(0), pl.program_id(2)
    nq, nk = kw["_nq"], kw["_nk"]
    if axis_of_loop == "kv":  # forward / dq: fixed query tile, loop over key tiles
      q_max = q_max_ref[b * nq + tile]
      live = lambda j, *_: kv_min_ref[b * nk + j] <= q_max  # noqa: E731
    else:  # dkv: fixed key tile, loop over query tiles
      kv_min = kv_min_ref[b * nk + tile]
      live = lambda i, *_: kv_min <= q_max_ref[b * nq + i]  # noqa: E731
    body(live, *refs, **{k: v for k, v in kw.items() if not k.startswith("_")})

  return kernel


def _per_tile_gpu_kernel(body, axis_of_loop, **kw):
  """Adapts a body to the GPU signature: tile ranges from the loaded id vectors."""

  def kernel(*refs):
    if axis_of_loop == "kv":
      def live(j, q_ids, kvid_ref):
        return jnp.min(kvid_ref[j]) <= jnp.max(q_ids)
    else:
      block_q = kw["block_q"]

      def live(i, qid_ref, kv_ids):
        rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        return jnp.min(kv_ids) <= jnp.max(qid_ref[rows, :])
    body(live, *refs, **{k: v for k, v in kw.items() if not k.startswith("_")})

  return kernel


def _per_tile_call(backend, interpret, kernel_body, axis_of_loop, grid, in_specs, out_specs,
                   out_shape, operands, q_ids, kv_ids, block_q, block_kv, body_kwargs, name,
                   cost=None):
  """Launches one per-tile kernel for `backend` ('tpu' | 'gpu')."""
  nq, nk = q_ids.shape[1] // block_q, kv_ids.shape[1] // block_kv
  q_max = _tile_min_max(q_ids, block_q)[1].astype(jnp.int32)
  kv_min = _tile_min_max(kv_ids, block_kv)[0].astype(jnp.int32)
  q_max, kv_min, *operands = _same_varying_axes(q_max.reshape(-1), kv_min.reshape(-1),
                                                *operands)
  out_shape = _out_shapes(operands[0], out_shape)
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    with_prefetch = lambda spec: pl.BlockSpec(  # noqa: E731
        spec.block_shape, lambda *idx, _m=spec.index_map: _m(*idx[:3]))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=grid, in_specs=[with_prefetch(s) for s in in_specs],
        out_specs=[with_prefetch(s) for s in out_specs])
    kernel = _per_tile_tpu_kernel(kernel_body, axis_of_loop, _nq=nq, _nk=nk, **body_kwargs)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret, name=name,
        cost_estimate=cost, compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")),
    )(q_max, kv_min, *operands)
  from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
  kernel = _per_tile_gpu_kernel(kernel_body, axis_of_loop, **body_kwargs)
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=interpret, name=name, cost_estimate=cost,
      compiler_params=pltr.CompilerParams(num_warps=_num_warps(operands[0].shape[-1]),
                                          num_stages=2))(*operands)


def _per_tile_forward(opts: _Options, backend: str, q, k, v, q_ids, kv_ids):
  """Per-tile forward on the native layout (transposed to [B, H, N, D] inside)."""
  q, k, v = (_heads_first(x) for x in (q, k, v))
  b, h, nq_len, d = q.shape
  nk_len = k.shape[2]
  bq, bk = opts.block_sizes.block_q, opts.block_sizes.block_kv
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk)
  q_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i_: (b_, h_, i_, 0))
  whole_kv = pl.BlockSpec((None, None, nk_len, d), lambda b_, h_, i_: (b_, h_, 0, 0))
  in_specs = [q_tile, whole_kv, whole_kv,
              pl.BlockSpec((None, bq, 1), lambda b_, h_, i_: (b_, i_, 0)),
              pl.BlockSpec((None, nk_len // bk, 1, bk), lambda b_, h_, i_: (b_, 0, 0, 0))]
  out_specs = [q_tile, pl.BlockSpec((None, None, None, 1, bq),
                                    lambda b_, h_, i_: (b_, h_, i_, 0, 0))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, h, nq_len // bq, 1, bq), jnp.float32)]
  out, lse = _per_tile_call(backend, opts.interpret, _per_tile_forward_body, "kv",
                            (b, h, nq_len // bq), in_specs, out_specs, out_shape,
                            (q, k, v, qid3, kvid4), q_ids, kv_ids, bq, bk,
                            dict(scale=opts.sm_scale, block_kv=bk, num_kv_tiles=nk_len // bk),
                            "block_causal_fwd_per_tile",
                            cost_estimate(opts, "fwd", b, h, nq_len, nk_len, d, bq, bk,
                                          q.dtype.itemsize))
  return _heads_first(out), lse.reshape(b, h, nq_len)


def _per_tile_backward(opts: _Options, backend: str, q, k, v, q_ids, kv_ids, lse, delta, do):
  """Per-tile dq and dk/dv kernels; returns (dq, dk, dv) on the native layout."""
  q, k, v, do = (_heads_first(x) for x in (q, k, v, do))
  b, h, nq_len, d = q.shape
  nk_len = k.shape[2]
  bq, bk = opts.block_sizes.block_q, opts.block_sizes.block_kv
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk)
  row_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i_: (b_, h_, i_, 0))
  stat_tile = pl.BlockSpec((None, None, None, 1, bq), lambda b_, h_, i_: (b_, h_, i_, 0, 0))
  whole_kv = pl.BlockSpec((None, None, nk_len, d), lambda b_, h_, i_: (b_, h_, 0, 0))
  dq = _per_tile_call(
      backend, opts.interpret, _per_tile_dq_body, "kv", (b, h, nq_len // bq),
      [row_tile, whole_kv, whole_kv, pl.BlockSpec((None, bq, 1), lambda b_, h_, i_: (b_, i_, 0)),
       pl.BlockSpec((None, nk_len // bk, 1, bk), lambda b_, h_, i_: (b_, 0, 0, 0)),
       row_tile, stat_tile, stat_tile],
      [row_tile], [jax.ShapeDtypeStruct(q.shape, q.dtype)],
      (q, k, v, qid3, kvid4, do, _stat_rows(lse, bq), _stat_rows(delta, bq)), q_ids, kv_ids,
      bq, bk, dict(scale=opts.sm_scale, block_kv=bk, num_kv_tiles=nk_len // bk),
      "block_causal_dq_per_tile",
      cost_estimate(opts, "dq", b, h, nq_len, nk_len, d, bq, bk, q.dtype.itemsize))[0]

  bq2, bk2 = opts.block_sizes.dkv
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk2)
  whole_q = pl.BlockSpec((None, None, nq_len, d), lambda b_, h_, j_: (b_, h_, 0, 0))
  whole_stat = pl.BlockSpec((None, None, nq_len // bq2, 1, bq2),
                            lambda b_, h_, j_: (b_, h_, 0, 0, 0))
  kv_tile = pl.BlockSpec((None, None, bk2, d), lambda b_, h_, j_: (b_, h_, j_, 0))
  dk, dv = _per_tile_call(
      backend, opts.interpret, _per_tile_dkv_body, "q", (b, h, nk_len // bk2),
      [whole_q, kv_tile, kv_tile, pl.BlockSpec((None, nq_len, 1), lambda b_, h_, j_: (b_, 0, 0)),
       pl.BlockSpec((None, None, 1, bk2), lambda b_, h_, j_: (b_, j_, 0, 0)),
       whole_q, whole_stat, whole_stat],
      [kv_tile, kv_tile],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      (q, k, v, qid3, kvid4, do, _stat_rows(lse, bq2), _stat_rows(delta, bq2)), q_ids,
      kv_ids, bq2, bk2, dict(scale=opts.sm_scale, block_q=bq2, num_q_tiles=nq_len // bq2),
      "block_causal_dkv_per_tile",
      cost_estimate(opts, "dkv", b, h, nq_len, nk_len, d, bq2, bk2, q.dtype.itemsize))
  return _heads_first(dq), _heads_first(dk), _heads_first(dv)
