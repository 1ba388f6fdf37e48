"""Attention kernels with block-id masks (`kv_id <= q_id`).

`block_causal_attention` is the one entry point the model calls; `implementation`
selects the backend: 'xla' (the jnp reference, materialises the mask) or 'pallas'
(`flash.block_causal_flash_attention`: Pallas flash attention for TPU and GPU with
in-tile masks, tile skipping and Pallas backward kernels). `flash.py` holds the entry,
dispatch and custom VJP; `tiles.py` the shared tile math; `tpu.py`, `gpu.py` and
`fallback.py` the kernels; `reference.py` the jnp reference.
"""

from __future__ import annotations

import jax

from armd_jax.kernels.flash import block_causal_flash_attention, live_tiles, tile_plan
from armd_jax.kernels.reference import (block_causal_attention_reference,
                                        check_attention_inputs)
from armd_jax.kernels.tiles import BlockSizes, default_block_sizes

IMPLEMENTATIONS = ("xla", "pallas")


def block_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array,
                           kv_ids: jax.Array, *, implementation: str = "xla",
                           block_sizes: BlockSizes | None = None, backend: str = "auto",
                           interpret: bool = False,
                           q_segments: tuple[int, ...] | None = None) -> jax.Array:
  """Attention where query n sees key i iff kv_ids[i] <= q_ids[n].

  Args:
    q: [B, Nq, H, D]; k, v: [B, Nk, H, D]; q_ids: [B, Nq]; kv_ids: [B, Nk] (int).
    implementation: 'xla' (jnp reference; materialises the [Nq, Nk] mask) or 'pallas'
      (flash kernel; the remaining arguments apply to it only).
    block_sizes: Pallas tile sizes (None: per platform, `default_block_sizes`).
    backend: Pallas backend, 'auto' (by platform), 'tpu' or 'gpu'.
    interpret: run the Pallas kernel under the interpreter (CPU tests).
    q_segments: lengths of the sorted query runs along Nq (e.g. ARMD's content and
      query streams); the kernel pads each to a tile boundary. Ignored by 'xla'.

  Returns:
    [B, Nq, H, D] in q.dtype.
  """
  check_attention_inputs("block_causal_attention", q, k, v, q_ids, kv_ids)
  if implementation == "xla":
    return block_causal_attention_reference(q, k, v, q_ids, kv_ids)
  if implementation == "pallas":
    return block_causal_flash_attention(q, k, v, q_ids, kv_ids, block_sizes=block_sizes,
                                        backend=backend, interpret=interpret,
                                        q_segments=q_segments)
  raise ValueError(f"block_causal_attention: unknown implementation {implementation!r}; "
                   f"expected one of {IMPLEMENTATIONS}.")


__all__ = ["BlockSizes", "IMPLEMENTATIONS", "block_causal_attention",
           "block_causal_attention_reference", "block_causal_flash_attention",
           "default_block_sizes", "live_tiles", "tile_plan"]
