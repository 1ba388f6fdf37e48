"""The ARMD network: prefix aggregation, a two-stream lower half, a causal upper half.

The method: docs/method.md, section 2. Inputs stay in text order; block ids decide
who sees whom, so a single forward pass yields `log p(x_n | tokens of earlier blocks)`
for every n at once.

Conventions (ours, where the paper is silent):
- A start token (BOS) with block id 0 is prepended inside the module: a learned
  embedding `bos_embedding`, a learned PE row `bos_pe`, and RoPE position 0, while
  real tokens use RoPE position `positions + 1`. It is visible to everything and never
  a target, so the first block has a non-empty context.
- Prefix aggregation is normalised by the number of visible tokens (BOS included,
  so never zero): `G0[n] = LN(sum_{i: b_i < b_n} <PE[p_n], PE[p_i]> X0[i] / count_n)`,
  the mean taken in float32. It is computed densely or, in generation order, as a
  chunked linear attention with O(N) memory (`armd_jax.models.prefix`).
- The last two-stream layer runs only the query stream (plus the content rows' K/V):
  its content output is never read.
  This is a mean, so activations stay bounded at any length, and it is permutation
  equivariant. `query_init='prefix_plus_position'` adds `Dense(PE[p_n])` after the
  LayerNorm (the calibration variant that narrowed the gap to a GPT; docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.models import prefix
from armd_jax.models.config import ModelConfig
from armd_jax.models.layers import (ACTIVATION, Block, add_positions, dense_init, layer_norm,
                                    output_head, position_table, start_embedding,
                                    token_embedding, vocab_logits)


class ARMD(nn.Module):
  """Auto-Regressive Masked Diffusion transformer.

  `model.apply(params, tokens, block_ids, positions=None, deterministic=True)` returns
  float32 logits [B, N, vocab]; `logits[b, n]` is the distribution of `tokens[b, n]`
  given exactly the tokens whose block id is smaller than `block_ids[b, n]`.
  Pass `rngs={'dropout': key}` with `deterministic=False` for dropout.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = token_embedding(cfg, cfg.vocab_size)
    self.bos_embedding = start_embedding(self, cfg)
    self.position_embedding = position_table(self, cfg)  # None unless learned_positions
    self.pe = self.param("pe", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                            (None, "pe")), (cfg.max_len, cfg.d_pe))
    self.bos_pe = self.param("bos_pe", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                    ("pe",)), (cfg.d_pe,))
    self.query_norm = layer_norm(cfg)
    if cfg.query_init == "prefix_plus_position":
      self.position_proj = nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.compute_dtype,
                                    kernel_init=dense_init("pe", "embed"))
    self.layers = [Block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = layer_norm(cfg)
    self.head = output_head(cfg)

  # -- pieces (also used by the KV-cached sampler) ------------------------------------

  def embed(self, tokens: jax.Array, positions: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Token embeddings X0 [B, N, D] and PE rows [B, N, d_pe] of tokens at positions.

    With `config.learned_positions` X0 includes the position-table row of each token's
    RoPE position (positions + 1), so the prefix aggregation averages those rows too.
    """
    x0 = add_positions(self.config, self.embedding(tokens), self.position_embedding,
                       positions + 1)
    pe = jnp.take(self.pe, positions, axis=0).astype(self.config.compute_dtype)
    return x0, pe

  def bos(self, batch: int) -> Tuple[jax.Array, jax.Array]:
    """BOS embedding [B, 1, D] and PE row [B, 1, d_pe]."""
    dtype = self.config.compute_dtype
    x0 = jnp.broadcast_to(self.bos_embedding.astype(dtype), (batch, 1, self.config.d_model))
    x0 = add_positions(self.config, x0, self.position_embedding,
                       jnp.zeros((batch, 1), jnp.int32))  # the start token sits at 0
    pe = jnp.broadcast_to(self.bos_pe.astype(dtype), (batch, 1, self.config.d_pe))
    return x0, pe

  def query_stream_init(self, aggregate: jax.Array, count: jax.Array,
                        q_pe: jax.Array) -> jax.Array:
    """G0 [B, Nq, D] from a prefix sum `aggregate` [B, Nq, D] over `count` [B, Nq] tokens.

    `aggregate[n] = sum_{visible i} <q_pe[n], PE_i> X0_i`; count >= 1 (BOS). The mean is
    taken in float32 whatever the compute dtype (a bfloat16 count rounds above 256).
    """
    g0 = self.query_norm(prefix.prefix_mean(aggregate, count).astype(self.config.compute_dtype))
    if self.config.query_init == "prefix_plus_position":
      g0 = g0 + self.position_proj(q_pe)
    return g0

  def logits(self, g: jax.Array) -> jax.Array:
    """Float32 logits [B, N, vocab] from final query-stream states g [B, N, D]."""
    return vocab_logits(self.config, self.final_norm(g), self.embedding, self.head)

  # -- one-pass forward --------------------------------------------------------------

  def __call__(self, tokens: jax.Array, block_ids: jax.Array,
               positions: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
    tokens, block_ids, positions = check_inputs(self.config, tokens, block_ids, positions)
    cfg = self.config
    if cfg.attention_implementation != "pallas" and cfg.prefix_implementation != "chunked":
      return self._forward(tokens, block_ids, positions, deterministic)
    # Kernel / chunked path: run in generation order (stable sort by block id; positions
    # travel with the tokens, so RoPE and PE are unchanged) so that the id masks become
    # block lower-triangular (the kernel skips empty tiles) and the prefix aggregation
    # is a chunked cumulative sum; equivariance makes it exact.
    order, inverse = generation_order(block_ids)
    take = lambda x: jnp.take_along_axis(x, order, axis=1)  # noqa: E731
    logits = self._forward(take(tokens), take(block_ids), take(positions), deterministic)
    return jnp.take_along_axis(logits, inverse[..., None], axis=1)  # text order again

  def _forward(self, tokens: jax.Array, block_ids: jax.Array, positions: jax.Array,
               deterministic: bool) -> jax.Array:
    """The network on validated inputs [B, N] (in generation order when the prefix
    aggregation is chunked)."""
    cfg = self.config
    batch, length = tokens.shape

    x0, pe = self.embed(tokens, positions)  # [B, N, D], [B, N, P]
    bos_x0, bos_pe = self.bos(batch)
    x = jnp.concatenate([bos_x0, x0], axis=1)  # content stream [B, N+1, D]
    ctx_pe = jnp.concatenate([bos_pe, pe], axis=1)  # [B, N+1, P]
    ctx_ids = jnp.concatenate([jnp.zeros((batch, 1), block_ids.dtype), block_ids], axis=1)
    rope = positions + 1  # RoPE positions of real tokens; BOS sits at 0
    ctx_rope = jnp.concatenate([jnp.zeros((batch, 1), rope.dtype), rope], axis=1)

    # Prefix aggregation: linear attention of the targets' PE over strictly earlier blocks.
    if cfg.prefix_implementation == "chunked":  # rows sorted; BOS (id 0) stays first
      aggregate, count = prefix.prefix_aggregate_chunked(ctx_pe, x, ctx_ids, cfg.prefix_chunk)
      aggregate, count = aggregate[:, 1:], count[:, 1:]
    else:
      aggregate, count = prefix.prefix_aggregate_dense(pe, block_ids, ctx_pe, x, ctx_ids)
    g = self.query_stream_init(aggregate, count, pe)  # [B, N, D]
    g = nn.with_logical_constraint(g, ACTIVATION)
    x = nn.with_logical_constraint(x, ACTIVATION)

    # Two-stream lower half: content rows (ids b) and query rows (ids b - 1) in one call,
    # keys and values from the content rows only, weights shared. The last two-stream
    # layer's content output is never read, so it only contributes its K/V there.
    num_lower = cfg.num_two_stream_layers
    both_ids = jnp.concatenate([ctx_ids, block_ids - 1], axis=1)  # [B, 2N+1]
    both_rope = jnp.concatenate([ctx_rope, rope], axis=1)
    for layer in self.layers[:max(num_lower - 1, 0)]:
      both = layer(jnp.concatenate([x, g], axis=1), both_rope, both_ids, kv_len=length + 1,
                   deterministic=deterministic)
      x, g = both[:, :length + 1], both[:, length + 1:]
    if num_lower:
      last = self.layers[num_lower - 1]
      g = last.cross(g, rope, block_ids - 1, x, ctx_rope, ctx_ids, deterministic=deterministic)

    # Causal upper half on the query stream alone (inclusive mask stays strictly causal).
    for layer in self.layers[num_lower:]:
      g = layer(g, rope, block_ids, deterministic=deterministic)
    return self.logits(g)


def generation_order(block_ids: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Stable argsort of block ids [B, N] and its inverse permutation (both [B, N] int32).

  `take_along_axis(x, order, 1)` puts a sequence into generation order (ties keep text
  order); `take_along_axis(y, inverse, 1)` brings per-token outputs back.
  """
  order = jnp.argsort(block_ids, axis=1, stable=True).astype(jnp.int32)
  rows = jnp.arange(block_ids.shape[0])[:, None]
  ranks = jnp.broadcast_to(jnp.arange(block_ids.shape[1], dtype=jnp.int32), block_ids.shape)
  inverse = jnp.zeros_like(order).at[rows, order].set(ranks)
  return order, inverse


def check_inputs(config: ModelConfig, tokens: jax.Array, block_ids: jax.Array,
                 positions: Optional[jax.Array]) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Validates shapes and dtypes, and the values of concrete inputs; fills default
  positions arange(N).

  Block ids must be >= 1 (id 0 is the start token's: a real token with id <= 0 would
  hide BOS from its block and break generation order) and positions must lie in
  [0, max_len) (the PE table would read out-of-range rows). These value checks run
  whenever the arrays are concrete (eager `model.apply`, the samplers, the losses
  called outside jit). Under `jax.jit` the values are traced and cannot be checked
  without a device sync: validate them before the jitted call (`check_values`).
  """
  tokens = jnp.asarray(tokens)
  block_ids = jnp.asarray(block_ids)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}.")
  if block_ids.shape != tokens.shape:
    raise ValueError(f"block_ids shape {block_ids.shape} must equal tokens shape {tokens.shape}.")
  if not jnp.issubdtype(tokens.dtype, jnp.integer) or not jnp.issubdtype(block_ids.dtype,
                                                                          jnp.integer):
    raise ValueError(f"tokens and block_ids must be integer arrays, got {tokens.dtype} and "
                     f"{block_ids.dtype}.")
  if positions is None:
    if tokens.shape[1] > config.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_len="
                       f"{config.max_len}.")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  positions = jnp.asarray(positions)
  if positions.shape != tokens.shape or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be an integer array of shape {tokens.shape}, got "
                     f"{positions.dtype}{list(positions.shape)}.")
  check_values(config, block_ids, positions)
  return tokens.astype(jnp.int32), block_ids.astype(jnp.int32), positions.astype(jnp.int32)


def check_values(config: ModelConfig, block_ids, positions=None) -> None:
  """Raises ValueError if concrete block ids are < 1 or positions outside [0, max_len).

  Traced arrays (inside jit / grad / vmap) are skipped: their values are unknown.
  """
  # Concrete values are reduced with numpy: a jnp reduction of a captured constant would
  # itself be traced when this runs inside jit / make_jaxpr.
  if not isinstance(block_ids, jax.core.Tracer):
    ids = np.asarray(block_ids)
    low = int(ids.min()) if ids.size else 1
    if low < 1:
      raise ValueError(f"block ids must be >= 1 (0 is the start token's), got a minimum of "
                       f"{low}.")
  if positions is not None and not isinstance(positions, jax.core.Tracer):
    pos = np.asarray(positions)
    if not pos.size:
      return
    low, high = int(pos.min()), int(pos.max())
    if low < 0 or high >= config.max_len:
      raise ValueError(f"positions must lie in [0, ModelConfig.max_len={config.max_len}), got "
                       f"range [{low}, {high}].")
