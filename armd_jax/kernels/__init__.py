"""Attention kernels with block-id masks (`kv_id <= q_id`).

`block_causal_attention` is the one entry point the model calls; `implementation`
selects the backend.
"""

from __future__ import annotations

import jax

from armd_jax.kernels.reference import block_causal_attention_reference


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array,
                           kv_ids: jax.Array, *, implementation: str = "xla") -> jax.Array:
  """Attention where query n sees key i iff kv_ids[i] <= q_ids[n].

  Args:
    q: [B, Nq, H, D]; k, v: [B, Nk, H, D]; q_ids: [B, Nq]; kv_ids: [B, Nk] (int).
    implementation: 'xla' (jnp reference; materialises the [Nq, Nk] mask).

  Returns:
    [B, Nq, H, D] in q.dtype.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"block_causal_attention: expected q [B, Nq, H, D] and k, v [B, Nk, H, D] "
                     f"with matching B, H, D; got q {q.shape}, k {k.shape}, v {v.shape}.")
  if q_ids.shape != q.shape[:2] or kv_ids.shape != k.shape[:2]:
    raise ValueError(f"block_causal_attention: q_ids must be {q.shape[:2]} and kv_ids "
                     f"{k.shape[:2]}; got {q_ids.shape} and {kv_ids.shape}.")
  if implementation == "xla":
    return block_causal_attention_reference(q, k, v, q_ids, kv_ids)
  raise ValueError(f"block_causal_attention: unknown implementation {implementation!r}.")


__all__ = ["block_causal_attention", "block_causal_attention_reference"]
