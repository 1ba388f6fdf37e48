"""The autoregressive baseline: a plain causal GPT built from ARMD's own `Block`.

A GPT with a start token is exactly "a content stream over [BOS, x_0 .. x_{N-2}] with
block ids = positions": row j holds BOS (j = 0) or x_{j-1}, has id j and RoPE position j,
and sees rows 0..j through the same `kv_id <= q_id` attention mask the ARMD layers use.
Its output at row n predicts `tokens[n]`, the same convention as `ARMD` (logits[n] is
the distribution of tokens[n] itself), so losses, metrics and evaluation code are shared.
This equals ARMD with left-to-right singleton blocks in meaning (both give the exact
left-to-right likelihood) but not in weights; see `tests/test_baselines.py` for a
checkpoint on which the two are the same function.
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.models.config import ModelConfig
from armd_jax.models.layers import (ACTIVATION, Block, add_positions, check_tokens, layer_norm,
                                    output_head, position_table, start_embedding,
                                    token_embedding, vocab_logits)


def check_left_to_right(block_ids, shape) -> None:
  """Raises ValueError if concrete `block_ids` are not increasing along each row."""
  if block_ids is None or isinstance(block_ids, jax.core.Tracer):
    return
  ids = np.asarray(block_ids)
  if ids.shape != tuple(shape):
    raise ValueError(f"block_ids shape {ids.shape} must equal tokens shape {tuple(shape)}.")
  if ids.shape[1] > 1 and np.any(np.diff(ids, axis=1) < 0):
    raise ValueError("an 'ar' model only computes the left-to-right order; got block_ids "
                     "that are not non-decreasing along the sequence (use kind 'armd').")


class AR(nn.Module):
  """Causal transformer LM (next-token prediction) from the shared blocks.

  `model.apply(params, tokens, block_ids=None, deterministic=True)` returns float32
  logits [B, N, vocab]; `logits[b, n]` is the distribution of `tokens[b, n]` given
  `tokens[b, :n]`. Right padding is harmless (no row sees a later row). `block_ids`
  is accepted so that code written for ARMD (`model.init(rng, tokens, ids)`) runs
  unchanged; an AR model is left-to-right by construction, so concrete ids that are
  not left-to-right (after padding) raise a ValueError (traced ids cannot be checked).
  `embed`, `bos`, `layers` and `logits` are the pieces the KV-cached sampler reuses.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = token_embedding(cfg, cfg.vocab_size)
    self.bos_embedding = start_embedding(self, cfg)
    self.position_embedding = position_table(self, cfg)  # None unless learned_positions
    self.layers = [Block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = layer_norm(cfg)
    self.head = output_head(cfg)

  def embed(self, tokens: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """Stream inputs [B, N, D] of tokens [B, N] placed at stream rows `rows` [B, N]
    (token x_{j-1} sits at row j): the token embeddings, plus the rows' position-table
    entries with `config.learned_positions` (then `rows` is required)."""
    return add_positions(self.config, self.embedding(tokens), self.position_embedding, rows)

  def bos(self, batch: int) -> jax.Array:
    """Start-token row [B, 1, D] (row 0; plus table row 0 with learned positions)."""
    x = jnp.broadcast_to(self.bos_embedding.astype(self.config.compute_dtype),
                         (batch, 1, self.config.d_model))
    return add_positions(self.config, x, self.position_embedding,
                         jnp.zeros((batch, 1), jnp.int32))

  def logits(self, h: jax.Array) -> jax.Array:
    """Float32 logits [B, N, vocab] from last-layer states h [B, N, D]."""
    return vocab_logits(self.config, self.final_norm(h), self.embedding, self.head)

  def inputs(self, tokens: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Shifted input stream [BOS, x_0 .. x_{N-2}] [B, N, D] and its ids/positions [B, N]."""
    batch, length = tokens.shape
    ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    x = jnp.concatenate([self.bos(batch), self.embed(tokens[:, :-1], ids[:, 1:])], axis=1)
    return nn.with_logical_constraint(x, ACTIVATION), ids

  def __call__(self, tokens: jax.Array, block_ids: jax.Array | None = None,
               deterministic: bool = True) -> jax.Array:
    tokens = check_tokens(self.config, tokens)
    check_left_to_right(block_ids, tokens.shape)
    x, ids = self.inputs(tokens)  # [B, N, D], [B, N]; ids double as RoPE positions
    for layer in self.layers:
      x = layer(x, ids, ids, deterministic=deterministic)
    return self.logits(x)
