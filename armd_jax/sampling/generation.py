"""The `generate` API: sample sequences from an ARMD model, with prompts or infills.

`generate` checks its arguments, builds the order (strided streams, any given block
ids, or confidence order) and runs the decoder (`decoding.decode` or
`confidence_order.decode_confidence`); `GenerateOutput` is its result and
`truncate_at_eos` the optional stop at each row's first EOS, after which
`kept_text_log_probs` rescores the kept text. `BaselineOutput` is what the baseline
samplers (`ar`, `mdlm`) return. See docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.losses import token_log_probs
from armd_jax.sampling import plan as plan_lib
from armd_jax.sampling.confidence_order import confidence_program, decode_confidence
from armd_jax.sampling.decoding import decode, decode_program
from armd_jax.sampling.sampler import SamplerConfig


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Result of `generate`.

  Attributes:
    tokens: int32 [B, N] generated tokens (known prompt/infill tokens unchanged).
    num_calls: number of model calls (one per block of the order, one for the whole
      prefill of known tokens, every probe of order='confidence', and with stop_at_eos
      the one call that rescores the kept text).
    log_probs: float32 [B, N] log-probability of each token under the model's
      conditional it was drawn from (before temperature/filtering); for known tokens,
      their teacher-forced log-probability. With stop_at_eos: the log-probs of the kept
      text alone (`kept_text_log_probs`; 0 at padding).
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


@dataclasses.dataclass(frozen=True)
class BaselineOutput:
  """What the baseline samplers return (`sampling.ar` and `sampling.mdlm`).

  tokens [B, N] int32; num_calls: network calls made for the batch (scalar);
  num_calls_per_row [B]: calls each row alone would have needed.
  """
  tokens: jax.Array
  num_calls: jax.Array
  num_calls_per_row: jax.Array


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
      later generated positions are set to `pad_id`, get log-prob 0 and `valid` False;
      known (prompt/infill) tokens stay as given and valid wherever they are. Decoding
      itself is unchanged (fixed-shape calls; no call is saved), so `drawn` keeps the
      tokens the network conditioned on. A kept token may have been drawn after a
      dropped one (any order but left to right), so one more call rescores the kept
      text with every dropped position moved after the kept ones
      (`kept_text_log_probs`): the log-probs condition on kept tokens only and sum to
      the log-probability of the kept text.
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
    out, _, valid = truncate_at_eos(out, None, eos_id, pad_id, known=known)  # rescored below
    log_probs = kept_text_log_probs(model, params, out, block_ids, valid)
    calls += 1
  return GenerateOutput(out, calls, log_probs, block_ids, valid, drawn)


def generation_program(model, params, rng: jax.Array, *, batch_size: int, length: int,
                       streams: int = 1, sampler: SamplerConfig = SamplerConfig(), order=None,
                       k: int = 1, criterion: str = "max_prob"):
  """The jitted decoder `generate` runs for unconditional samples, and its arguments, not
  yet called: (run, args); `run(*args)` is the whole decode (for FLOP counts:
  `armd_jax.flops`). order: None (strided, S = `streams`) or 'confidence' (k per call)."""
  tokens = np.zeros((batch_size, length), np.int32)
  if order == "confidence":
    return confidence_program(model, params, rng, tokens, 0, k, sampler, criterion)
  if order is not None:
    raise ValueError(f"generation_program: order must be None or 'confidence', got {order!r}.")
  known = np.zeros((batch_size, length), bool)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
  block_ids = plan_lib.conditional_strided_order(known, streams)
  run, inputs, _ = decode_program(model, tokens, known, block_ids, positions, sampler)
  return run, (params, rng, *inputs)


def truncate_at_eos(tokens: jax.Array, log_probs: Optional[jax.Array], eos_id: int,
                    pad_id: int, known=None) -> Tuple[jax.Array, Optional[jax.Array], jax.Array]:
  """Ends each row of tokens [B, N] at its first `eos_id` in text order (the EOS kept).

  Later positions become `pad_id` with log-prob 0, except where the optional bool
  `known` [B, N] (prompt/infill positions) is True: given tokens are kept as they are.
  Returns (tokens, log_probs, valid bool [B, N]); the log-probs [B, N] of kept positions
  are passed through unchanged (see `kept_text_log_probs` for scores of the kept text),
  and None stays None (samplers without log-probs).
  """
  is_eos = tokens == eos_id
  after = jnp.cumsum(is_eos, axis=1) - is_eos > 0  # strictly after the first EOS
  valid = ~after if known is None else ~after | jnp.asarray(known, bool)
  tokens = jnp.where(valid, tokens, pad_id).astype(tokens.dtype)
  return tokens, None if log_probs is None else jnp.where(valid, log_probs, 0.0), valid


def kept_text_log_probs(model, params, tokens: jax.Array, block_ids: np.ndarray,
                        valid: jax.Array) -> jax.Array:
  """float32 [B, N]: log-probs of the kept tokens given kept tokens only; 0 where not valid.

  One one-pass call scores `tokens` under `block_ids` with every dropped position
  (valid False) moved after all kept ones, keeping the kept positions' relative order:
  each kept token then conditions on the kept tokens of earlier blocks, never on a
  dropped one, and the row sums are the log-probability of the kept text under that order.
  """
  ids = np.asarray(block_ids, np.int32)  # ids >= 1, so ids + max > every kept id
  return _kept_text_log_probs(model, params, tokens, ids, ids + ids.max(axis=1, keepdims=True),
                              valid)


@functools.partial(jax.jit, static_argnums=0)
def _kept_text_log_probs(model, params, tokens, ids, dropped_ids, valid):
  kept_first = jnp.where(valid, ids, dropped_ids)  # [B, N]
  log_probs = token_log_probs(model.apply(params, tokens, kept_first), tokens)
  return jnp.where(valid, log_probs, 0.0)

