"""Tile math shared by every block-id flash kernel: sizes, ranges, cost, per-tile steps.

- `BlockSizes` and `default_block_sizes`: the tiles of a call, per platform by default.
- Tile ranges, computed in XLA from the per-tile min / max ids (`tile_visibility`,
  `query_tile_ranges`, `key_tile_ranges`): which key tiles each query tile visits,
  fully visible (no mask) or partial (masked), and the two runs of query tiles of each
  key tile.
- Cost estimates (`typical_ids`, `visited_tiles`, `cost_estimate`): every launch declares
  a `pl.CostEstimate` (FLOPs, exps and bytes of the tiles it visits, counted with the
  tile ranges on typical ids), so XLA's cost analysis, and the roofline of
  `armd_jax.compile_check`, count the kernels on TPU (jax's Triton lowering drops it).
- The in-kernel tile math (`_forward_step`: one online-softmax update; `_dq_step`,
  `_dkv_step`: the backward updates; float32 statistics and accumulators) and the
  operand layouts the launches of `tpu.py`, `gpu.py` and `fallback.py` share.

The method and the mask are described in docs/method.md and docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from armd_jax.kernels.reference import MASKED_SCORE

# Ids given to padding rows: padded keys are never visible, padded queries see nothing.
_KV_PAD_ID = 2 ** 30
_Q_PAD_ID = -(2 ** 30)
# Ints per program in the range tables: (lo, full_end, hi, 0) per query tile and
# (lo1, c1, end1, lo2, c2, end2, 0, 0) per key tile (powers of two for Triton).
_Q_RANGE_WIDTH = 4
_KV_RANGE_WIDTH = 8


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


def default_block_sizes(backend: str, head_dim: int) -> BlockSizes:
  """The tiles a kernel call without `block_sizes` uses on `backend` ('tpu' or 'gpu').

  TPU: 128 x 128 (Mosaic wants multiples of 128). GPU: the fastest of the H200 tile sweep
  (fwd+bwd at N = 2048, bf16; docs/kernels.md): 64 x 64 for head dims up to 64, and
  128 x 64 (dk/dv pass 64 x 64) above. Every tile divides 128, so inputs padded to 128 fit
  both platforms.
  """
  if backend == "tpu":
    return BlockSizes()
  if backend == "gpu":
    return BlockSizes(64, 64) if head_dim <= 64 else BlockSizes(128, 64, 64, 64)
  raise ValueError(f"default_block_sizes: backend must be 'tpu' or 'gpu', got {backend!r}.")


@dataclasses.dataclass(frozen=True)
class _Options:
  """Static (hashable) settings of one kernel call (block_sizes None: per platform).

  q_segments, q_multiple, kv_len: the unpadded query runs, the tile multiple each run was
  padded to, and the unpadded key count (for the cost estimates; None: one unpadded run).
  """

  block_sizes: BlockSizes | None
  backend: str
  interpret: bool
  sm_scale: float
  schedule: str
  q_segments: Tuple[int, ...] | None = None
  q_multiple: int = 1
  kv_len: int | None = None


# -- tile ranges, in XLA (tiny: [B, nq, nk] booleans at most) ------------------------


def _tile_min_max(ids: jax.Array, block: int) -> Tuple[jax.Array, jax.Array]:
  """ids [B, N] (N a multiple of block) -> per-tile (min, max), each [B, N / block]."""
  b, n = ids.shape
  tiles = ids.reshape(b, n // block, block)
  return tiles.min(-1), tiles.max(-1)


def tile_visibility(q_ids: jax.Array, kv_ids: jax.Array, block_q: int,
                    block_kv: int) -> Tuple[jax.Array, jax.Array]:
  """Which (query tile, key tile) pairs can matter, and which are fully visible.

  Args:
    q_ids: [B, Nq] int, Nq a multiple of block_q (already padded).
    kv_ids: [B, Nk] int, Nk a multiple of block_kv.

  Returns:
    (live, full), bool [B, nq, nk]: live iff some key of tile j is visible to some
    query of tile i (min key id <= max query id); full iff every key of tile j is
    visible to every query of tile i (max key id <= min query id; padding query rows,
    id -2**30, left out). full implies live.
  """
  q_max = _tile_min_max(q_ids, block_q)[1]
  # Padding query rows do not decide fullness: their outputs are dropped, and their zero
  # cotangents add exactly nothing to dk, dv even when a tile runs without the mask.
  q_min = _tile_min_max(jnp.where(q_ids == _Q_PAD_ID, jnp.iinfo(jnp.int32).max, q_ids),
                        block_q)[0]
  kv_min, kv_max = _tile_min_max(kv_ids, block_kv)
  live = kv_min[:, None, :] <= q_max[:, :, None]
  full = (kv_max[:, None, :] <= q_min[:, :, None]) & live
  return live, full


def _first(flags: jax.Array, default) -> jax.Array:
  """Index of the first True along the last axis, `default` where there is none."""
  return jnp.where(flags.any(-1), jnp.argmax(flags, -1), default).astype(jnp.int32)


def _last_plus_one(flags: jax.Array, default) -> jax.Array:
  """1 + index of the last True along the last axis, `default` where there is none."""
  n = flags.shape[-1]
  return jnp.where(flags.any(-1), n - jnp.argmax(flags[..., ::-1], -1), default).astype(
      jnp.int32)


def query_tile_ranges(q_ids: jax.Array, kv_ids: jax.Array, block_q: int,
                      block_kv: int) -> jax.Array:
  """Key-tile ranges of every query tile (forward and dq): int32 [B, nq, 4].

  Row (lo, full_end, hi, 0): key tiles [lo, full_end) are fully visible (no mask),
  [full_end, hi) are partial (masked); every live key tile lies in [lo, hi). An empty
  range is (0, 0, 0). Exact for any ids; with non-decreasing key ids [lo, hi) holds
  live tiles only and [lo, full_end) every fully visible one.
  """
  live, full = tile_visibility(q_ids, kv_ids, block_q, block_kv)
  lo = _first(live, 0)
  hi = _last_plus_one(live, 0)
  j = jnp.arange(live.shape[-1])
  full_end = _first(~full & (j >= lo[..., None]), live.shape[-1])
  full_end = jnp.clip(full_end, lo, hi)
  return jnp.stack([lo, full_end, hi, jnp.zeros_like(lo)], axis=-1)


def key_tile_ranges(q_ids: jax.Array, kv_ids: jax.Array, block_q: int,
                    block_kv: int) -> jax.Array:
  """Query-tile ranges of every key tile (dk/dv): int32 [B, nk, 8].

  Row (lo1, c1, end1, lo2, c2, end2, 0, 0): two runs of query tiles, each partial
  (masked) in [lo, c) and fully visible in [c, end). Run 1 is the first maximal run of
  live query tiles; run 2 spans every later live tile (so it holds the second sorted
  query stream exactly, and is merely masked work for other layouts). Exact for any ids.
  """
  live, full = tile_visibility(q_ids, kv_ids, block_q, block_kv)
  live, full = live.transpose(0, 2, 1), full.transpose(0, 2, 1)  # [B, nk, nq]
  nq = live.shape[-1]
  i = jnp.arange(nq)
  lo1 = _first(live, 0)
  end1 = _first(~live & (i > lo1[..., None]), nq)
  end1 = jnp.where(live.any(-1), end1, 0)
  later = live & (i >= end1[..., None])
  lo2 = _first(later, end1)
  end2 = _last_plus_one(later, end1)

  def masked_end(lo, end):  # 1 + last not-fully-visible tile in [lo, end), else lo
    inside = (i >= lo[..., None]) & (i < end[..., None])
    return jnp.maximum(_last_plus_one(inside & ~full, 0), lo)

  c1, c2 = masked_end(lo1, end1), masked_end(lo2, end2)
  zero = jnp.zeros_like(lo1)
  return jnp.stack([lo1, c1, end1, lo2, c2, end2, zero, zero], axis=-1)


# -- cost estimates (static: XLA's cost analysis and the roofline count the kernels) ---


def typical_ids(q_segments: Sequence[int], q_multiple: int, kv_len: int, nq_len: int,
                nk_len: int) -> Tuple[np.ndarray, np.ndarray]:
  """The ids a cost estimate assumes: tokens in generation order, one token per block.

  Each query run of length L gets ids 0..L-1 and the keys 0..kv_len-1 (ARMD's content
  rows 0..N, query rows 0..N-1 and keys 0..N: its left-to-right order), padded as the
  call pads them. Larger blocks make more tiles live; this is the fewest a sorted layout
  visits, and what the kernel's tile ranges are tight for.

  Returns:
    (q ids [1, nq_len], kv ids [1, nk_len]) int32 numpy arrays.

  Raises:
    ValueError: the padded runs do not add up to nq_len, or kv_len exceeds nk_len.
  """
  parts = []
  for length in q_segments:
    parts += [np.arange(length), np.full(-length % q_multiple, _Q_PAD_ID)]
  q_ids = np.concatenate(parts).astype(np.int32)
  if q_ids.size != nq_len or kv_len > nk_len:
    raise ValueError(f"typical_ids: query runs {tuple(q_segments)} padded to multiples of "
                     f"{q_multiple} give {q_ids.size} rows, not {nq_len} (or kv_len {kv_len} "
                     f"> {nk_len}).")
  kv_ids = np.concatenate([np.arange(kv_len), np.full(nk_len - kv_len, _KV_PAD_ID)])
  return q_ids[None], kv_ids.astype(np.int32)[None]


def visited_tiles(q_ids, kv_ids, block_q: int, block_kv: int, loop: str,
                  schedule: str = "ranges") -> int:
  """(query tile, key tile) pairs one kernel computes, summed over the batch rows.

  Uses the kernels' own tile logic: 'ranges' visits [lo, hi) of `query_tile_ranges` per
  query tile (loop 'kv': forward and dq) or the two runs of `key_tile_ranges` per key tile
  (loop 'q': dk/dv); 'per_tile' computes the live tiles of `tile_visibility`.

  Args:
    q_ids: [B, Nq], kv_ids: [B, Nk] concrete int ids, padded to the tiles.
    loop: 'kv' or 'q', the axis the kernel loops over.
  """
  if loop not in ("kv", "q"):
    raise ValueError(f"visited_tiles: loop must be 'kv' or 'q', got {loop!r}.")
  with jax.ensure_compile_time_eval():
    q_ids, kv_ids = jnp.asarray(q_ids, jnp.int32), jnp.asarray(kv_ids, jnp.int32)
    if schedule == "per_tile":
      return int(np.asarray(tile_visibility(q_ids, kv_ids, block_q, block_kv)[0]).sum())
    if loop == "kv":
      r = np.asarray(query_tile_ranges(q_ids, kv_ids, block_q, block_kv))
      return int((r[..., 2] - r[..., 0]).sum())
    r = np.asarray(key_tile_ranges(q_ids, kv_ids, block_q, block_kv))
    return int((r[..., 2] - r[..., 0] + r[..., 5] - r[..., 3]).sum())


# FLOPs per (query row, key row, head dim) of one computed tile: QK^T and PV (forward);
# QK^T, dO V^T and dS K (dq); QK^T, dO V^T, dS^T Q and P^T dO (dk/dv). 2 per multiply-add.
_FLOPS_PER_ENTRY = {"fwd": 4, "dq": 6, "dkv": 8}


def cost_estimate(opts: _Options, kernel: str, batch: int, heads: int, nq_len: int,
                  nk_len: int, head_dim: int, block_q: int, block_kv: int,
                  itemsize: int) -> pl.CostEstimate:
  """`pl.CostEstimate` of one kernel launch ('fwd', 'dq' or 'dkv') over its visited tiles.

  Tiles are counted with `visited_tiles` on `typical_ids` (the ids are traced, the
  estimate must be static). FLOPs: 4, 6 or 8 x block_q x block_kv x head_dim per tile
  (`_FLOPS_PER_ENTRY`); transcendentals: one exp per score (and per row rescale). Bytes:
  the streamed operand's tiles (K, V and key ids; Q, dO and row statistics for dk/dv)
  once per visited tile, the resident ones (and the outputs) once; the 'per_tile'
  schedule loads the whole streamed row once per program instead.

  Args:
    opts: the call's options (schedule and row layout).
    batch, heads, nq_len, nk_len, head_dim: the padded shapes the launch sees.
    block_q, block_kv: the launch's tiles; itemsize: bytes of a q element.
  """
  if kernel not in _FLOPS_PER_ENTRY:
    raise ValueError(f"cost_estimate: kernel must be one of {tuple(_FLOPS_PER_ENTRY)}, "
                     f"got {kernel!r}.")
  segments = opts.q_segments or (nq_len,)
  q_ids, kv_ids = typical_ids(segments, opts.q_multiple if opts.q_segments else 1,
                              nk_len if opts.kv_len is None else opts.kv_len, nq_len, nk_len)
  loop = "q" if kernel == "dkv" else "kv"
  tiles = visited_tiles(q_ids, kv_ids, block_q, block_kv, loop, opts.schedule) * batch * heads
  per_tile = opts.schedule == "per_tile"
  row = head_dim * itemsize  # bytes of one q/k/v row of one head
  if kernel == "dkv":  # resident: k, v, dk, dv, key ids; streamed: q, dO, lse, delta, ids
    resident = nk_len * (4 * row + 4)
    streamed_tile, streamed_row = block_q * (2 * row + 12), nq_len * (2 * row + 12)
    programs = nk_len // block_kv
  else:  # resident: q, out (fwd: + lse; dq: + dO, lse, delta) and query ids
    resident = nq_len * ((2 * row + 8) if kernel == "fwd" else (3 * row + 12))
    streamed_tile, streamed_row = block_kv * (2 * row + 4), nk_len * (2 * row + 4)
    programs = nq_len // block_q
  streamed = (programs * streamed_row * batch * heads if per_tile else tiles * streamed_tile)
  exps = tiles * block_q * (block_kv + (1 if kernel == "fwd" else 0))
  return pl.CostEstimate(
      flops=int(_FLOPS_PER_ENTRY[kernel] * block_q * block_kv * head_dim * tiles),
      transcendentals=int(exps), bytes_accessed=int(resident * batch * heads + streamed))


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
  """Scaled logits [bq, bk] float32 from q [bq, D], k [bk, D], and the mask.

  With q_ids None the tile is fully visible: no mask arithmetic, mask None.
  """
  s = _dot_nt(q, k) * scale
  if q_ids is None:
    return s, None
  mask = kv_ids <= q_ids  # [1, bk] vs [bq, 1] -> [bq, bk]
  return jnp.where(mask, s, MASKED_SCORE), mask


def _forward_step(carry, q, k, v, q_ids, kv_ids, scale):
  """One online-softmax update of (m [bq,1], l [bq,1], acc [bq,D]) with one key tile."""
  m, l, acc = carry
  s, mask = _scores(q, k, q_ids, kv_ids, scale)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_new)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)  # masked keys contribute exactly 0
  alpha = jnp.exp(m - m_new)
  l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
  acc = alpha * acc + _dot(p.astype(v.dtype), v)
  return m_new, l, acc


def _init_carry(bq: int, d: int):
  return (jnp.full((bq, 1), MASKED_SCORE, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
          jnp.zeros((bq, d), jnp.float32))


def _finish_forward(carry):
  """(out [bq, D] float32, lse row [1, bq]) from the final (m, l, acc)."""
  m, l, acc = carry
  nonempty = l > 0.0  # rows with no visible key -> zeros, never NaN
  safe_l = jnp.where(nonempty, l, 1.0)
  out = jnp.where(nonempty, acc / safe_l, 0.0)
  lse = jnp.where(nonempty, m + jnp.log(safe_l), 0.0)  # [bq, 1]
  return out, lse.reshape(1, acc.shape[0])  # stored as a lane-dense row


def _probs_and_dscores(q, k, v, do, lse, delta, q_ids, kv_ids, scale):
  """Recomputed probabilities p and d(logits) ds [bq, bk] (float32) for one tile pair."""
  s, mask = _scores(q, k, q_ids, kv_ids, scale)
  p = jnp.exp(s - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  dp = _dot_nt(do, v)  # [bq, bk]
  ds = p * (dp - delta)
  return p, ds


def _dq_step(dq, q, k, v, do, lse, delta, q_ids, kv_ids, scale):
  _, ds = _probs_and_dscores(q, k, v, do, lse, delta, q_ids, kv_ids, scale)
  return dq + _dot(ds.astype(k.dtype), k)


def _dkv_step(carry, q, k, v, do, lse, delta, q_ids, kv_ids, scale):
  dk, dv = carry
  p, ds = _probs_and_dscores(q, k, v, do, lse, delta, q_ids, kv_ids, scale)
  return dk + _dot_tn(ds.astype(q.dtype), q), dv + _dot_tn(p.astype(do.dtype), do)


# -- layouts shared by the launches ---------------------------------------------------


def _ids_layout(q_ids, kv_ids, block_kv):
  """q ids [B, Nq] -> [B, Nq, 1]; key ids [B, Nk] -> [B, nk, 1, block_kv] (int32)."""
  b, nk = kv_ids.shape
  return (q_ids.astype(jnp.int32)[:, :, None],
          kv_ids.astype(jnp.int32).reshape(b, nk // block_kv, 1, block_kv))


def _stat_rows(x: jax.Array, tile: int) -> jax.Array:
  """Row statistics [B, H, Nq] float32 -> [B, H, Nq / tile, 1, tile] (one row per tile)."""
  b, h, n = x.shape
  return x.reshape(b, h, n // tile, 1, tile)


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


def _out_shapes(like: jax.Array, shapes) -> list:
  """Output ShapeDtypeStructs varying over the same manual mesh axes as `like`."""
  mat = jax.typeof(like).mat
  return [jax.ShapeDtypeStruct(s.shape, s.dtype, manual_axis_type=mat) for s in shapes]


def _num_warps(head_dim: int) -> int:
  """Triton warps per program: 4 up to head dim 64, 8 above."""
  return 4 if head_dim <= 64 else 8


def _heads_first(x: jax.Array) -> jax.Array:
  return x.transpose(0, 2, 1, 3)  # [B, N, H, D] <-> [B, H, N, D]

