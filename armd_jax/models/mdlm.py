"""The masked-diffusion baseline (MDLM, Sahoo et al. 2024) from ARMD's own `Block`.

Network: a bidirectional transformer (every block id equal, so the shared
`kv_id <= q_id` mask lets every row see every row) reading tokens where masked positions
hold the extra id `mask_id(config) = vocab_size`. The input table therefore has
vocab_size + 1 rows while the output has vocab_size classes: the model can never
predict [MASK] (MDLM's "zero masking probability"). Unmasked positions are carried
over unchanged by the loss and the sampler ("carry-over unmasking"), and there is no
time input (MDLM's observation that the absorbing-state denoiser needs none).

Objective: the continuous-time negative ELBO with the linear schedule alpha_t = 1 - t:
  NELBO(x) = E_{t ~ U(0, 1)} E_{z_t} [ (1 / t) sum_{n masked in z_t} -log p(x_n | z_t) ],
each real token masked independently with probability t. Divided by the number of
real tokens it is an upper bound on the NLL per token (report it as a bound). It equals
the any-order autoregressive loss of the same network, which the tests verify exactly.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from armd_jax.losses import token_log_probs
from armd_jax.models.config import ModelConfig
from armd_jax.models.layers import (ACTIVATION, Block, add_positions, check_tokens, layer_norm,
                                    output_head, position_table, token_embedding, vocab_logits)

# t is drawn from [T_MIN, 1]: the 1/t weight stays finite and the truncated mass is
# negligible (a token is masked with probability < T_MIN below it).
T_MIN = 1e-4


def mask_id(config: ModelConfig) -> int:
  """The [MASK] input id: one past the last vocabulary id."""
  return config.vocab_size


class MDLM(nn.Module):
  """Bidirectional denoiser over tokens with [MASK] (= vocab_size) holes.

  `model.apply(params, noisy_tokens, block_ids=None, positions=None, deterministic=True)`
  returns float32 logits [B, N, vocab]: logits[b, n] is p(x_n | noisy_tokens[b]) (only
  meaningful where noisy_tokens[b, n] is [MASK]). `block_ids` is ignored (a
  bidirectional denoiser has no order); it is accepted so that code written for ARMD
  (`model.init(rng, tokens, ids)`) runs unchanged.
  """

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = token_embedding(cfg, cfg.vocab_size + 1)
    self.position_embedding = position_table(self, cfg)  # None unless learned_positions
    self.layers = [Block(cfg, name=f"layer_{i}") for i in range(cfg.num_layers)]
    self.final_norm = layer_norm(cfg)
    self.head = output_head(cfg)

  def __call__(self, noisy_tokens: jax.Array, block_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None, deterministic: bool = True) -> jax.Array:
    del block_ids  # no order: every row sees every row
    cfg = self.config
    noisy_tokens = check_tokens(cfg, noisy_tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(noisy_tokens.shape[1], dtype=jnp.int32),
                                   noisy_tokens.shape)
    x = add_positions(cfg, self.embedding(noisy_tokens), self.position_embedding, positions)
    x = nn.with_logical_constraint(x, ACTIVATION)  # [B, N, D]
    ids = jnp.zeros_like(noisy_tokens)  # all equal: fully bidirectional
    for layer in self.layers:
      x = layer(x, positions, ids, deterministic=deterministic)
    return vocab_logits(cfg, self.final_norm(x), self.embedding, self.head)


def corrupt(rng: jax.Array, tokens: jax.Array, t: jax.Array, config: ModelConfig,
            mask: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
  """Masks each real token independently with probability t (alpha_t = 1 - t).

  Args:
    tokens: [B, N] clean ids; t: [B] times in (0, 1]; mask: optional [B, N] {0, 1},
      padding (0) is never masked and never a target.

  Returns:
    noisy [B, N] int32 (masked positions hold `mask_id`), is_masked [B, N] bool.
  """
  real = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
  is_masked = (jax.random.uniform(rng, tokens.shape) < t[:, None]) & real
  return jnp.where(is_masked, mask_id(config), tokens).astype(jnp.int32), is_masked


def stratified_times(rng: jax.Array, batch: int) -> jax.Array:
  """t [B] in [T_MIN, 1]: one uniform offset shifted by b / B (low-variance, as MDLM)."""
  u = (jax.random.uniform(rng, ()) + jnp.arange(batch) / batch) % 1.0
  return T_MIN + (1.0 - T_MIN) * u


def elbo_terms(logits: jax.Array, tokens: jax.Array, is_masked: jax.Array,
               t: jax.Array) -> jax.Array:
  """Per-sequence negative-ELBO estimates [B]: sum over masked n of -log p(x_n) / t."""
  nll = -token_log_probs(logits, tokens)  # [B, N]
  return (nll * is_masked).sum(-1) / t


def diffusion_loss(model: nn.Module, params, tokens: jax.Array, rng: jax.Array,
                   mask: Optional[jax.Array] = None, deterministic: bool = True,
                   dropout_rng: Optional[jax.Array] = None
                   ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """One-sample Monte Carlo negative ELBO per real token (an upper bound on the NLL).

  Args:
    model: an `MDLM`; params: its variables; tokens: [B, N] clean ids; mask: optional
      [B, N] {0, 1} real-token mask; dropout_rng: needed when deterministic is False.

  Returns:
    loss: scalar sum_b NELBO_b / sum(mask) (nats per token).
    metrics: the keys of `armd_jax.losses.cross_entropy` ('loss', 'nll' (= loss, a
      bound), 'accuracy' (argmax on masked tokens), 'num_tokens', 'nll_sum' (the summed
      negative ELBO), 'correct_sum' (hits on masked tokens)) plus 'num_masked' (the
      denominator of 'accuracy') and 'masked_fraction'.
  """
  t_rng, mask_rng = jax.random.split(rng)
  t = stratified_times(t_rng, tokens.shape[0])  # [B]
  noisy, is_masked = corrupt(mask_rng, tokens, t, model.config, mask)
  rngs = None if deterministic else {"dropout": dropout_rng}
  logits = model.apply(params, noisy, deterministic=deterministic, rngs=rngs)
  elbo = elbo_terms(logits, tokens, is_masked, t)  # [B]
  num_tokens = (jnp.ones(tokens.shape) if mask is None else mask).astype(jnp.float32).sum()
  denom = jnp.maximum(num_tokens, 1.0)
  loss = elbo.sum() / denom
  num_masked = jnp.maximum(is_masked.sum(), 1)
  correct_sum = ((jnp.argmax(logits, -1) == tokens) & is_masked).sum().astype(jnp.float32)
  metrics = {"loss": loss, "nll": loss, "accuracy": correct_sum / num_masked,
             "num_tokens": num_tokens, "nll_sum": elbo.sum(), "correct_sum": correct_sum,
             "num_masked": is_masked.sum().astype(jnp.float32),
             "masked_fraction": is_masked.sum() / denom}
  return loss, metrics
