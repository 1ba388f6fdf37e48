"""Scoring the harness's requests with our networks: batches, block ids, windows.

Pure functions of (model, params, token ids); `ArmdLM` (`armd_jax.lm_eval.model`) calls
them after tokenising. 'armd' and 'ar' requests are scored exactly, one network pass per
batch (`score_ordered`); 'mdlm' requests by a Monte Carlo ELBO (`score_mdlm`).
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_eval_utils

from armd_jax import orders
from armd_jax.losses import token_log_probs
from armd_jax.models import mdlm as mdlm_lib


def pair_block_ids(context_len: int, continuation_len: int, length: int, order: str,
                   streams: int) -> np.ndarray:
  """Block ids [length]: the context as singleton blocks 1..P in text order, then the
  continuation (left to right, or in `streams` streams: `orders.conditional_strided`),
  then padding in one last block (`orders.padding_last`)."""
  end = context_len + continuation_len
  n = np.arange(length)
  streams = streams if order == "strided" else 1  # one stream is left to right
  ids = np.ones(length, np.int32)
  if end:
    ids[:end] = orders.conditional_strided(n[None, :end] < context_len, streams)[0]
  return np.asarray(orders.padding_last(ids[None], n[None] < end))[0]


def bucket_length(length: int, max_len: int) -> int:
  """The padded length of a batch: the next power of two (at least 8), at most max_len
  (few distinct shapes, so few compilations)."""
  return min(max_len, max(8, 1 << max(length - 1, 0).bit_length()))


def fit_pair(context: Sequence[int], continuation: Sequence[int],
             max_len: int) -> Tuple[List[int], List[int]]:
  """(context, continuation) cut to the model: the rightmost max_len tokens are kept.
  An empty continuation stays empty (it scores log 1 = 0 and counts as greedy).

  Raises:
    ValueError: the continuation alone is longer than max_len (it could not be scored
      whole).
  """
  if len(continuation) > max_len:
    raise ValueError(f"loglikelihood: the continuation has {len(continuation)} tokens, more "
                     f"than the model's ModelConfig.max_len={max_len}.")
  keep = max_len - len(continuation)
  return (list(context)[-keep:] if keep else []), list(continuation)


@functools.partial(jax.jit, static_argnums=0)
def _ordered_scores(model, params, tokens: jax.Array, block_ids: jax.Array):
  """One pass of an 'armd' or 'ar' model: per-token log-probs [B, N] and whether each
  token is the argmax [B, N]."""
  logits = model.apply(params, tokens, block_ids)  # [B, N, V]
  return token_log_probs(logits, tokens), jnp.argmax(logits, -1) == tokens


def score_ordered(model, params, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
                  pad_id: int, order: str = "left_to_right", streams: int = 1,
                  batch_size: int = 8) -> List[Tuple[float, bool]]:
  """Exact (log p(continuation | context), is_greedy) of each (context, continuation)
  token pair under an 'armd' or 'ar' model, one network pass per batch.

  Pairs must already fit max_len (`fit_pair`). Requests are sorted by length so that a
  batch pads little; rows are right padded to `bucket_length` and padding is moved into
  a last block, so no scored token conditions on it.
  """
  max_len = model.config.max_len
  results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
  by_length = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
  for start in range(0, len(by_length), batch_size):
    chunk = by_length[start:start + batch_size]
    length = bucket_length(max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk), max_len)
    tokens = np.full((batch_size, length), pad_id, np.int32)  # [B, N]
    block_ids = np.ones((batch_size, length), np.int32)  # [B, N]; empty rows: one block
    for row, i in enumerate(chunk):
      context, continuation = pairs[i]
      if len(context) + len(continuation) > max_len:
        raise ValueError(f"score_ordered: request {i} has {len(context) + len(continuation)} "
                         f"tokens, more than max_len={max_len} (cut it with fit_pair).")
      tokens[row, :len(context) + len(continuation)] = list(context) + list(continuation)
      block_ids[row] = pair_block_ids(len(context), len(continuation), length, order, streams)
    log_probs, greedy = jax.device_get(_ordered_scores(model, params, tokens, block_ids))
    for row, i in enumerate(chunk):
      p, c = len(pairs[i][0]), len(pairs[i][1])
      results[i] = (float(np.sum(log_probs[row, p:p + c], dtype=np.float64)),
                    bool(np.all(greedy[row, p:p + c])))
  return results


@functools.partial(jax.jit, static_argnums=(0, 4))
def _mdlm_draws(model, params, tokens: jax.Array, is_target: jax.Array, num_samples: int,
                rng: jax.Array):
  """Negative-ELBO draws [num_samples] of the targets of one sequence tokens [N] given
  its other tokens, and whether every target is the argmax when all targets are masked.

  Each draw masks every target independently with probability t (stratified t, linear
  schedule) and weighs the masked tokens' NLL by 1/t (`armd_jax.models.mdlm`).
  """
  t = mdlm_lib.stratified_times(jax.random.fold_in(rng, 0), num_samples)  # [S]
  rows = jnp.broadcast_to(tokens, (num_samples,) + tokens.shape)  # [S, N]
  mask = jnp.broadcast_to(is_target, rows.shape)
  noisy, is_masked = mdlm_lib.corrupt(jax.random.fold_in(rng, 1), rows, t, model.config,
                                      mask)
  nelbo = mdlm_lib.elbo_terms(model.apply(params, noisy), rows, is_masked, t)  # [S]
  all_masked = jnp.where(is_target, mdlm_lib.mask_id(model.config), tokens)[None]  # [1, N]
  hits = jnp.argmax(model.apply(params, all_masked)[0], -1) == tokens  # [N]
  return nelbo, jnp.all(hits | ~is_target)


def score_mdlm(model, params, pairs: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
               num_samples: int, rng: jax.Array) -> List[Tuple[float, bool]]:
  """(-NELBO of the continuation given the context, is_greedy) per token pair under an
  'mdlm' model: a Monte Carlo lower bound on log p(continuation | context) (an upper
  bound on the NLL), `num_samples` draws each.

  A bidirectional denoiser sees every position, so each request runs alone at its own
  length (no padding it could read); the draws form the batch.
  """
  results = []
  for i, (context, continuation) in enumerate(pairs):
    tokens = np.asarray(list(context) + list(continuation), np.int32)  # [N]
    is_target = np.arange(len(tokens)) >= len(context)  # [N]
    nelbo, greedy = _mdlm_draws(model, params, tokens, is_target, num_samples,
                                jax.random.fold_in(rng, i))
    results.append((-float(np.mean(np.asarray(nelbo, np.float64))), bool(greedy)))
  return results


def rolling_windows(tokens: Sequence[int], prefix_token: int,
                    max_len: int) -> List[Tuple[List[int], List[int]]]:
  """(context, continuation) windows of a document that score every token exactly once
  (the first given `prefix_token`), each window at most max_len tokens in all: the
  harness's `get_rolling_token_windows` (context_len=1) and `make_disjoint_window`.

  The harness's windows are for models that read inputs shifted by one; ours score
  every token of their input, so windows of max_seq_len = max_len - 1 fill max_len.
  """
  if max_len < 2:
    raise ValueError(f"rolling windows need ModelConfig.max_len >= 2, got {max_len}.")
  return [lm_eval_utils.make_disjoint_window(w) for w in lm_eval_utils.get_rolling_token_windows(
      token_list=list(tokens), prefix_token=prefix_token, max_seq_len=max_len - 1,
      context_len=1)]
