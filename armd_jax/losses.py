"""The ARMD objective: cross-entropy of every token given the tokens of earlier blocks.

With singleton blocks the per-token mean is the exact NLL of that order (per token).
With multi-token blocks from a T-step masking schedule and weight gamma = 1 it is an
unbiased estimate of an upper bound on the NLL of the block sampler (Jensen over
reveal trajectories): report it as a bound (docs/method.md, section 3). The per-block
weight gamma is fixed at 1 here (no config sets another; an unused weights argument was
removed).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, tokens: jax.Array, block_ids: jax.Array,
                  mask: Optional[jax.Array] = None) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Per-token cross-entropy (gamma = 1) with metrics.

  Args:
    logits: [B, N, V] float logits; logits[b, n] predicts tokens[b, n].
    tokens: [B, N] int targets.
    block_ids: [B, N] int block ids (checked against the shape so the loss cannot be
      called with logits of a different order).
    mask: optional [B, N] {0, 1}; 0 marks padding, which is never a target.

  Returns:
    loss: scalar, sum(m * nll) / sum(m).
    metrics: 'loss', 'nll' (= loss, the mean per counted token), 'accuracy',
      'num_tokens', and the sums 'nll_sum', 'correct_sum' for exact aggregation.
  """
  if logits.ndim != 3 or logits.shape[:2] != tokens.shape or block_ids.shape != tokens.shape:
    raise ValueError(f"cross_entropy: logits [B, N, V] must match tokens and block_ids [B, N]; "
                     f"got logits {logits.shape}, tokens {tokens.shape}, "
                     f"block_ids {block_ids.shape}.")
  mask = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  nll = -token_log_probs(logits, tokens)  # [B, N]
  num_tokens = mask.sum()
  denom = jnp.maximum(num_tokens, 1.0)
  nll_sum = (nll * mask).sum()
  correct_sum = ((jnp.argmax(logits, axis=-1) == tokens) * mask).sum()
  loss = nll_sum / denom
  metrics = {
      "loss": loss,
      "nll": loss,
      "accuracy": correct_sum / denom,
      "num_tokens": num_tokens,
      "nll_sum": nll_sum,
      "correct_sum": correct_sum,
  }
  return loss, metrics


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens[b, n]) under logits[b, n]: [B, N] float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
