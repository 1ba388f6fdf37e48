"""Exact KV-cached ARMD decoding in any block order, and its full-recompute reference.

Spec section 4. One model call handles one block (all its positions at once):

1. Query stream of the block's targets. G0 comes from a running prefix-aggregation
   state `A = sum_i PE_i^T X0_i` ([d_pe, D], float32) and its count over the revealed
   tokens (BOS included): `G0[n] = query_stream_init(PE_n A, count, PE_n)`, O(1) in the
   length. The lower half attends to the cached content-stream K/V with the strict mask
   (query id = block - 1); the upper half writes the targets' own K/V into its cache
   first and then attends with the inclusive mask, so a target sees earlier blocks AND
   the other members of its block, exactly as `kv_id <= q_id` does in the one-pass model.
2. Tokens are drawn (or teacher-forced where known) from the float32 logits.
3. Content stream of the block's tokens through the lower half: at each layer the new
   rows' K/V are written into the cache and the rows attend inclusively (own block
   included), again matching the one-pass model. The last lower layer only needs K/V.

Caches have fixed shapes (content: N + 1 slots, slot 0 = BOS, slot 1 + n = position n;
upper half: N slots) and the mask ids are the order's block ids, so unwritten slots
(later blocks) are masked out by the id comparison itself. Each phase of the plan is one
`lax.scan`; the whole decode is one jitted function, traced once per static
signature (guarded: see `TRACE_COUNTS`).

The BOS content states are computed once when the cache is built (one row, independent
of the data); that is not counted as a model call.

Every piece of the network is the ARMD module's own (`embed`, `bos`, `query_stream_init`,
`logits`, `Block.keys_values`, `Block.attend`), called through `model.bind(params)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.losses import token_log_probs
from armd_jax.sampling import plan as plan_lib
from armd_jax.sampling.sampler import SamplerConfig, sample_logits

MODES = ("cached", "recompute")
_NEVER = 2**30  # block id of cache rows beyond the sequence: no query ever sees them


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
  """Result of `generate`.

  Attributes:
    tokens: int32 [B, N] generated tokens (known prompt/infill tokens unchanged).
    num_calls: number of model calls (one per block of the order).
    log_probs: float32 [B, N] log-probability of each token under the model's
      conditional it was drawn from (before temperature/filtering); for known tokens,
      their teacher-forced log-probability.
    block_ids: int32 [B, N] numpy, the order used (known positions first).
  """

  tokens: jax.Array
  num_calls: int
  log_probs: jax.Array
  block_ids: np.ndarray


def decode(model, params, rng: jax.Array, tokens: np.ndarray, known: np.ndarray,
           block_ids: np.ndarray, positions: np.ndarray,
           sampler: SamplerConfig = SamplerConfig(),
           mode: str = "cached") -> Tuple[jax.Array, jax.Array, int]:
  """Decodes the blocks of `block_ids` in order; the engine behind generate and score.

  Args:
    model: an ARMD module; params: its variables ({'params': ...}).
    rng: key; model call t draws with `fold_in(rng, t)` in both modes.
    tokens: int [B, N]; values at known positions are kept (teacher-forced), the rest
      are placeholders.
    known: bool [B, N].
    block_ids: dense ids [B, N] (host array: it defines the static plan).
    positions: int [B, N] original positions (< max_len).
    sampler: how unknown tokens are drawn.
    mode: 'cached' (KV caches) or 'recompute' (full forward pass every call: the
      reference and the no-cache benchmark baseline).

  Returns:
    (tokens int32 [B, N], log_probs float32 [B, N], number of model calls made).
  """
  if mode not in MODES:
    raise ValueError(f"decode: mode must be one of {MODES}, got {mode!r}.")
  block_ids = np.asarray(block_ids, np.int32)
  batch, length = block_ids.shape
  for name, array in (("tokens", tokens), ("known", known), ("positions", positions)):
    if np.shape(array) != (batch, length):
      raise ValueError(f"decode: {name} must have shape {(batch, length)}, got "
                       f"{np.shape(array)}.")
  positions = np.asarray(positions)
  if positions.min() < 0 or positions.max() >= model.config.max_len:
    raise ValueError(f"positions must lie in [0, ModelConfig.max_len={model.config.max_len}), "
                     f"got range [{positions.min()}, {positions.max()}].")
  run, inputs, plan = decode_program(model, tokens, known, block_ids, positions, sampler, mode)
  out_tokens, log_probs, calls = run(params, rng, *inputs)
  calls = int(calls)
  if calls != plan.num_calls:  # the loop counts its own model calls
    raise RuntimeError(f"decoder made {calls} calls, plan has {plan.num_calls}.")
  return out_tokens, log_probs, calls


def decode_program(model, tokens: np.ndarray, known: np.ndarray, block_ids: np.ndarray,
                   positions: np.ndarray, sampler: SamplerConfig = SamplerConfig(),
                   mode: str = "cached"):
  """The jitted decoder of one static plan and its data inputs, not yet called.

  `decode` calls `run(params, rng, *inputs)`; `armd_jax.compile_check` lowers the same
  `run` for a TPU topology instead. Arguments as for `decode` (already checked there).

  Returns:
    (run, inputs, plan): `run(params, rng, tokens, known, block_ids, positions,
    slot_tables) -> (tokens [B, N], log_probs [B, N], calls)`, the tuple `inputs` of
    jnp arrays after (params, rng), and the `plan_lib.Plan`.
  """
  block_ids = np.asarray(block_ids, np.int32)
  batch, length = block_ids.shape
  plan = plan_lib.make_plan(block_ids)
  run = _compiled(model, sampler, plan.structure, batch, length, mode)
  inputs = (jnp.asarray(tokens, jnp.int32), jnp.asarray(known, bool), jnp.asarray(block_ids),
            jnp.asarray(positions, jnp.int32),
            tuple((jnp.asarray(p.slots), jnp.asarray(p.starts)) for p in plan.phases))
  return run, inputs, plan


@functools.lru_cache(maxsize=64)
def _compiled(model, sampler: SamplerConfig, structure: Tuple[Any, ...], batch: int,
              length: int, mode: str):
  """One jitted decoder per static signature; a retrace of it would be a bug."""
  key = (model, sampler, structure, batch, length, mode)
  TRACE_COUNTS[key] = 0
  *phases, uniform = structure
  max_width = max(width for width, _ in phases)

  def run(params, rng, tokens, known, block_ids, positions, slot_tables):
    _count_trace(key)
    bound = model.bind(params)
    # Cache rows in generation order: their block ids are the sorted ids, then a tail of
    # max_width rows that no query ever sees (room for fixed-width writes).
    tail = jnp.full((block_ids.shape[0], max_width), _NEVER, jnp.int32)
    sorted_ids = jnp.sort(block_ids, axis=1)
    inputs = dict(known=known, block_ids=block_ids, positions=positions, rng=rng,
                  uniform=uniform,
                  upper_ids=jnp.concatenate([sorted_ids, tail], axis=1),  # [B, N+W]
                  content_ids=jnp.pad(jnp.concatenate([sorted_ids, tail], axis=1),
                                      ((0, 0), (1, 0))))  # [B, 1+N+W], BOS id 0
    if mode == "cached":
      state = _init_state(bound, tokens, max_width)
      call = functools.partial(_cached_call, bound, sampler, inputs)
    else:
      state = _init_light_state(tokens)
      call = functools.partial(_recompute_call, bound, sampler, inputs)
    for table in slot_tables:  # one scan per phase
      state, _ = jax.lax.scan(lambda s, xs: (call(s, *xs), None), state, table)
    return state["tokens"], state["log_probs"], state["calls"]

  return jax.jit(run)


# Traces per static signature. `chex.assert_max_traces` identifies a function by its
# source and definition stack, which is the same for every signature here, so the
# one-trace-per-signature guard is kept by hand (same contract, clear error).
TRACE_COUNTS: Dict[Any, int] = {}


def _count_trace(key) -> None:
  TRACE_COUNTS[key] = TRACE_COUNTS.get(key, 0) + 1
  if TRACE_COUNTS[key] > 1:
    raise AssertionError(f"the decoder was traced again for one static signature {key[2:]}: "
                         "an input changed dtype, shape or weak type.")


def _init_light_state(tokens: jax.Array) -> Dict[str, Any]:
  return dict(tokens=tokens, log_probs=jnp.zeros(tokens.shape, jnp.float32),
              calls=jnp.zeros((), jnp.int32))


def _init_state(m, tokens: jax.Array, max_width: int) -> Dict[str, Any]:
  """Empty caches with BOS written: content row 0, prefix state = the BOS term.

  Caches are [B, H, rows, Dh] with rows in generation order: content 1 + N + W rows
  (row 0 = BOS), upper half N + W rows.
  """
  cfg = m.config
  batch, length = tokens.shape
  num_lower = cfg.num_two_stream_layers
  num_upper = cfg.num_layers - num_lower
  dtype = cfg.compute_dtype
  content_rows, upper_rows = 1 + length + max_width, length + max_width
  shape = lambda rows: (batch, cfg.num_heads, rows, cfg.head_dim)  # noqa: E731
  content_k = [jnp.zeros(shape(content_rows), dtype) for _ in range(num_lower)]
  content_v = [jnp.zeros(shape(content_rows), dtype) for _ in range(num_lower)]
  bos_x0, bos_pe = m.bos(batch)  # [B, 1, D], [B, 1, P]
  x = bos_x0
  zeros = jnp.zeros((batch, 1), jnp.int32)
  for l in range(num_lower):
    layer = m.layers[l]
    k, v = layer.keys_values(x, zeros)  # BOS sees only itself
    content_k[l] = _write_rows(content_k[l], k, zeros[:, 0], None, True)
    content_v[l] = _write_rows(content_v[l], v, zeros[:, 0], None, True)
    if l + 1 < num_lower:
      x = layer.attend(x, zeros, zeros, k, v, zeros)
  aggregate = jnp.einsum("bip,bid->bpd", bos_pe, bos_x0, preferred_element_type=jnp.float32)
  return dict(
      tokens=tokens, log_probs=jnp.zeros(tokens.shape, jnp.float32),
      calls=jnp.zeros((), jnp.int32),
      content_k=content_k, content_v=content_v,
      upper_k=[jnp.zeros(shape(upper_rows), dtype) for _ in range(num_upper)],
      upper_v=[jnp.zeros(shape(upper_rows), dtype) for _ in range(num_upper)],
      aggregate=aggregate,  # [B, P, D] float32: sum of PE_i^T X0_i over revealed + BOS
      count=jnp.ones((batch,), jnp.int32))  # revealed tokens + BOS


def _scatter(array: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
  """array[b, index[b, w]] = values[b, w]; out-of-range indices (empty slots) are dropped."""
  rows = jnp.arange(array.shape[0])[:, None]
  return array.at[rows, index].set(values.astype(array.dtype), mode="drop")


def _write_rows(cache: jax.Array, values: jax.Array, start: jax.Array, valid,
                uniform: bool) -> jax.Array:
  """Writes values [B, W, H, Dh] into cache [B, H, R, Dh] at rows start[b] + [0, W).

  uniform: every batch row has the same start, so one in-place dynamic_update_slice
  writes all W rows (rows of empty slots get values that no query sees before the
  block owning those rows overwrites them). Otherwise each valid slot is scattered.
  """
  if uniform:
    values = jnp.transpose(values, (0, 2, 1, 3)).astype(cache.dtype)  # [B, H, W, Dh]
    return jax.lax.dynamic_update_slice_in_dim(cache, values, start[0], axis=2)
  index = jnp.where(valid, start[:, None] + jnp.arange(values.shape[1]), cache.shape[2])
  rows = jnp.arange(cache.shape[0])[:, None]
  return cache.at[rows, :, index].set(values.astype(cache.dtype), mode="drop")  # [B, W, H, Dh]


def _read(cache: jax.Array) -> jax.Array:
  """[B, H, R, Dh] cache as the [B, R, H, Dh] keys/values `Block.attend` takes."""
  return jnp.transpose(cache, (0, 2, 1, 3))


def _slot_inputs(inputs, slots: jax.Array):
  """Per-slot (index, valid, block id, position) [B, W] of a call's slots."""
  length = inputs["block_ids"].shape[1]
  valid = slots < length
  index = jnp.minimum(slots, length - 1)
  ids = jnp.take_along_axis(inputs["block_ids"], index, axis=1)
  pos = jnp.take_along_axis(inputs["positions"], index, axis=1)
  return index, valid, ids, pos


