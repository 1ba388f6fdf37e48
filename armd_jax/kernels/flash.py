"""Block-id flash attention in Pallas: a TPU (Mosaic) and a GPU (Triton) kernel.

Query n sees key i iff `kv_ids[i] <= q_ids[n]` (ARMD's masks; the strict mask is the
same call with query ids lowered by one). The kernels never build the [Nq, Nk] mask.

Control structure ('ranges' schedule, the default), as in splash attention and jax's
flash kernels: XLA computes, from the per-tile min / max ids, for every query tile the
range of key tiles it must visit, split into the fully visible ones (every key visible
to every query of the tile: no mask arithmetic at all) and the partial ones (mask
computed in-tile), and the same for every key tile over query tiles (backward). The
kernels only loop over (GPU) or step through (TPU) those ranges:

- forward and dq, per query tile i: unmasked key tiles [lo, full_end), masked
  [full_end, hi);
- dk/dv, per key tile j: up to two runs of query tiles (one per sorted query stream),
  each masked [lo, c) then unmasked [c, end).

The ranges are exact for any ids (a tile inside a range that turns out dead is computed
under its mask and contributes exactly nothing); they are tight when the key ids are
non-decreasing (tokens in generation order) and the query ids form at most two
non-decreasing runs (ARMD's content rows with ids b and query rows with ids b - 1,
concatenated), each padded to a tile boundary (`q_segments`).

Backends:
- 'tpu' (Mosaic): grid (B, H, q tiles, kv tiles) with the kv (or q, for dk/dv) axis
  'arbitrary' and the accumulators in VMEM scratch; the ranges are scalar-prefetch
  operands (SMEM) and the index maps clamp the streamed axis into the range, so a step
  outside it keeps the previous block (no copy) and does no work. No whole-row
  residency: only one tile of each operand is in VMEM. Layout [B, H, N, D] inside.
- 'gpu' (Triton): grid (q tiles, B, H) (kv tiles for dk/dv); BlockSpecs on the native
  [B, N, H, D] layout (no transposes); the ranges are loaded as 4 or 8 int32 per
  program, and each program runs one `fori_loop` per range kind with no branch around
  the loads; num_warps from the head dim.
- 'auto': `jax.lax.platform_dependent` picks 'tpu' on TPU, 'gpu' on CUDA/ROCm and the
  Pallas interpreter elsewhere (CPU), at lowering time.

Every launch declares a `pl.CostEstimate` (FLOPs, exps and bytes of the tiles it visits,
counted with the tile ranges above on typical ids: `cost_estimate`), so XLA's cost
analysis, and the roofline of `armd_jax.compile_check`, count the kernels on TPU (jax's
Triton lowering drops the estimate).

The previous control structure ('per_tile' schedule: one program per query tile
holding the whole K/V row, a per-tile skip test around every tile) is kept as the
fallback for ids with no useful order. Softmax statistics and accumulators are float32.
`interpret=True` runs the chosen kernel under the Pallas interpreter on any platform.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from armd_jax.kernels.reference import MASKED_SCORE, check_attention_inputs

# Ids given to padding rows: padded keys are never visible, padded queries see nothing.
_KV_PAD_ID = 2 ** 30
_Q_PAD_ID = -(2 ** 30)
BACKENDS = ("auto", "tpu", "gpu")
SCHEDULES = ("ranges", "per_tile")
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


_DEFAULT_PAD = 128  # what inputs are padded to when the tiles are chosen per platform


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


def live_tiles(q_ids: jax.Array, kv_ids: jax.Array,
               block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """Which (query tile, key tile) pairs the forward kernel computes, per batch row.

  Pads exactly as `block_causal_flash_attention` does (one query segment). Returns bool
  [B, nq, nk]; `~live_tiles(...)` are the tiles never loaded nor computed.
  """
  computed, _ = tile_plan(q_ids, kv_ids, block_sizes)
  return computed


def tile_plan(q_ids: jax.Array, kv_ids: jax.Array,
              block_sizes: BlockSizes = BlockSizes()) -> Tuple[jax.Array, jax.Array]:
  """(computed, masked) bool [B, nq, nk] of the forward kernel's 'ranges' schedule.

  computed: the key tiles each query tile visits; masked: those among them that run the
  mask arithmetic (the rest are fully visible and run without it).
  """
  bq, bk = block_sizes.block_q, block_sizes.block_kv
  q_ids = _pad_axis(q_ids.astype(jnp.int32), 1, bq, _Q_PAD_ID)
  kv_ids = _pad_axis(kv_ids.astype(jnp.int32), 1, bk, _KV_PAD_ID)
  ranges = query_tile_ranges(q_ids, kv_ids, bq, bk)
  j = jnp.arange(kv_ids.shape[1] // bk)
  lo, full_end, hi = (ranges[..., n:n + 1] for n in range(3))
  return (j >= lo) & (j < hi), (j >= full_end) & (j < hi)


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


# -- GPU (Triton): loops over the ranges, native [B, N, H, D] layout --------------------


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


# -- TPU (Mosaic): grid over (B, H, tiles, streamed tiles), clamped index maps ----------


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


def _heads_first(x: jax.Array) -> jax.Array:
  return x.transpose(0, 2, 1, 3)  # [B, N, H, D] <-> [B, H, N, D]


def _tpu_forward(opts: _Options, q, k, v, q_ids, kv_ids):
  """As `_gpu_forward`; the kernel runs on [B, H, N, D]."""
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
  """As `_gpu_backward`; the kernels run on [B, H, N, D]."""
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


# -- 'per_tile' schedule: the fallback (whole-row residency, per-tile skip test) --------


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


# -- dispatch and custom VJP -------------------------------------------------------------


def _forward(opts: _Options, backend: str, *args):
  if opts.schedule == "per_tile":
    return _per_tile_forward(opts, backend, *args)
  return (_tpu_forward if backend == "tpu" else _gpu_forward)(opts, *args)


def _backward(opts: _Options, backend: str, *args):
  if opts.schedule == "per_tile":
    return _per_tile_backward(opts, backend, *args)
  return (_tpu_backward if backend == "tpu" else _gpu_backward)(opts, *args)


def _on_platform(opts: _Options, fn, *args):
  """Runs fn(opts, backend, *args) for the backend the options (or the platform) pick,
  with that backend's default tiles where the options leave them to the platform."""
  head_dim = args[0].shape[-1]

  def run(run_opts: _Options, backend: str):
    if run_opts.block_sizes is None:
      run_opts = dataclasses.replace(run_opts,
                                     block_sizes=default_block_sizes(backend, head_dim))
    return lambda *a: fn(run_opts, backend, *a)

  if opts.backend != "auto":
    return run(opts, opts.backend)(*args)
  if opts.interpret:
    return run(opts, "tpu")(*args)
  interpreted = dataclasses.replace(opts, interpret=True)
  return lax.platform_dependent(
      *args, tpu=run(opts, "tpu"), cuda=run(opts, "gpu"), rocm=run(opts, "gpu"),
      default=run(interpreted, "tpu"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(opts: _Options, q, k, v, q_ids, kv_ids):
  return _on_platform(opts, _forward, q, k, v, q_ids, kv_ids)[0]


def _flash_fwd(opts, q, k, v, q_ids, kv_ids):
  out, lse = _on_platform(opts, _forward, q, k, v, q_ids, kv_ids)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(opts, residuals, do):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), do.astype(jnp.float32))
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


