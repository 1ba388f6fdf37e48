"""Prefix aggregation: the linear attention that starts ARMD's query stream.

For context rows i (BOS plus the tokens) with PE rows `pe_i` [P], token embeddings
`x_i` [D] and block ids `id_i`, row r's aggregate is

    A[r] = sum_{i: id_i < id_r} <pe_r, pe_i> x_i        count[r] = #{i: id_i < id_r}

(strictly earlier blocks only: tokens of the same block never see each other).
Two implementations with the same result up to float rounding:

- `prefix_aggregate_dense`: any order; materialises a [B, Nq, Nk] weight tensor.
- `prefix_aggregate_chunked`: rows in generation order (ids non-decreasing); O(N)
  memory. Rows are cut into chunks of C; each chunk's sum of outer products
  `pe_i x_i^T` [P, D] is accumulated exclusively over chunks, so a row sees every
  earlier chunk through one [P, D] state and its own chunk through a masked C x C
  product. A block that started in an earlier chunk and carries into this one is the
  only tie that crosses a chunk boundary; its rows use the state of the rows strictly
  below the block's first row instead (`below_block`). Peak memory is O(B N (C + P D / C)).

Both return the aggregate in float32 and the count as int32; the mean is taken by the
caller in float32 (a bfloat16 count rounds above 256).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("dense", "chunked")


def prefix_mean(aggregate: jax.Array, count: jax.Array) -> jax.Array:
  """The float32 mean aggregate [..., D] / max(count, 1) [...] (count exact above 256)."""
  return aggregate.astype(jnp.float32) / jnp.maximum(count, 1).astype(jnp.float32)[..., None]


def prefix_aggregate_dense(q_pe: jax.Array, q_ids: jax.Array, pe: jax.Array, x: jax.Array,
                           ids: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Reference prefix aggregation in any order.

  Args:
    q_pe: [B, Nq, P] PE rows of the queries; q_ids: [B, Nq] int their block ids.
    pe: [B, Nk, P], x: [B, Nk, D], ids: [B, Nk] the context rows.

  Returns:
    (aggregate float32 [B, Nq, D], count int32 [B, Nq]).
  """
  visible = ids[:, None, :] < q_ids[:, :, None]  # [B, Nq, Nk]
  weights = jnp.einsum("bnp,bip->bni", q_pe, pe, preferred_element_type=jnp.float32)
  weights = jnp.where(visible, weights, 0.0).astype(x.dtype)
  aggregate = jnp.einsum("bni,bid->bnd", weights, x, preferred_element_type=jnp.float32)
  return aggregate, visible.sum(-1).astype(jnp.int32)


def prefix_aggregate_chunked(pe: jax.Array, x: jax.Array, ids: jax.Array,
                             chunk: int = 256) -> Tuple[jax.Array, jax.Array]:
  """Prefix aggregation of rows in generation order, with O(N) memory.

  Every row is both a query (with its own PE row) and a context row: the result is
  `prefix_aggregate_dense(pe, ids, pe, x, ids)`.

  Args:
    pe: [B, N, P] PE rows; x: [B, N, D] embeddings; ids: [B, N] int block ids,
      non-decreasing along each row (not checked: the caller sorts them).
    chunk: rows per chunk C (N is padded to a multiple of C).

  Returns:
    (aggregate float32 [B, N, D], count int32 [B, N]).
  """
  if chunk < 1:
    raise ValueError(f"prefix_aggregate_chunked: chunk must be positive, got {chunk}.")
  batch, length = ids.shape
  chunk = min(chunk, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  ids = ids.astype(jnp.int32)
  # Padding rows come last (largest id) and contribute zero vectors.
  padded_ids = jnp.pad(ids, ((0, 0), (0, pad)), constant_values=jnp.iinfo(jnp.int32).max)
  split = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0))).reshape(  # noqa: E731
      batch, num_chunks, chunk, a.shape[-1])
  pc, xc = split(pe), split(x)  # [B, K, C, P], [B, K, C, D]
  idc = padded_ids.reshape(batch, num_chunks, chunk)  # [B, K, C]

  # First row of each row's block (= count of rows with a smaller id), by binary search.
  first = jax.vmap(lambda a: jnp.searchsorted(a, a, side="left"))(padded_ids)  # [B, Np]
  count = first[:, :length].astype(jnp.int32)

  # Exclusive state at each chunk start: sum over earlier chunks of pe_i x_i^T.
  sums = jnp.einsum("bkcp,bkcd->bkpd", pc, xc, preferred_element_type=jnp.float32)
  # (Shifted, not `cumsum - sums`: a chunk's own rows must not enter its state even
  # through rounding, so that strict causality holds bit for bit.)
  before_chunk = jnp.cumsum(jnp.pad(sums[:, :-1], ((0, 0), (1, 0), (0, 0), (0, 0))),
                            axis=1)  # [B, K, P, D]

  # State strictly below the block holding each chunk's first row (that block may have
  # started in an earlier chunk): the state at that block's chunk plus the rows of that
  # chunk which precede the block.
  block_start = first[:, ::chunk]  # [B, K]
  home = block_start // chunk  # [B, K] chunk holding the block's first row
  take = lambda a: jnp.take_along_axis(  # noqa: E731
      a, home.reshape(home.shape + (1,) * (a.ndim - 2)), axis=1)
  rows = home[..., None] * chunk + jnp.arange(chunk)  # [B, K, C] global row index
  head = (rows < block_start[..., None]).astype(pc.dtype)[..., None]  # [B, K, C, 1]
  below_block = take(before_chunk) + jnp.einsum(
      "bkcp,bkcd->bkpd", take(pc) * head, take(xc), preferred_element_type=jnp.float32)

  # Rows of the carried-in block (id equal to the chunk's first id) see `below_block`;
  # the others see everything before the chunk plus the earlier blocks inside it.
  carried = idc == idc[:, :, :1]  # [B, K, C]
  state_term = jnp.where(
      carried[..., None],
      jnp.einsum("bkcp,bkpd->bkcd", pc.astype(jnp.float32), below_block),
      jnp.einsum("bkcp,bkpd->bkcd", pc.astype(jnp.float32), before_chunk))
  weights = jnp.einsum("bkcp,bkjp->bkcj", pc, pc, preferred_element_type=jnp.float32)
  weights = jnp.where(idc[:, :, None, :] < idc[:, :, :, None], weights, 0.0).astype(x.dtype)
  local = jnp.einsum("bkcj,bkjd->bkcd", weights, xc, preferred_element_type=jnp.float32)
  aggregate = (state_term + local).reshape(batch, num_chunks * chunk, -1)[:, :length]
  return aggregate, count