def _choose(state, inputs, sampler, logits, slots, index, valid):
  """Draws the slots' tokens (known ones teacher-forced) and records them."""
  rng = jax.random.fold_in(inputs["rng"], state["calls"])
  drawn = sample_logits(rng, logits, sampler)  # [B, W]
  given = jnp.take_along_axis(state["tokens"], index, axis=1)
  known = jnp.take_along_axis(inputs["known"], index, axis=1) & valid
  chosen = jnp.where(known, given, drawn)
  state = dict(state)
  state["tokens"] = _scatter(state["tokens"], slots, chosen)
  state["log_probs"] = _scatter(state["log_probs"], slots, token_log_probs(logits, chosen))
  state["calls"] = state["calls"] + 1
  return state, chosen


def _cached_call(m, sampler, inputs, state, slots: jax.Array, start: jax.Array):
  """One model call on the cache: query stream of a block, draw, content stream.

  slots: [B, W] positions of this call's block (N = empty); start: [B] its first cache
  row in generation order.
  """
  cfg = m.config
  num_lower = cfg.num_two_stream_layers
  uniform = inputs["uniform"]
  index, valid, ids, pos = _slot_inputs(inputs, slots)  # [B, W]
  rope = pos + 1  # BOS sits at RoPE position 0
  placeholder = jnp.take_along_axis(state["tokens"], index, axis=1)
  _, q_pe = m.embed(placeholder, pos)  # [B, W, P]

  # Query stream: G0 from the running prefix state, O(1) in the length.
  aggregate = jnp.einsum("bwp,bpd->bwd", q_pe.astype(jnp.float32), state["aggregate"])
  count = jnp.broadcast_to(state["count"][:, None], ids.shape)
  g = m.query_stream_init(aggregate, count, q_pe)  # [B, W, D]; mean in float32
  content_ids = inputs["content_ids"]
  for l in range(num_lower):  # strict: query id = block - 1
    g = m.layers[l].attend(g, rope, ids - 1, _read(state["content_k"][l]),
                           _read(state["content_v"][l]), content_ids)
  upper_k, upper_v = list(state["upper_k"]), list(state["upper_v"])
  for j, layer in enumerate(m.layers[num_lower:]):
    k, v = layer.keys_values(g, rope)  # this block's own rows join the cache first
    upper_k[j] = _write_rows(upper_k[j], k, start, valid, uniform)
    upper_v[j] = _write_rows(upper_v[j], v, start, valid, uniform)
    g = layer.attend(g, rope, ids, _read(upper_k[j]), _read(upper_v[j]),
                     inputs["upper_ids"])
  logits = m.logits(g)  # [B, W, V] float32
  state, chosen = _choose(state, inputs, sampler, logits, slots, index, valid)
  state["upper_k"], state["upper_v"] = upper_k, upper_v

  # Content stream of the chosen tokens: append their K/V, update the prefix state.
  x0, pe = m.embed(chosen, pos)  # [B, W, D], [B, W, P]
  weight = valid.astype(jnp.float32)[..., None]
  state["aggregate"] = state["aggregate"] + jnp.einsum(
      "bwp,bwd->bpd", pe.astype(jnp.float32) * weight, x0, preferred_element_type=jnp.float32)
  state["count"] = state["count"] + valid.sum(axis=1).astype(jnp.int32)
  content_k, content_v = list(state["content_k"]), list(state["content_v"])
  x = x0
  for l in range(num_lower):  # inclusive: the block sees itself
    layer = m.layers[l]
    k, v = layer.keys_values(x, rope)
    content_k[l] = _write_rows(content_k[l], k, start + 1, valid, uniform)  # row 0 = BOS
    content_v[l] = _write_rows(content_v[l], v, start + 1, valid, uniform)
    if l + 1 < num_lower:  # the last lower layer's content output is never used
      x = layer.attend(x, rope, ids, _read(content_k[l]), _read(content_v[l]),
                       content_ids)
  state["content_k"], state["content_v"] = content_k, content_v
  return state


