"""Block-id attention in plain jnp: the reference every kernel is tested against.

The mask is a comparison of integer block ids: query n sees key i iff
`kv_ids[i] <= q_ids[n]`. The strictly causal mask of ARMD's query stream is the same
call with the query ids lowered by one. Also holds the shared masking conventions:
`MASKED_SCORE` (the score of a hidden position) and `masked_softmax`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Score of a hidden position. A finite stand-in for -inf: exp(MASKED_SCORE - max)
# underflows to exactly 0 in float32, so a hidden key contributes exactly nothing and
# causality holds bit for bit, while a row with every key hidden computes
# MASKED_SCORE - MASKED_SCORE = 0 instead of -inf - (-inf) = NaN.
MASKED_SCORE = -1e30


def check_attention_inputs(caller: str, q: jax.Array, k: jax.Array, v: jax.Array,
                           q_ids: jax.Array, kv_ids: jax.Array) -> None:
  """Raises ValueError (prefixed by `caller`) unless q [B, Nq, H, D], k = v [B, Nk, H, D],
  q_ids [B, Nq] and kv_ids [B, Nk] agree."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"{caller}: expected q [B, Nq, H, D] and k, v [B, Nk, H, D] with matching "
                     f"B, H, D; got q {q.shape}, k {k.shape}, v {v.shape}.")
  if q_ids.shape != q.shape[:2] or kv_ids.shape != k.shape[:2]:
    raise ValueError(f"{caller}: q_ids must be {q.shape[:2]} and kv_ids {k.shape[:2]}; got "
                     f"{q_ids.shape} and {kv_ids.shape}.")


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
  """Softmax of float32 `scores` over the last axis, counting only `visible` positions.

  Args:
    scores: [..., N] float32 scores, already scaled.
    visible: bool, broadcastable to `scores`; False hides a position.

  Returns:
    [..., N] float32 probabilities; hidden positions are exactly 0, and a row with no
    visible position is all zeros (never NaN).
  """
  scores = jnp.where(visible, scores, MASKED_SCORE)
  weights = jnp.where(visible, jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)), 0.0)
  return weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-30)


def block_causal_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                                     q_ids: jax.Array, kv_ids: jax.Array,
                                     *, sm_scale: float | None = None) -> jax.Array:
  """Softmax attention where query n attends to key i iff kv_ids[i] <= q_ids[n].

  Args:
    q: [B, Nq, H, D] queries.
    k: [B, Nk, H, D] keys.
    v: [B, Nk, H, D] values.
    q_ids: [B, Nq] int block ids of the queries.
    kv_ids: [B, Nk] int block ids of the keys.
    sm_scale: logit scale; defaults to 1/sqrt(D).

  Returns:
    [B, Nq, H, D] in q.dtype. Softmax statistics are float32. A query row with no
    visible key returns zeros (never NaN).
  """
  if sm_scale is None:
    sm_scale = q.shape[-1] ** -0.5
  mask = kv_ids[:, None, :] <= q_ids[:, :, None]  # [B, Nq, Nk]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  probs = masked_softmax(logits * sm_scale, mask[:, None])  # empty rows -> zeros
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)
