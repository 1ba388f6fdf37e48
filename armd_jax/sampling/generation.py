"""The `generate` API: sample sequences from an ARMD model, with prompts or infills.

`generate` checks its arguments, builds the order (strided streams, any given block
ids, or confidence order) and runs the decoder (`decoding.decode` or
`confidence_order.decode_confidence`); `GenerateOutput` is its result and
`truncate_at_eos` the optional stop at each row's first EOS. See docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.sampling import plan as plan_lib
from armd_jax.sampling.confidence_order import decode_confidence
from armd_jax.sampling.decoding import decode
from armd_jax.sampling.sampler import SamplerConfig


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Result of `generate`.

  Attributes:
    tokens: int32 [B, N] generated tokens (known prompt/infill tokens unchanged).
    num_calls: number of model calls (one per block of the order, one for the whole
      prefill of known tokens, and every probe of order='confidence').
    log_probs: float32 [B, N] log-probability of each token under the model's
      conditional it was drawn from (before temperature/filtering); for known tokens,
      their teacher-forced log-probability.
    block_ids: int32 [B, N] numpy, the order used (known positions first; for
      order='confidence' the realized order).
    valid: bool [B, N]; False at padding after a row's first EOS (stop_at_eos).
    drawn: int32 [B, N], the tokens the network conditioned on (= tokens unless
      stop_at_eos padded some).
  """

  tokens: jax.Array
  num_calls: int
  log_probs: jax.Array
  block_ids: np.ndarray
  valid: Optional[jax.Array] = None
  drawn: Optional[jax.Array] = None