def _pad_segments(x: jax.Array, segments: Sequence[int], multiple: int, value) -> jax.Array:
  """Pads each segment of axis 1 to a multiple of `multiple` (then concatenates)."""
  if len(segments) == 1:
    return _pad_axis(x, 1, multiple, value)
  parts, start = [], 0
  for length in segments:
    parts.append(_pad_axis(x[:, start:start + length], 1, multiple, value))
    start += length
  return jnp.concatenate(parts, axis=1)


def _unpad_segments(x: jax.Array, segments: Sequence[int], multiple: int) -> jax.Array:
  """Inverse of `_pad_segments` along axis 1."""
  parts, start = [], 0
  for length in segments:
    parts.append(x[:, start:start + length])
    start += length + (-length % multiple)
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


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


@functools.partial(jax.jit, static_argnames=("block_sizes", "backend", "interpret", "sm_scale",
                                             "schedule", "q_segments"))
def block_causal_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array,
                                 kv_ids: jax.Array, *, block_sizes: BlockSizes | None = None,
                                 backend: str = "auto", interpret: bool = False,
                                 sm_scale: float | None = None, schedule: str = "ranges",
                                 q_segments: Tuple[int, ...] | None = None) -> jax.Array:
  """Pallas flash attention where query n sees key i iff kv_ids[i] <= q_ids[n].

  Args:
    q: [B, Nq, H, D] queries; k, v: [B, Nk, H, D] (Nq may differ from Nk).
    q_ids: [B, Nq] int block ids (any order; best as one or two non-decreasing runs,
      e.g. ARMD's two streams concatenated).
    kv_ids: [B, Nk] int block ids; tiles are skipped best when non-decreasing.
      All ids must lie strictly between -2**30 and 2**30 (padding sentinels).
    block_sizes: tile sizes; None: per platform (`default_block_sizes`: 128 x 128 on
      TPU and in the interpreter, 64-wide tiles on GPU).
    backend: 'auto' (by platform at lowering time), 'tpu' (Mosaic) or 'gpu' (Triton).
    interpret: run the kernel under the Pallas interpreter (any platform, slow).
    sm_scale: logit scale; defaults to 1/sqrt(D).
    schedule: 'ranges' (default: per-tile ranges from XLA, tiled grid on TPU, unmasked
      and masked loops on GPU) or 'per_tile' (the fallback: whole-row residency and a
      per-tile skip test).
    q_segments: lengths of the query runs along Nq (summing to Nq), e.g. (N + 1, N) for
      ARMD's content and query streams; each is padded to a tile boundary on its own so
      that no tile straddles two runs. None: one run.

  Returns:
    [B, Nq, H, D] in q.dtype; rows with no visible key are zeros. Differentiable in
    q, k, v through Pallas backward kernels (custom VJP).
  """
  if backend not in BACKENDS:
    raise ValueError(f"block_causal_flash_attention: backend must be one of {BACKENDS}, "
                     f"got {backend!r}.")
  if schedule not in SCHEDULES:
    raise ValueError(f"block_causal_flash_attention: schedule must be one of {SCHEDULES}, "
                     f"got {schedule!r}.")
  check_attention_inputs("block_causal_flash_attention", q, k, v, q_ids, kv_ids)
  nq_len, d = q.shape[1], q.shape[-1]
  segments = (nq_len,) if q_segments is None else tuple(int(s) for s in q_segments)
  if sum(segments) != nq_len or min(segments) <= 0:
    raise ValueError(f"block_causal_flash_attention: q_segments {q_segments} must be positive "
                     f"and sum to Nq={nq_len}.")
  if block_sizes is None and backend != "auto":
    block_sizes = default_block_sizes(backend, d)
  if block_sizes is None:  # chosen per platform when lowered; valid by construction
    bq = bk = _DEFAULT_PAD
  else:
    rules = _tile_rules(backend, interpret)
    for name, value in zip(("block_q", "block_kv", "block_q_dkv", "block_kv_dkv"),
                           (block_sizes.block_q, block_sizes.block_kv) + block_sizes.dkv):
      _check_block(name, value, rules)
    bq = int(np.lcm(block_sizes.block_q, block_sizes.dkv[0]))
    bk = int(np.lcm(block_sizes.block_kv, block_sizes.dkv[1]))
  sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  opts = _Options(block_sizes, backend, interpret, sm_scale, schedule, segments, bq,
                  k.shape[1])
  # GPU: tl.dot wants power-of-two head dims >= 16; zero columns change nothing.
  d_pad = max(16, 1 << (d - 1).bit_length()) if backend in ("gpu", "auto") else d
  pad_d = lambda x: _pad_axis(x, 3, d_pad, 0)  # noqa: E731
  out = _flash(opts, pad_d(_pad_segments(q, segments, bq, 0)),
               pad_d(_pad_axis(k, 1, bk, 0)), pad_d(_pad_axis(v, 1, bk, 0)),
               _pad_segments(q_ids.astype(jnp.int32), segments, bq, _Q_PAD_ID),
               _pad_axis(kv_ids.astype(jnp.int32), 1, bk, _KV_PAD_ID))
  return _unpad_segments(out, segments, bq)[..., :d]
