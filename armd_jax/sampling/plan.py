"""Host-side decoding plans: which positions each model call handles.

A plan turns dense block ids [B, N] (concrete numpy) into fixed-shape slot tables:
model call t of row b handles positions `slots[t, b, :]` (padded with N where the block
is narrower than the call). Consecutive calls of equal width form a *phase*; each phase
is one `lax.scan` in the decoder, so the only static structure is the tuple of
(width, number of calls) per phase: new orders with the same structure reuse the
compiled decoder.

The decoder's caches are laid out in generation order (tokens sorted by block id), so
the block of call t occupies the contiguous cache rows `starts[t, b] + [0, width)`.
When every row has the same starts (`Plan.uniform`: all strided and singleton orders),
one `dynamic_update_slice` writes a block; otherwise the decoder scatters per row.

Visible rows: call t can only see the cache rows of blocks up to its own, the first
`starts[t] + width` rows. On long caches the decoder on XLA:CPU splits a phase into
`SEGMENTS` scans (`Plan.segments`), each of which attends only over the rows its calls
can see instead of the whole cache (about 0.6x the attention work over a sequence at 4
segments).

Prefill: the first `prefill_blocks[b]` blocks of row b (known tokens: a prompt or
infill) can be read by ONE call (`Plan.prefill`, their positions in generation order);
the remaining blocks then follow, call t handling row b's block prefill_blocks[b] + t + 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import numpy as np

from armd_jax import orders

# More phases than this (irregular multi-token orders) fall back to one phase of the
# widest block, so the number of compiled loops stays small.
MAX_PHASES = 4
# A phase of at least SEGMENT_MIN_CALLS calls on caches of at least SEGMENT_MIN_ROWS rows
# runs as SEGMENTS scans that attend over a growing prefix of the cache (more segments
# save more attention and cost more compiled loops).
SEGMENTS = 4
SEGMENT_MIN_CALLS = 16
SEGMENT_MIN_ROWS = 256


@dataclasses.dataclass(frozen=True)
class Phase:
  """`num_calls` consecutive model calls of `width` slots; slots [num_calls, B, width]."""

  width: int
  slots: np.ndarray  # [T, B, W] int32 positions; N marks an empty slot
  starts: np.ndarray  # [T, B] int32 cache row of each call's first slot

  @property
  def num_calls(self) -> int:
    return self.slots.shape[0]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Phases of a decoding order over N positions (see module docstring)."""

  length: int
  phases: Tuple[Phase, ...]
  uniform: bool  # every call starts at the same cache row in every batch row
  prefill: Optional[np.ndarray] = None  # [B, P] positions read by one first call (N = empty)

  @property
  def num_calls(self) -> int:
    return sum(p.num_calls for p in self.phases) + (self.prefill is not None)

  @property
  def structure(self) -> Tuple[Any, ...]:
    """Static (width, num_calls, segments) per phase, the prefill width (0 = none) and
    `uniform`: what the compiled decoder depends on."""
    prefill = 0 if self.prefill is None else self.prefill.shape[1]
    return tuple((p.width, p.num_calls, segments)
                 for p, segments in zip(self.phases, self.segments)) + (prefill, self.uniform)

  @property
  def segments(self) -> Tuple[Tuple[Tuple[int, Optional[int]], ...], ...]:
    """Per phase, its scans as (end call, visible rows): calls [previous end, end) can see
    only the first `visible rows` rows of the upper-half caches (one more of the content
    cache, whose row 0 is BOS); None = the whole cache. Rounded up to a multiple of 8."""
    rows = self.length + self.max_width  # upper-half cache rows
    out = []
    for phase in self.phases:
      if phase.num_calls < SEGMENT_MIN_CALLS or rows < SEGMENT_MIN_ROWS:
        out.append(((phase.num_calls, None),))
        continue
      ends = np.linspace(0, phase.num_calls, SEGMENTS + 1).round().astype(int)[1:]
      segments, begin = [], 0
      for end in ends:
        visible = int((phase.starts[begin:end] + phase.width).max())
        visible = -(-visible // 8) * 8
        segments.append((int(end), visible if visible < rows else None))
        begin = end
      out.append(tuple(segments))
    return tuple(out)

  @property
  def max_width(self) -> int:
    return max([p.width for p in self.phases] +
               [0 if self.prefill is None else self.prefill.shape[1]])


def make_plan(block_ids: np.ndarray, prefill_blocks: Optional[np.ndarray] = None) -> Plan:
  """Plan for dense block ids [B, N]: call t handles every row's block t + 1.

  prefill_blocks: optional int [B]; row b's blocks 1..prefill_blocks[b] are read by one
  first call (the caller guarantees their tokens are known) and call 1 + t handles
  block prefill_blocks[b] + t + 1. Rows may have different numbers of blocks; missing
  blocks are all-empty calls.
  """
  ids = np.asarray(block_ids)
  orders.check_block_ids(ids)
  batch, length = ids.shape
  pre = np.zeros(batch, np.int64) if prefill_blocks is None else np.asarray(prefill_blocks)
  if pre.shape != (batch,) or (pre < 0).any() or (pre > ids.max(axis=1)).any():
    raise ValueError(f"prefill_blocks must be [B={batch}] counts within each row's blocks, "
                     f"got {pre!r}.")
  order = np.argsort(ids, axis=1, kind="stable")  # positions by block, ascending inside
  sorted_rest = np.take_along_axis(ids, order, axis=1) - pre[:, None]  # <= 0: prefill
  prefill_sizes = (sorted_rest <= 0).sum(axis=1)  # [B] tokens read by the prefill call
  num_blocks = int(sorted_rest.max())
  phases, uniform = (), True
  if num_blocks > 0:
    sizes = np.stack([np.bincount(r[r > 0], minlength=num_blocks + 1)[1:]
                      for r in sorted_rest])  # [B, K]
    starts = prefill_sizes[:, None] + np.cumsum(sizes, axis=1) - sizes  # [B, K] cache rows
    widths = sizes.max(axis=0)  # [K]
    table = np.full((num_blocks, batch, int(widths.max())), length, np.int32)
    rows, cols = np.nonzero(sorted_rest > 0)
    block = sorted_rest[rows, cols] - 1
    table[block, rows, cols - starts[rows, block]] = order[rows, cols]
    runs = []  # (width, first call, end call)
    for t, w in enumerate(widths):
      if runs and runs[-1][0] == w:
        runs[-1][2] = t + 1
      else:
        runs.append([int(w), t, t + 1])
    if len(runs) > MAX_PHASES:
      runs = [[int(widths.max()), 0, num_blocks]]
    block_starts = np.ascontiguousarray(starts.T.astype(np.int32))  # [K, B]
    phases = tuple(Phase(w, np.ascontiguousarray(table[a:b, :, :w]), block_starts[a:b])
                   for w, a, b in runs)
    uniform = bool((block_starts == block_starts[:, :1]).all())
  prefill = None
  if prefill_sizes.max() > 0:
    width = int(prefill_sizes.max())
    prefill = np.where(np.arange(width)[None, :] < prefill_sizes[:, None], order[:, :width],
                       length).astype(np.int32)
  return Plan(length, phases, uniform, prefill)


def leading_known_blocks(block_ids: np.ndarray, known: np.ndarray) -> np.ndarray:
  """[B] number of leading blocks of each row whose tokens are all known (prefillable)."""
  ids = np.asarray(block_ids)
  known = np.asarray(known, bool)
  first_unknown = np.where(known, np.iinfo(np.int32).max, ids).min(axis=1)  # [B]
  return np.minimum(first_unknown - 1, ids.max(axis=1)).astype(np.int64)


def conditional_strided_order(known: np.ndarray, streams: int) -> np.ndarray:
  """Dense block ids [B, N]: known positions first, then strided over the unknown ones.

  Known positions (known[b, n] true) get singleton blocks in text order, so the content
  stream reads a prompt exactly as left-to-right training shows it (the decoder reads
  them all in one prefill call). The U unknown positions of a row, in text order, are
  split into S = `streams` contiguous streams whose heads come one per block, then the
  j-th token of every stream together (`orders.conditional_strided`): U/S + S - 1
  blocks. S must divide U (the decoder draws S tokens per call).
  """
  known = np.asarray(known, bool)
  if not isinstance(streams, (int, np.integer)) or streams < 1:
    raise ValueError(f"streams must be a positive int, got {streams!r}.")
  for b, unknown in enumerate(np.sum(~known, axis=-1)):
    if unknown % streams:
      raise ValueError(f"streams={streams} must divide the number of generated positions "
                       f"({unknown} in row {b}); choose a length or prompt so that it does.")
  return orders.conditional_strided(known, int(streams))


def broadcast_rows(array: Optional[np.ndarray], batch: int, name: str) -> Optional[np.ndarray]:
  """[N] or [B, N] -> [B, N] (numpy), with a clear error for other shapes."""
  if array is None:
    return None
  array = np.asarray(array)
  if array.ndim == 1:
    array = np.broadcast_to(array, (batch, array.shape[0]))
  if array.ndim != 2 or array.shape[0] != batch:
    raise ValueError(f"{name} must be [length] or [batch={batch}, length], got shape "
                     f"{array.shape}.")
  return array