def generate(model, params, rng: jax.Array, *, batch_size: int, length: int, streams: int = 1,
             prompt=None, infill=None, sampler: SamplerConfig = SamplerConfig(),
             order=None, mode: str = "cached", k: int = 1, criterion: str = "max_prob",
             stop_at_eos: bool = False, eos_id: Optional[int] = None,
             pad_id: int = 0) -> GenerateOutput:
  """Samples `batch_size` sequences of `length` tokens with KV-cached ARMD decoding.

  Args:
    model: ARMD module; params: its variables.
    rng: PRNG key; the result is a deterministic function of it.
    batch_size: number of samples B.
    length: tokens per sample N (<= ModelConfig.max_len).
    streams: strided parallelism S (docs/method.md): the S stream heads one per call,
      then the j-th token of every stream in one call; N/S + S - 1 calls without
      conditioning. S = 1 is sequential left-to-right. S must divide the number of
      generated positions.
    prompt: int [P] or [B, P], placed at positions 0..P-1 and never changed.
    infill: (tokens [B, N] or [N], known_mask [B, N] or [N]): known tokens are kept and
      the rest generated.
      Known positions (prompt or infill) come first, one singleton block each in text
      order, and are read in ONE call (the prefill); then the unknown positions are
      generated strided.
    sampler: temperature / top-k / top-p / greedy / noise.
    order: None (strided), 'confidence', or dense block ids [N] or [B, N] giving any
      generation order (then `streams` must be 1); known positions are teacher-forced
      wherever they sit in it (the leading all-known blocks in one prefill call).
      'confidence': after the prompt's prefill, each step probes every unrevealed
      position in one call (query stream, all of them as one hypothetical block) and
      reveals the `k` most confident by `criterion` in one exact call: 2 ceil(U/k) - 1
      calls for U generated positions (the last step needs no probe). The realized order
      is returned in `block_ids`; `log_probs` are the one-pass model's under it.
      Prompts only (no infill), no streams.
    mode: 'cached' or 'recompute' (full forward every call; reference/benchmark only;
      not for order='confidence').
    k: positions revealed per exact call of order='confidence'.
    criterion: confidence of order='confidence': 'max_prob', 'margin' or 'entropy'.
    stop_at_eos: each row ends at its first `eos_id` in text order (the EOS kept):
      later positions are set to `pad_id`, get log-prob 0 and `valid` False. Decoding
      itself is unchanged (fixed-shape calls; no call is saved), so `drawn` keeps the
      tokens the network conditioned on and `log_probs` at valid positions stay the
      one-pass model's scores of `drawn` under `block_ids`.
    eos_id, pad_id: token ids used by stop_at_eos (eos_id required then).

  Returns:
    GenerateOutput(tokens, num_calls, log_probs, block_ids, valid, drawn).
  """
  cfg = model.config
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"length must be a positive int, got {length!r}.")
  if length > cfg.max_len:
    raise ValueError(f"length={length} exceeds the model's ModelConfig.max_len={cfg.max_len}.")
  if prompt is not None and infill is not None:
    raise ValueError("generate: pass either prompt or infill, not both (a prompt is an "
                     "infill whose known positions are 0..P-1).")
  if stop_at_eos and (eos_id is None or not 0 <= eos_id < cfg.vocab_size):
    raise ValueError(f"stop_at_eos needs eos_id in [0, {cfg.vocab_size}), got {eos_id!r}.")
  tokens = np.zeros((batch_size, length), np.int32)
  known = np.zeros((batch_size, length), bool)
  if prompt is not None:
    prompt = plan_lib.broadcast_rows(prompt, batch_size, "prompt")
    if prompt.shape[1] > length:
      raise ValueError(f"prompt has {prompt.shape[1]} tokens, more than length={length}.")
    tokens[:, :prompt.shape[1]] = prompt
    known[:, :prompt.shape[1]] = True
  if infill is not None:
    if not isinstance(infill, (tuple, list)) or len(infill) != 2:
      raise ValueError("infill must be a pair (tokens, known_mask).")
    tokens = np.array(plan_lib.broadcast_rows(infill[0], batch_size, "infill tokens"), np.int32)
    known = np.array(plan_lib.broadcast_rows(infill[1], batch_size, "infill known_mask"), bool)
    if tokens.shape != (batch_size, length) or known.shape != (batch_size, length):
      raise ValueError(f"infill tokens and known_mask must be [{batch_size}, {length}], got "
                       f"{tokens.shape} and {known.shape}.")
  if known.any() and (tokens[known].min() < 0 or tokens[known].max() >= cfg.vocab_size):
    raise ValueError(f"prompt/infill tokens must lie in [0, vocab_size={cfg.vocab_size}).")
  if isinstance(order, str):
    if order != "confidence":
      raise ValueError(f"order must be None, 'confidence' or block ids, got {order!r}.")
    if streams != 1 or infill is not None or mode != "cached":
      raise ValueError("order='confidence' takes a prompt only: no streams, no infill, "
                       "mode='cached'.")
    prompt_len = 0 if prompt is None else prompt.shape[1]
    if prompt_len >= length:
      raise ValueError("order='confidence': the prompt leaves nothing to generate.")
    out, log_probs, block_ids, calls = decode_confidence(
        model, params, rng, tokens, prompt_len, k, sampler, criterion)
    block_ids = np.asarray(block_ids)
  else:
    if order is not None:
      if streams != 1:
        raise ValueError("generate: pass either an explicit order or streams > 1, not both.")
      block_ids = np.asarray(plan_lib.broadcast_rows(order, batch_size, "order"), np.int32)
      if block_ids.shape[1] != length:
        raise ValueError(f"order has length {block_ids.shape[1]}, expected {length}.")
    else:
      block_ids = plan_lib.conditional_strided_order(known, streams)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
    prefill = plan_lib.leading_known_blocks(block_ids, known)
    out, log_probs, calls = decode(model, params, rng, tokens, known, block_ids, positions,
                                   sampler, mode, prefill if prefill.any() else None)
  valid = jnp.ones(out.shape, bool)
  drawn = out
  if stop_at_eos:
    out, log_probs, valid = truncate_at_eos(out, log_probs, eos_id, pad_id)
  return GenerateOutput(out, calls, log_probs, block_ids, valid, drawn)


def truncate_at_eos(tokens: jax.Array, log_probs: jax.Array, eos_id: int,
                    pad_id: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Ends each row at its first `eos_id` in text order (kept): later positions become
  `pad_id` with log-prob 0. Returns (tokens, log_probs, valid bool [B, N])."""
  is_eos = tokens == eos_id
  after = jnp.cumsum(is_eos, axis=1) - is_eos > 0  # strictly after the first EOS
  valid = ~after
  return (jnp.where(valid, tokens, pad_id).astype(tokens.dtype),
          jnp.where(valid, log_probs, 0.0), valid)