def _recompute_call(m, sampler, inputs, state, slots: jax.Array, start: jax.Array):
  """One model call without cache: the full one-pass forward, read at the block's slots.

  Positions of later blocks hold placeholders; causality makes them irrelevant.
  """
  del start  # no cache
  index, valid, _, _ = _slot_inputs(inputs, slots)
  logits = m(state["tokens"], inputs["block_ids"], inputs["positions"])  # [B, N, V]
  logits = jnp.take_along_axis(logits, index[..., None], axis=1)  # [B, W, V]
  state, _ = _choose(state, inputs, sampler, logits, slots, index, valid)
  return state


# -- public API --------------------------------------------------------------------------


def generate(model, params, rng: jax.Array, *, batch_size: int, length: int, streams: int = 1,
             prompt=None, infill=None, sampler: SamplerConfig = SamplerConfig(),
             order=None, mode: str = "cached") -> GenerateOutput:
  """Samples `batch_size` sequences of `length` tokens with KV-cached ARMD decoding.

  Args:
    model: ARMD module; params: its variables.
    rng: PRNG key; the result is a deterministic function of it.
    batch_size: number of samples B.
    length: tokens per sample N (<= ModelConfig.max_len).
    streams: strided parallelism S (spec section 4): the S stream heads one per call,
      then the j-th token of every stream in one call; N/S + S - 1 calls without
      conditioning. S = 1 is sequential left-to-right. S must divide the number of
      generated positions.
    prompt: int [P] or [B, P], placed at positions 0..P-1 and never changed.
    infill: (tokens [B, N] or [N], known_mask [B, N] or [N]): known tokens are kept and
      the rest generated.
      Known positions (prompt or infill) are read first, one singleton block each in
      text order (one call each), then the unknown positions are generated strided.
    sampler: temperature / top-k / top-p / greedy.
    order: optional dense block ids [N] or [B, N] giving any generation order instead
      of the strided one (then `streams` must be 1); known positions are
      teacher-forced wherever they sit in it.
    mode: 'cached' or 'recompute' (full forward every call; reference/benchmark only).

  Returns:
    GenerateOutput(tokens [B, N] int32, num_calls, log_probs [B, N], block_ids).
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
  if order is not None:
    if streams != 1:
      raise ValueError("generate: pass either an explicit order or streams > 1, not both.")
    block_ids = np.asarray(plan_lib.broadcast_rows(order, batch_size, "order"), np.int32)
    if block_ids.shape[1] != length:
      raise ValueError(f"order has length {block_ids.shape[1]}, expected {length}.")
  else:
    block_ids = plan_lib.conditional_strided_order(known, streams)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
  out, log_probs, calls = decode(model, params, rng, tokens, known, block_ids, positions,
                                 sampler, mode)
  return GenerateOutput(out, calls, log_probs, block_ids)


def score(model, params, tokens, block_ids, positions=None, mode: str = "cached") -> jax.Array:
  """Per-token log-probs [B, N] float32 of `tokens` under the order `block_ids`.

  Teacher-forced KV-cached decoding, one call per block; equals the one-pass model's
  `token_log_probs(model.apply(params, tokens, block_ids, positions), tokens)`.
  `block_ids` must be dense ids (host array; it sets the call structure).
  """
  tokens = np.asarray(tokens)
  block_ids = np.asarray(block_ids)
  if tokens.ndim != 2 or block_ids.shape != tokens.shape:
    raise ValueError(f"score: tokens [B, N] and block_ids must have one shape, got "
                     f"{tokens.shape} and {block_ids.shape}.")
  if positions is None:
    if tokens.shape[1] > model.config.max_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_len="
                       f"{model.config.max_len}.")
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  known = np.ones(tokens.shape, bool)
  _, log_probs, _ = decode(model, params, jax.random.PRNGKey(0), tokens, known, block_ids,
                           positions, SamplerConfig(greedy=True), mode)
  return log_probs
