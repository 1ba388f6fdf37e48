"""Block-id flash attention in Pallas: one kernel body, a TPU (Mosaic) and a GPU (Triton) launch.

Query n sees key i iff `kv_ids[i] <= q_ids[n]` (ARMD's masks; the strict mask is the
same call with query ids lowered by one). The kernels never build the [Nq, Nk] mask:
each (query tile, key tile) pair compares the two id vectors in-tile, and a key tile
whose smallest id exceeds the query tile's largest id is skipped entirely (no loads of
K/V, no matmuls), in the forward pass and in both backward passes. That skip is exact
for any ids; it pays off when the ids are non-decreasing along the sequence (tokens
gathered into generation order), where the work becomes the lower block triangle of
causal flash attention. The query ids need not be sorted: ARMD's two streams
(content rows with ids b, query rows with ids b - 1) are two sorted runs concatenated
along the query axis and share one launch; the skip test is per query tile.

Layout inside the kernels: q [B, H, Nq, D], k/v [B, H, Nk, D], q ids [B, Nq, 1], key ids
[B, nk, 1, bk] (one row per key tile); the log-sum-exp and delta are [B, H, Nq] float32
between kernels and enter each kernel as rows [B, H, Nq / t, 1, t] for its query tile t
(lane-dense on TPU; a [.., Nq, 1] column would be padded 128-fold in HBM).
Each program owns one query tile (forward, dq) or one key tile (dk, dv) of one (batch,
head), holds the whole K/V (or Q/dO) row of that (batch, head) in fast memory and
loops over the other axis' tiles. Softmax statistics and accumulators are float32.

Backends:
- 'tpu' (Mosaic): the per-tile id ranges (max query id of every query tile, min key id
  of every key tile) are computed outside the kernel and passed as scalar-prefetch
  operands (SMEM); block sizes must be multiples of 128 (8 for interpret mode).
- 'gpu' (Triton): the same ranges are taken in-tile from the loaded id vectors (a
  cheap min/max); head dims are padded to a power of two >= 16.
- 'auto': `jax.lax.platform_dependent` picks 'tpu' on TPU, 'gpu' on CUDA/ROCm and the
  Pallas interpreter elsewhere (CPU), at lowering time.
`interpret=True` runs the chosen kernel body under the Pallas interpreter on any
platform (the tests do this on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from armd_jax.kernels.reference import check_attention_inputs

# Finite stand-in for -inf (as in the reference): exp(_MASKED - m) underflows to 0.
_MASKED = -1e30
# Ids given to padding rows: padded keys are never visible, padded queries see nothing.
_KV_PAD_ID = 2 ** 30
_Q_PAD_ID = -(2 ** 30)
BACKENDS = ("auto", "tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the kernels.

  Attributes:
    block_q: query rows per tile (forward and dq passes).
    block_kv: key rows per tile (forward and dq passes).
    block_q_dkv: query rows per tile of the dk/dv pass; None means block_q.
    block_kv_dkv: key rows per tile of the dk/dv pass; None means block_kv.
  """

  block_q: int = 128
  block_kv: int = 128
  block_q_dkv: int | None = None
  block_kv_dkv: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}.")

  @property
  def dkv(self) -> Tuple[int, int]:
    """(block_q, block_kv) of the dk/dv pass."""
    return (self.block_q_dkv or self.block_q, self.block_kv_dkv or self.block_kv)


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static (hashable) settings of one kernel call."""

  block_sizes: BlockSizes
  backend: str
  interpret: bool
  sm_scale: float


# -- tile ranges (shared by the TPU scalar-prefetch path, the tests and the docs) -----


def tile_ranges(q_ids: jax.Array, kv_ids: jax.Array, block_q: int,
                block_kv: int) -> Tuple[jax.Array, jax.Array]:
  """Largest query id of every query tile and smallest key id of every key tile.

  Args:
    q_ids: [B, Nq] int, Nq a multiple of block_q (already padded).
    kv_ids: [B, Nk] int, Nk a multiple of block_kv.

  Returns:
    (q_tile_max [B, Nq // block_q], kv_tile_min [B, Nk // block_kv]) int32. Key tile j
    can contribute to query tile i iff kv_tile_min[j] <= q_tile_max[i].
  """
  b, nq = q_ids.shape
  nk = kv_ids.shape[1]
  q_max = q_ids.reshape(b, nq // block_q, block_q).max(-1)
  kv_min = kv_ids.reshape(b, nk // block_kv, block_kv).min(-1)
  return q_max.astype(jnp.int32), kv_min.astype(jnp.int32)


def live_tiles(q_ids: jax.Array, kv_ids: jax.Array,
               block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """Which (query tile, key tile) pairs the forward kernel computes, per batch row.

  Pads exactly as `block_causal_flash_attention` does. Returns bool [B, nq, nk];
  `~live_tiles(...)` are the skipped tiles.
  """
  bq, bk = block_sizes.block_q, block_sizes.block_kv
  q_ids = _pad_axis(q_ids, 1, bq, _Q_PAD_ID)
  kv_ids = _pad_axis(kv_ids, 1, bk, _KV_PAD_ID)
  q_max, kv_min = tile_ranges(q_ids, kv_ids, bq, bk)
  return kv_min[:, None, :] <= q_max[:, :, None]


# -- the tile math, shared by every kernel ---------------------------------------------


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, K] @ b[N, K]^T -> [M, N] float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [K, M]^T @ b [K, N] -> [M, N] float32."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [M, K] @ b [K, N] -> [M, N] float32."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(q, k, q_ids, kv_ids, scale):
  """Masked scaled logits [bq, bk] float32 and the mask, from q [bq, D], k [bk, D]."""
  mask = kv_ids <= q_ids  # [1, bk] vs [bq, 1] -> [bq, bk]
  s = _dot_nt(q, k) * scale
  return jnp.where(mask, s, _MASKED), mask


def _forward_step(carry, q, k, v, q_ids, kv_ids, scale):
  """One online-softmax update of (m [bq,1], l [bq,1], acc [bq,D]) with one key tile."""
  m, l, acc = carry
  s, mask = _scores(q, k, q_ids, kv_ids, scale)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # masked keys contribute exactly 0
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + _dot(p.astype(v.dtype), v)
  return m_new, l, acc


def _probs_and_dscores(q, k, v, do, lse, delta, q_ids, kv_ids, scale):
  """Recomputed probabilities p and d(logits) ds [bq, bk] (float32) for one tile pair."""
  s, mask = _scores(q, k, q_ids, kv_ids, scale)
  p = jnp.where(mask, jnp.exp(s - lse), 0.0)
  dp = _dot_nt(do, v)  # [bq, bk]
  ds = p * (dp - delta)
  return p, ds


# -- kernel bodies (backend-agnostic; `live` decides the skip) ------------------------


def _forward_body(live, q_ref, k_ref, v_ref, qid_ref, kvid_ref, o_ref, lse_ref, *, scale,
                  block_kv, num_kv_tiles):
  """Program (b, h, i): query tile i against every live key tile."""
  q = q_ref[...]  # [bq, D]
  q_ids = qid_ref[...]  # [bq, 1]
  bq, d = q.shape

  def body(j, carry):
    def compute(c):
      start = pl.multiple_of(j * block_kv, block_kv)
      k = k_ref[pl.ds(start, block_kv), :]  # [bk, D]
      v = v_ref[pl.ds(start, block_kv), :]
      return _forward_step(c, q, k, v, q_ids, kvid_ref[j], scale)
    return lax.cond(live(j, q_ids, kvid_ref), compute, lambda c: c, carry)

  init = (jnp.full((bq, 1), _MASKED, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))
  m, l, acc = lax.fori_loop(0, num_kv_tiles, body, init)
  nonempty = l > 0.0  # rows with no visible key -> zeros, never NaN
  safe_l = jnp.where(nonempty, l, 1.0)
  o_ref[...] = jnp.where(nonempty, acc / safe_l, 0.0).astype(o_ref.dtype)
  lse = jnp.where(nonempty, m + jnp.log(safe_l), 0.0)  # [bq, 1]
  lse_ref[...] = lse.reshape(1, bq)  # stored as a lane-dense row


def _dq_body(live, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref, delta_ref,
             dq_ref, *, scale, block_kv, num_kv_tiles):
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
      _, ds = _probs_and_dscores(q, k, v, do, lse, delta, q_ids, kvid_ref[j], scale)
      return dq + _dot(ds.astype(k.dtype), k)
    return lax.cond(live(j, q_ids, kvid_ref), compute, lambda c: c, dq)

  dq = lax.fori_loop(0, num_kv_tiles, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_body(live, q_ref, k_ref, v_ref, qid_ref, kvid_ref, do_ref, lse_ref, delta_ref,
              dk_ref, dv_ref, *, scale, block_q, num_q_tiles):
  """Program (b, h, j): dk, dv of key tile j, looping over live query tiles."""
  k, v = k_ref[...], v_ref[...]  # [bk, D]
  kv_ids = kvid_ref[...]  # [1, bk]

  def body(i, carry):
    def compute(carry):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, :], do_ref[rows, :]
      lse = lse_ref[i].reshape(block_q, 1)  # row i of [nq, 1, bq] -> column [bq, 1]
      delta = delta_ref[i].reshape(block_q, 1)
      p, ds = _probs_and_dscores(q, k, v, do, lse, delta,
                                 qid_ref[rows, :], kv_ids, scale)
      return dk + _dot_tn(ds.astype(q.dtype), q), dv + _dot_tn(p.astype(do.dtype), do)
    return lax.cond(live(i, qid_ref, kv_ids), compute, lambda c: c, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, num_q_tiles, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# -- launches -----------------------------------------------------------------------


def _tpu_kernel(body, axis_of_loop, **kw):
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


def _gpu_kernel(body, axis_of_loop, **kw):
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


def _same_varying_axes(*xs: jax.Array) -> list:
  """Inside `shard_map`: makes every operand vary over the union of their manual axes.

  `pallas_call` (its interpreter in particular) wants operands of one varying type;
  ids typically vary over the batch axis only, q/k/v over batch and heads. Outside
  `shard_map` this is the identity.
  """
  union = frozenset().union(*(jax.typeof(x).mat.varying for x in xs))
  out = []
  for x in xs:
    missing = union - jax.typeof(x).mat.varying
    out.append(lax.pcast(x, tuple(sorted(missing)), to="varying") if missing else x)
  return out


def _call(backend, interpret, kernel_body, axis_of_loop, grid, in_specs, out_specs,
          out_shape, operands, q_ids, kv_ids, block_q, block_kv, body_kwargs, name):
  """Launches one kernel for `backend` ('tpu' | 'gpu')."""
  nq, nk = q_ids.shape[1] // block_q, kv_ids.shape[1] // block_kv
  q_max, kv_min = tile_ranges(q_ids, kv_ids, block_q, block_kv)
  q_max, kv_min, *operands = _same_varying_axes(q_max.reshape(-1), kv_min.reshape(-1),
                                                *operands)
  # Outputs vary over the same manual mesh axes as the (matched) operands; needed for
  # `pallas_call` inside `jax.shard_map(..., check_vma=True)`.
  mat = jax.typeof(operands[0]).mat
  out_shape = [jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat) for s in out_shape]
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    with_prefetch = lambda spec: pl.BlockSpec(  # noqa: E731
        spec.block_shape, lambda *idx, _m=spec.index_map: _m(*idx[:3]))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=grid, in_specs=[with_prefetch(s) for s in in_specs],
        out_specs=[with_prefetch(s) for s in out_specs])
    kernel = _tpu_kernel(kernel_body, axis_of_loop, _nq=nq, _nk=nk, **body_kwargs)
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret, name=name,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel")),
    )(q_max, kv_min, *operands)
  from jax.experimental.pallas import triton as pltr  # pylint: disable=g-import-not-at-top
  kernel = _gpu_kernel(kernel_body, axis_of_loop, **body_kwargs)
  num_warps = 8 if block_q * block_kv >= 128 * 128 else 4
  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      interpret=interpret, name=name,
      compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=2))(*operands)


def _ids_layout(q_ids, kv_ids, block_kv):
  """q ids [B, Nq] -> [B, Nq, 1]; key ids [B, Nk] -> [B, nk, 1, block_kv] (int32)."""
  b, nk = kv_ids.shape
  return (q_ids.astype(jnp.int32)[:, :, None],
          kv_ids.astype(jnp.int32).reshape(b, nk // block_kv, 1, block_kv))


def _stat_rows(x: jax.Array, tile: int) -> jax.Array:
  """Row statistics [B, H, Nq] float32 -> [B, H, Nq / tile, 1, tile] (one row per tile)."""
  b, h, n = x.shape
  return x.reshape(b, h, n // tile, 1, tile)


def _forward(opts: _Options, backend: str, q, k, v, q_ids, kv_ids):
  """Runs the forward kernel. q [B,H,Nq,D] (padded); returns (out, lse [B,H,Nq])."""
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
  out, lse = _call(backend, opts.interpret, _forward_body, "kv", (b, h, nq_len // bq), in_specs,
                   out_specs, out_shape, (q, k, v, qid3, kvid4), q_ids, kv_ids, bq, bk,
                   dict(scale=opts.sm_scale, block_kv=bk, num_kv_tiles=nk_len // bk),
                   "block_causal_fwd")
  return out, lse.reshape(b, h, nq_len)


def _backward(opts: _Options, backend: str, q, k, v, q_ids, kv_ids, lse, delta, do):
  """Runs the dq and dk/dv kernels; returns (dq, dk, dv) in the input dtypes."""
  b, h, nq_len, d = q.shape
  nk_len = k.shape[2]
  bq, bk = opts.block_sizes.block_q, opts.block_sizes.block_kv
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk)
  row_tile = pl.BlockSpec((None, None, bq, d), lambda b_, h_, i_: (b_, h_, i_, 0))
  stat_tile = pl.BlockSpec((None, None, None, 1, bq), lambda b_, h_, i_: (b_, h_, i_, 0, 0))
  whole_kv = pl.BlockSpec((None, None, nk_len, d), lambda b_, h_, i_: (b_, h_, 0, 0))
  dq = _call(
      backend, opts.interpret, _dq_body, "kv", (b, h, nq_len // bq),
      [row_tile, whole_kv, whole_kv, pl.BlockSpec((None, bq, 1), lambda b_, h_, i_: (b_, i_, 0)),
       pl.BlockSpec((None, nk_len // bk, 1, bk), lambda b_, h_, i_: (b_, 0, 0, 0)),
       row_tile, stat_tile, stat_tile],
      [row_tile], [jax.ShapeDtypeStruct(q.shape, q.dtype)],
      (q, k, v, qid3, kvid4, do, _stat_rows(lse, bq), _stat_rows(delta, bq)), q_ids, kv_ids,
      bq, bk,
      dict(scale=opts.sm_scale, block_kv=bk, num_kv_tiles=nk_len // bk), "block_causal_dq")[0]

  bq2, bk2 = opts.block_sizes.dkv
  qid3, kvid4 = _ids_layout(q_ids, kv_ids, bk2)
  whole_q = pl.BlockSpec((None, None, nq_len, d), lambda b_, h_, j_: (b_, h_, 0, 0))
  whole_stat = pl.BlockSpec((None, None, nq_len // bq2, 1, bq2),
                            lambda b_, h_, j_: (b_, h_, 0, 0, 0))
  kv_tile = pl.BlockSpec((None, None, bk2, d), lambda b_, h_, j_: (b_, h_, j_, 0))
  dk, dv = _call(
      backend, opts.interpret, _dkv_body, "q", (b, h, nk_len // bk2),
      [whole_q, kv_tile, kv_tile, pl.BlockSpec((None, nq_len, 1), lambda b_, h_, j_: (b_, 0, 0)),
       pl.BlockSpec((None, None, 1, bk2), lambda b_, h_, j_: (b_, j_, 0, 0)),
       whole_q, whole_stat, whole_stat],
      [kv_tile, kv_tile],
      [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      (q, k, v, qid3, kvid4, do, _stat_rows(lse, bq2), _stat_rows(delta, bq2)), q_ids,
      kv_ids, bq2, bk2,
      dict(scale=opts.sm_scale, block_q=bq2, num_q_tiles=nq_len // bq2), "block_causal_dkv")
  return dq, dk, dv


def _on_platform(opts: _Options, fn, *args):
  """Runs fn(opts, backend, *args) for the backend the options (or the platform) pick."""
  if opts.backend != "auto":
    return fn(opts, opts.backend, *args)
  if opts.interpret:
    return fn(opts, "tpu", *args)
  interpreted = dataclasses.replace(opts, interpret=True)
  return lax.platform_dependent(
      *args,
      tpu=lambda *a: fn(opts, "tpu", *a),
      cuda=lambda *a: fn(opts, "gpu", *a),
      rocm=lambda *a: fn(opts, "gpu", *a),
      default=lambda *a: fn(interpreted, "tpu", *a))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(opts: _Options, q, k, v, q_ids, kv_ids):
  return _on_platform(opts, _forward, q, k, v, q_ids, kv_ids)[0]


def _flash_fwd(opts, q, k, v, q_ids, kv_ids):
  out, lse = _on_platform(opts, _forward, q, k, v, q_ids, kv_ids)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(opts, residuals, do):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, H, Nq]
  dq, dk, dv = _on_platform(opts, _backward, q, k, v, q_ids, kv_ids, lse, delta,
                            do.astype(q.dtype))
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- public wrapper -------------------------------------------------------------------


def _pad_axis(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _tile_rules(backend: str, interpret: bool) -> str:
  """Which tile constraints apply: 'tpu', 'gpu' or 'interpret'.

  For backend 'auto' the platform is only known at lowering time; the default
  backend is the best guess (ahead-of-time compiles for another platform are checked
  by that platform's compiler instead).
  """
  if interpret:
    return "interpret"
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  return "tpu" if platform == "tpu" else "gpu" if platform in ("gpu", "cuda", "rocm") else (
      "interpret")


def _check_block(name: str, value: int, rules: str) -> None:
  if rules == "tpu" and value % 128:
    raise ValueError(f"BlockSizes.{name}={value} must be a multiple of 128 for the TPU kernel.")
  if rules == "gpu" and (value < 16 or value & (value - 1)):
    raise ValueError(f"BlockSizes.{name}={value} must be a power of two >= 16 for the GPU "
                     "kernel.")
  if value % 8:
    raise ValueError(f"BlockSizes.{name}={value} must be a multiple of 8.")


@functools.partial(jax.jit, static_argnames=("block_sizes", "backend", "interpret", "sm_scale"))
def block_causal_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array,
                                 kv_ids: jax.Array, *, block_sizes: BlockSizes | None = None,
                                 backend: str = "auto", interpret: bool = False,
                                 sm_scale: float | None = None) -> jax.Array:
  """Pallas flash attention where query n sees key i iff kv_ids[i] <= q_ids[n].

  Args:
    q: [B, Nq, H, D] queries; k, v: [B, Nk, H, D] (Nq may differ from Nk).
    q_ids: [B, Nq] int block ids (any order; e.g. two sorted streams concatenated).
    kv_ids: [B, Nk] int block ids; tiles are skipped best when non-decreasing.
      All ids must lie strictly between -2**30 and 2**30 (padding sentinels).
    block_sizes: tile sizes; default BlockSizes() (128 x 128).
    backend: 'auto' (by platform at lowering time), 'tpu' (Mosaic) or 'gpu' (Triton).
    interpret: run the kernel under the Pallas interpreter (any platform, slow).
    sm_scale: logit scale; defaults to 1/sqrt(D).

  Returns:
    [B, Nq, H, D] in q.dtype; rows with no visible key are zeros. Differentiable in
    q, k, v through Pallas backward kernels (custom VJP).
  """
  if backend not in BACKENDS:
    raise ValueError(f"block_causal_flash_attention: backend must be one of {BACKENDS}, "
                     f"got {backend!r}.")
  check_attention_inputs("block_causal_flash_attention", q, k, v, q_ids, kv_ids)
  block_sizes = BlockSizes() if block_sizes is None else block_sizes
  rules = _tile_rules(backend, interpret)
  for name, value in zip(("block_q", "block_kv", "block_q_dkv", "block_kv_dkv"),
                         (block_sizes.block_q, block_sizes.block_kv) + block_sizes.dkv):
    _check_block(name, value, rules)
  nq_len, d = q.shape[1], q.shape[-1]
  sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  opts = _Options(block_sizes, backend, interpret, sm_scale)

  bq = np.lcm(block_sizes.block_q, block_sizes.dkv[0])
  bk = np.lcm(block_sizes.block_kv, block_sizes.dkv[1])
  # GPU: tl.dot wants power-of-two head dims >= 16; zero columns change nothing.
  d_pad = max(16, 1 << (d - 1).bit_length()) if backend in ("gpu", "auto") else d
  to_kernel = lambda x, mult: _pad_axis(_pad_axis(x, 1, mult, 0), 3, d_pad, 0).transpose(  # noqa
      0, 2, 1, 3)  # [B, H, N, D]
  out = _flash(opts, to_kernel(q, bq), to_kernel(k, bk), to_kernel(v, bk),
               _pad_axis(q_ids.astype(jnp.int32), 1, bq, _Q_PAD_ID),
               _pad_axis(kv_ids.astype(jnp.int32), 1, bk, _KV_PAD_ID))
  return out.transpose(0, 2, 1, 3)[:, :nq_len, :, :d]
