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
`lax.scan`, or on long caches on CPU a few, each on the prefix of the caches its calls
can see (`plan.Plan.segments`, `_on_cache_prefix`); the whole decode is one jitted function,
traced once per static signature (guarded: see `TRACE_COUNTS`).

The BOS content states are computed once when the cache is built (one row, independent
of the data); that is not counted as a model call.

Every piece of the network is the ARMD module's own (`embed`, `bos`, `query_stream_init`,
`logits`, `Block.keys_values`, `Block.attend`), called through `model.bind(params)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from armd_jax.losses import token_log_probs
from armd_jax.models import layers as layer_lib
from armd_jax.sampling import plan as plan_lib
from armd_jax.sampling.sampler import SamplerConfig, sample_logits

MODES = ("cached", "recompute")
_NEVER = 2**30  # block id of cache rows beyond the sequence: no query ever sees them
_MASKED = -1e30  # score of a hidden cache row (exp underflows to 0; no inf - inf)


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


def decode(model, params, rng: jax.Array, tokens: np.ndarray, known: np.ndarray,
           block_ids: np.ndarray, positions: np.ndarray,
           sampler: SamplerConfig = SamplerConfig(), mode: str = "cached",
           prefill_blocks=None) -> Tuple[jax.Array, jax.Array, int]:
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
    prefill_blocks: optional int [B]: row b's first prefill_blocks[b] blocks (all known)
      are read in ONE call (the prefill); None reads every block in its own call.

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
  if prefill_blocks is not None:
    readable = plan_lib.leading_known_blocks(block_ids, known)
    if (np.asarray(prefill_blocks) > readable).any():
      raise ValueError("decode: prefill_blocks covers blocks with unknown tokens.")
  run, inputs, plan = decode_program(model, tokens, known, block_ids, positions, sampler, mode,
                                     prefill_blocks)
  out_tokens, log_probs, calls = run(params, rng, *inputs)
  calls = int(calls)
  if calls != plan.num_calls:  # the loop counts its own model calls
    raise RuntimeError(f"decoder made {calls} calls, plan has {plan.num_calls}.")
  return out_tokens, log_probs, calls


def decode_program(model, tokens: np.ndarray, known: np.ndarray, block_ids: np.ndarray,
                   positions: np.ndarray, sampler: SamplerConfig = SamplerConfig(),
                   mode: str = "cached", prefill_blocks=None):
  """The jitted decoder of one static plan and its data inputs, not yet called.

  `decode` calls `run(params, rng, *inputs)`; `armd_jax.compile_check` lowers the same
  `run` for a TPU topology instead. Arguments as for `decode` (already checked there).

  Returns:
    (run, inputs, plan): `run(params, rng, tokens, known, block_ids, positions, prefill,
    slot_tables) -> (tokens [B, N], log_probs [B, N], calls)`, the tuple `inputs` of
    jnp arrays after (params, rng), and the `plan_lib.Plan`.
  """
  block_ids = np.asarray(block_ids, np.int32)
  batch, length = block_ids.shape
  plan = plan_lib.make_plan(block_ids, prefill_blocks)
  run = _compiled(model, sampler, plan.structure, batch, length, mode)
  prefill = plan.prefill if plan.prefill is not None else np.zeros((batch, 0), np.int32)
  inputs = (jnp.asarray(tokens, jnp.int32), jnp.asarray(known, bool), jnp.asarray(block_ids),
            jnp.asarray(positions, jnp.int32), jnp.asarray(prefill),
            tuple((jnp.asarray(p.slots), jnp.asarray(p.starts)) for p in plan.phases))
  return run, inputs, plan


@functools.lru_cache(maxsize=64)
def _compiled(model, sampler: SamplerConfig, structure: Tuple[Any, ...], batch: int,
              length: int, mode: str):
  """One jitted decoder per static signature; a retrace of it would be a bug."""
  key = (model, sampler, structure, batch, length, mode)
  TRACE_COUNTS[key] = 0
  *phases, prefill_width, uniform = structure
  max_width = max([width for width, _, _ in phases] + [prefill_width])

  def run(params, rng, tokens, known, block_ids, positions, prefill, slot_tables):
    _count_trace(key)
    bound = model.bind(params)
    # Cache rows in generation order: their block ids are the sorted ids, then a tail of
    # max_width rows that no query ever sees (room for fixed-width writes).
    tail = jnp.full((block_ids.shape[0], max_width), _NEVER, jnp.int32)
    sorted_ids = jnp.sort(block_ids, axis=1)
    upper_ids = jnp.concatenate([sorted_ids, tail], axis=1)  # [B, N+W]
    inputs = dict(known=known, block_ids=block_ids, positions=positions, rng=rng,
                  upper_ids=upper_ids,
                  content_ids=jnp.pad(upper_ids, ((0, 0), (1, 0))))  # [B, 1+N+W], BOS 0
    if mode == "cached":
      state = _init_state(bound, tokens, max_width)
      if prefill_width:
        state = _prefill_call(bound, inputs, state, prefill)
      call = functools.partial(_cached_call, bound, sampler, uniform=uniform)
    else:
      state = _init_light_state(tokens)
      if prefill_width:
        state = _recompute_prefill(bound, inputs, state, prefill)
      call = functools.partial(_recompute_call, bound, sampler)
    def calls(state, segmented: bool):
      for table, (_, num_calls, segments) in zip(slot_tables, phases):
        if not segmented:
          segments = ((num_calls, None),)
        begin = 0
        for end, rows in segments:  # one scan per segment (plan_lib.Plan.segments)
          part = jax.tree.map(lambda a, b=begin, e=end: a[b:e], table)

          def scan(state, inputs, part=part):
            body = lambda s, xs: (call(inputs, s, *xs), None)  # noqa: E731
            return jax.lax.scan(body, state, part)[0]

          state = _on_cache_prefix(scan, state, inputs, rows)
          begin = end
      return state

    if mode == "cached" and any(rows for _, _, segments in phases for _, rows in segments):
      # Segments on XLA:CPU only, where they were measured (docs/sampling.md); elsewhere
      # one scan per phase (cutting the caches costs a copy of them per segment, unmeasured
      # there). Decided when lowered, so an AOT compile for TPU gets the TPU program.
      state = jax.lax.platform_dependent(state, cpu=lambda s: calls(s, True),
                                         default=lambda s: calls(s, False))
    else:
      state = calls(state, False)
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

  Caches are [B, H, rows, Dh] (heads before rows: the score and mixing matmuls of
  `_attend` batch over (B, H) with the cache as it lies, no per-call transpose) with
  rows in generation order: content 1 + N + W rows (row 0 = BOS), upper half N + W rows.
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
      x = _attend(layer, x, zeros, zeros, content_k[l], content_v[l], zeros[:, :1].repeat(
          content_rows, axis=1).at[:, 1:].set(_NEVER))
  aggregate = jnp.einsum("bip,bid->bpd", bos_pe, bos_x0, preferred_element_type=jnp.float32)
  return dict(
      tokens=tokens, log_probs=jnp.zeros(tokens.shape, jnp.float32),
      calls=jnp.zeros((), jnp.int32),
      content_k=content_k, content_v=content_v,
      upper_k=[jnp.zeros(shape(upper_rows), dtype) for _ in range(num_upper)],
      upper_v=[jnp.zeros(shape(upper_rows), dtype) for _ in range(num_upper)],
      aggregate=aggregate,  # [B, P, D] float32: sum of PE_i^T X0_i over revealed + BOS
      count=jnp.ones((batch,), jnp.int32))  # revealed tokens + BOS


# Widest call whose attention `_attend` splits into one-query attentions on XLA:CPU.
_CPU_SPLIT_MAX_WIDTH = 8


def _attention(q: jax.Array, ids: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               kv_ids: jax.Array) -> jax.Array:
  """Masked softmax attention of q [B, H, W, Dh] over a [B, H, R, Dh] cache: [B, W, H, Dh].

  Float32 scores scaled by 1/sqrt(Dh); query n sees row i iff kv_ids[i] <= ids[n]; a
  query with no visible row gives zeros (the kernels' reference math).
  """
  scores = jnp.einsum("bhwd,bhrd->bhwr", q, cache_k, preferred_element_type=jnp.float32)
  mask = (kv_ids[:, None, :] <= ids[:, :, None])[:, None]  # [B, 1, W, R]
  scores = jnp.where(mask, scores * (q.shape[-1] ** -0.5), _MASKED)
  weights = jnp.where(mask, jnp.exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
  probs = weights / jnp.maximum(weights.sum(axis=-1, keepdims=True), 1e-30)
  return jnp.einsum("bhwr,bhrd->bwhd", probs.astype(cache_v.dtype), cache_v,
                    preferred_element_type=jnp.float32)


# Named scope of the one-query attentions of the XLA:CPU program (in lowered text).
CPU_SPLIT_SCOPE = "cpu_split_attention"


def _split_attention(q: jax.Array, ids: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     kv_ids: jax.Array) -> jax.Array:
  """`_attention` computed as W one-query attentions (XLA:CPU's fast form): [B, W, H, Dh]."""
  with jax.named_scope(CPU_SPLIT_SCOPE):
    return jnp.concatenate([_attention(q[:, :, w:w + 1], ids[:, w:w + 1], cache_k, cache_v,
                                       kv_ids) for w in range(q.shape[2])], axis=1)


def _attend(layer, x: jax.Array, rope: jax.Array, ids: jax.Array, cache_k: jax.Array,
            cache_v: jax.Array, kv_ids: jax.Array) -> jax.Array:
  """`Block.attend` of rows x [B, W, D] over a [B, H, R, Dh] cache with row ids [B, R].

  The same layer (its norm, projections, MLP and residuals) and the same attention math
  as the kernels' reference (`_attention`); only the layout differs: the matmuls batch
  over (B, H) on the cache as stored, with no per-call transpose of it.

  Backend choice (by `lax.platform_dependent`, when the decoder is lowered, so an
  ahead-of-time TPU compile on a CPU host gets the TPU program): on XLA:CPU a call of
  2 <= W <= `_CPU_SPLIT_MAX_WIDTH` queries is computed as W one-query attentions
  (named scope `CPU_SPLIT_SCOPE`), which XLA:CPU fuses into multiply-reduce loops,
  instead of one batched matmul of tiny (W x Dh) @ (Dh x R) products, which it runs ~7x
  slower than a single query (benchmarks/decode_attention.py, docs/sampling.md). The
  math per query is the same. GPU/TPU (and wider calls: the prefill, confidence probes)
  keep the batched einsum.
  """
  cfg = layer.config
  h = layer.ln_attn(x)
  q = layer_lib.apply_rope(layer.attn.query(h), rope, cfg.rope_base)  # [B, W, H, Dh]
  q = jnp.swapaxes(q, 1, 2)  # [B, H, W, Dh] (small)
  width = q.shape[2]
  if 1 < width <= _CPU_SPLIT_MAX_WIDTH:
    y = jax.lax.platform_dependent(q, ids, cache_k, cache_v, kv_ids, cpu=_split_attention,
                                   default=_attention)
  else:
    y = _attention(q, ids, cache_k, cache_v, kv_ids)
  y = y.astype(q.dtype)  # [B, W, H, Dh]
  return layer._finish(x, layer.attn.out(y), True)  # pylint: disable=protected-access


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
    values = jnp.swapaxes(values, 1, 2).astype(cache.dtype)  # [B, H, W, Dh]
    return jax.lax.dynamic_update_slice_in_dim(cache, values, start[0], axis=2)
  index = jnp.where(valid, start[:, None] + jnp.arange(values.shape[1]), cache.shape[2])
  rows = jnp.arange(cache.shape[0])[:, None]
  return cache.at[rows, :, index].set(values.astype(cache.dtype), mode="drop")  # [B, W, H, Dh]


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


def _query_stream(m, state, ids, pos, q_pe, aggregate, count, start, valid, uniform: bool,
                  content_ids, upper_ids):
  """Query stream of a call's rows [B, W] on the caches: (logits [B, W, V], upper K/V).

  aggregate [B, W, D] float32 / count [B, W]: each row's prefix state (what it sees).
  The lower half attends to the content cache with the strict mask (query id - 1); the
  upper half writes the rows' own K/V at cache rows start + [0, W) first, then attends
  with the inclusive mask (a target sees its own block, as in the one-pass model).
  """
  cfg = m.config
  num_lower = cfg.num_two_stream_layers
  rope = pos + 1  # BOS sits at RoPE position 0
  g = m.query_stream_init(aggregate, count, q_pe)  # [B, W, D]; mean in float32
  for l in range(num_lower):  # strict: query id = block - 1
    g = _attend(m.layers[l], g, rope, ids - 1, state["content_k"][l], state["content_v"][l],
                content_ids)
  upper_k, upper_v = list(state["upper_k"]), list(state["upper_v"])
  for j, layer in enumerate(m.layers[num_lower:]):
    k, v = layer.keys_values(g, rope)  # the rows' own K/V join the cache first
    upper_k[j] = _write_rows(upper_k[j], k, start, valid, uniform)
    upper_v[j] = _write_rows(upper_v[j], v, start, valid, uniform)
    g = _attend(layer, g, rope, ids, upper_k[j], upper_v[j], upper_ids)
  return m.logits(g), upper_k, upper_v  # [B, W, V] float32


def _content_stream(m, state, tokens, pos, ids, start, valid, uniform: bool, content_ids):
  """Appends the content-stream K/V of tokens [B, W] (inclusive mask) and their prefix
  terms; returns the new state."""
  num_lower = m.config.num_two_stream_layers
  rope = pos + 1
  x0, pe = m.embed(tokens, pos)  # [B, W, D], [B, W, P]
  weight = valid.astype(jnp.float32)[..., None]
  state = dict(state)
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
      x = _attend(layer, x, rope, ids, content_k[l], content_v[l], content_ids)
  state["content_k"], state["content_v"] = content_k, content_v
  return state


def _block_call(m, sampler, inputs, state, slots, index, valid, ids, pos, start,
                uniform: bool, content_ids, upper_ids):
  """One model call on one block: query stream, draw (or teacher-force), content stream."""
  placeholder = jnp.take_along_axis(state["tokens"], index, axis=1)
  _, q_pe = m.embed(placeholder, pos)  # [B, W, P]
  # G0 from the running prefix state, O(1) in the length.
  aggregate = jnp.einsum("bwp,bpd->bwd", q_pe.astype(jnp.float32), state["aggregate"])
  count = jnp.broadcast_to(state["count"][:, None], ids.shape)
  logits, upper_k, upper_v = _query_stream(m, state, ids, pos, q_pe, aggregate, count, start,
                                           valid, uniform, content_ids, upper_ids)
  state, chosen = _choose(state, inputs, sampler, logits, slots, index, valid)
  state["upper_k"], state["upper_v"] = upper_k, upper_v
  return _content_stream(m, state, chosen, pos, ids, start, valid, uniform, content_ids)


def _cached_call(m, sampler, inputs, state, slots: jax.Array, start: jax.Array, *,
                 uniform: bool):
  """One model call of a plan on the cache. slots: [B, W] positions of this call's block
  (N = empty); start: [B] its first cache row in generation order."""
  index, valid, ids, pos = _slot_inputs(inputs, slots)  # [B, W]
  return _block_call(m, sampler, inputs, state, slots, index, valid, ids, pos, start, uniform,
                     inputs["content_ids"], inputs["upper_ids"])


_CACHE_ROWS = {"upper_k": 0, "upper_v": 0, "content_k": 1, "content_v": 1}  # extra rows


def _on_cache_prefix(scan, state, inputs, rows: Optional[int]):
  """`scan(state, inputs)` on the first `rows` rows of the caches (rows + 1 of the
  content caches, whose row 0 is BOS) and of their ids; None = on the whole caches.

  The calls of a segment (`plan_lib.Plan.segments`) can neither see nor write a later
  row, so their attention reads only this prefix; the rest of each cache is set aside
  and joined back after the scan (two copies per segment, not per call).
  """
  if rows is None:
    return scan(state, inputs)
  rest = {name: [c[:, :, rows + extra:] for c in state[name]]
          for name, extra in _CACHE_ROWS.items()}
  state = dict(state, **{name: [c[:, :, :rows + extra] for c in state[name]]
                         for name, extra in _CACHE_ROWS.items()})
  inputs = dict(inputs, upper_ids=inputs["upper_ids"][:, :rows],
                content_ids=inputs["content_ids"][:, :rows + 1])
  state = scan(state, inputs)
  return dict(state, **{name: [jnp.concatenate([c, r], axis=2)
                               for c, r in zip(state[name], rest[name])]
                        for name in _CACHE_ROWS})


def _prefill_call(m, inputs, state, slots: jax.Array):
  """ONE model call reading known tokens of many blocks (slots [B, P], generation order).

  Content stream first (rows 1..P of the content cache, inclusive mask), then the query
  stream of every slot, each seeing exactly the strictly earlier blocks: its prefix
  state is the BOS term plus the slots of smaller id in this call (linear attention over
  them, as the one-pass model's prefix aggregation), and its attention masks are the
  same id comparisons. Log-probs of the given tokens are recorded; one call is counted.
  """
  index, valid, ids, pos = _slot_inputs(inputs, slots)
  start = jnp.zeros((slots.shape[0],), jnp.int32)
  tokens = jnp.take_along_axis(state["tokens"], index, axis=1)
  x0, pe = m.embed(tokens, pos)  # [B, P, D], [B, P, P_dim]
  pe32 = pe.astype(jnp.float32)
  earlier = (ids[:, None, :] < ids[:, :, None]) & valid[:, None, :]  # [B, P(query), P]
  weights = jnp.where(earlier, jnp.einsum("bnp,bip->bni", pe32, pe32), 0.0)
  aggregate = (jnp.einsum("bnp,bpd->bnd", pe32, state["aggregate"]) +
               jnp.einsum("bni,bid->bnd", weights, x0.astype(jnp.float32)))
  count = state["count"][:, None] + earlier.sum(axis=-1).astype(jnp.int32)
  state = _content_stream(m, state, tokens, pos, ids, start, valid, True, inputs["content_ids"])
  logits, upper_k, upper_v = _query_stream(m, state, ids, pos, pe, aggregate, count, start,
                                           valid, True, inputs["content_ids"],
                                           inputs["upper_ids"])
  state["upper_k"], state["upper_v"] = upper_k, upper_v
  state["log_probs"] = _scatter(state["log_probs"], slots, token_log_probs(logits, tokens))
  state["calls"] = state["calls"] + 1
  return state


def _recompute_prefill(m, inputs, state, slots: jax.Array):
  """The prefill as one full forward pass (reference mode), read at the prefill slots."""
  index, _, _, _ = _slot_inputs(inputs, slots)
  logits = m(state["tokens"], inputs["block_ids"], inputs["positions"])  # [B, N, V]
  logits = jnp.take_along_axis(logits, index[..., None], axis=1)
  tokens = jnp.take_along_axis(state["tokens"], index, axis=1)
  state = dict(state)
  state["log_probs"] = _scatter(state["log_probs"], slots, token_log_probs(logits, tokens))
  state["calls"] = state["calls"] + 1
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


# -- confidence-ordered decoding ------------------------------------------------------------

CRITERIA = ("max_prob", "margin", "entropy")


def confidence(logits: jax.Array, criterion: str) -> jax.Array:
  """Confidence [...] of float32 logits [..., V]: larger = more confident.

  'max_prob': the top probability; 'margin': top minus second probability; 'entropy':
  minus the entropy (nats).
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if criterion == "max_prob":
    return jnp.exp(log_p.max(axis=-1))
  if criterion == "margin":
    top2 = jax.lax.top_k(log_p, 2)[0]
    return jnp.exp(top2[..., 0]) - jnp.exp(top2[..., 1])
  if criterion == "entropy":
    return jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  raise ValueError(f"confidence criterion must be one of {CRITERIA}, got {criterion!r}.")


def confidence_calls(length: int, prompt_len: int, per_call: int) -> int:
  """Network calls of confidence decoding: 1 prefill (if a prompt), then per step one
  probe and one exact call, except the last step (it takes every remaining position, so
  it needs no probe): 2 ceil(U / k) - 1 for U generated positions."""
  steps = -(-(length - prompt_len) // per_call)
  return (prompt_len > 0) + 2 * steps - 1


def decode_confidence(model, params, rng: jax.Array, tokens: np.ndarray, prompt_len: int,
                      per_call: int, sampler: SamplerConfig = SamplerConfig(),
                      criterion: str = "max_prob") -> Tuple[jax.Array, jax.Array, jax.Array,
                                                            int]:
  """Confidence-ordered exact decoding (see `generate(order='confidence')`).

  Returns (tokens int32 [B, N], log_probs float32 [B, N], realized block ids int32
  [B, N], number of model calls).
  """
  batch, length = np.shape(tokens)
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
  if not isinstance(per_call, (int, np.integer)) or not 1 <= per_call <= length - prompt_len:
    raise ValueError(f"per_call (k) must be an int in [1, {length - prompt_len}] (the number "
                     f"of generated positions), got {per_call!r}.")
  run = _compiled_confidence(model, sampler, batch, length, int(prompt_len), int(per_call),
                             criterion)
  out_tokens, log_probs, block_ids, calls = run(params, rng, jnp.asarray(tokens, jnp.int32))
  calls = int(calls)
  want = confidence_calls(length, prompt_len, per_call)
  if calls != want:
    raise RuntimeError(f"confidence decoder made {calls} calls, expected {want}.")
  return out_tokens, log_probs, block_ids, calls


@functools.lru_cache(maxsize=32)
def _compiled_confidence(model, sampler: SamplerConfig, batch: int, length: int,
                         prompt_len: int, k: int, criterion: str):
  """The jitted confidence decoder of one static signature.

  Cache rows in reveal order: rows < P hold the prompt (block ids 1..P), then k rows
  per step (step t = block P + t + 1); room for N more rows, where a probe writes the
  upper-half K/V of every candidate (rows it does not own are hidden by their ids or
  overwritten by the exact call before any query may see them).
  """
  key = ("confidence", model, sampler, batch, length, prompt_len, k, criterion)
  TRACE_COUNTS[key] = 0
  num_gen = length - prompt_len
  steps = -(-num_gen // k)

  def run(params, rng, tokens):
    _count_trace(key)
    m = model.bind(params)
    rows = jnp.arange(2 * length)
    row_ids = jnp.where(rows < prompt_len, rows + 1,
                        jnp.where(rows < length, prompt_len + (rows - prompt_len) // k + 1,
                                  _NEVER)).astype(jnp.int32)
    upper_ids = jnp.broadcast_to(row_ids, (batch, 2 * length))
    content_ids = jnp.pad(upper_ids, ((0, 0), (1, 0)))  # BOS id 0
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    known = jnp.broadcast_to(jnp.arange(length) < prompt_len, (batch, length))
    inputs = dict(known=known, block_ids=jnp.zeros((batch, length), jnp.int32),
                  positions=positions, rng=rng, upper_ids=upper_ids, content_ids=content_ids)
    state = _init_state(m, tokens, length)
    state["block_ids"] = jnp.where(known, jnp.arange(1, length + 1), 0).astype(jnp.int32)
    if prompt_len:
      inputs["block_ids"] = state["block_ids"]
      prompt_slots = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32),
                                      (batch, prompt_len))
      state = _prefill_call(m, inputs, state, prompt_slots)

    def candidates(state):
      """Unrevealed positions first (text order), then revealed ones: [B, N]."""
      return jnp.argsort(state["block_ids"] > 0, axis=1, stable=True).astype(jnp.int32)

    def exact_call(state, slots, valid, t):
      """The chosen block (slots [B, k]) as block P + t + 1: one exact model call."""
      block = prompt_len + t + 1
      ids = jnp.full(slots.shape, block, jnp.int32)
      slots = jnp.where(valid, slots, length)
      index = jnp.minimum(slots, length - 1)
      pos = jnp.take_along_axis(positions, index, axis=1)
      start = jnp.full((batch,), prompt_len + t * k, jnp.int32)
      state = _block_call(m, sampler, inputs, state, slots, index, valid, ids, pos, start,
                          True, content_ids, upper_ids)
      state["block_ids"] = _scatter(state["block_ids"], slots, ids)
      return state

    def step(state, t):
      """Probe every unrevealed position (one call), reveal the k most confident (one)."""
      block = prompt_len + t + 1
      start = prompt_len + t * k
      cand = candidates(state)  # [B, N]
      remaining = num_gen - t * k
      valid = jnp.broadcast_to(jnp.arange(length) < remaining, (batch, length))
      ids = jnp.full((batch, length), block, jnp.int32)
      pos = jnp.take_along_axis(positions, cand, axis=1)
      placeholder = jnp.take_along_axis(state["tokens"], cand, axis=1)
      _, q_pe = m.embed(placeholder, pos)
      aggregate = jnp.einsum("bwp,bpd->bwd", q_pe.astype(jnp.float32), state["aggregate"])
      count = jnp.broadcast_to(state["count"][:, None], ids.shape)
      # Probe: every candidate as one hypothetical block (its members see each other in
      # the upper half, as one multi-token block of the one-pass model would).
      probe_ids = jnp.where(rows < start, row_ids, jnp.where(rows < start + remaining, block,
                                                             _NEVER))
      probe_ids = jnp.broadcast_to(probe_ids, (batch, 2 * length)).astype(jnp.int32)
      logits, _, _ = _query_stream(m, state, ids, pos, q_pe, aggregate, count,
                                   jnp.full((batch,), start, jnp.int32), valid, True,
                                   content_ids, probe_ids)
      state = dict(state)
      state["calls"] = state["calls"] + 1  # the probe is a model call
      score = jnp.where(valid, confidence(logits, criterion), -jnp.inf)
      top = jax.lax.top_k(score, k)[1]  # [B, k] indices into the candidates
      chosen = jnp.sort(jnp.take_along_axis(cand, top, axis=1), axis=1)  # text order
      return exact_call(state, chosen, jnp.ones((batch, k), bool), t), None

    if steps > 1:
      state, _ = jax.lax.scan(step, state, jnp.arange(steps - 1))
    # Last step: every remaining position (<= k) in one exact call, no probe needed.
    last = steps - 1
    remaining = num_gen - last * k
    slots = candidates(state)[:, :k]
    state = exact_call(state, slots, jnp.broadcast_to(jnp.arange(k) < remaining, (batch, k)),
                       last)
    return state["tokens"], state["log_probs"], state["block_ids"], state["calls"]

  return jax.jit(run)


# -- public API --------------------------------------------------------------------------


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
    streams: strided parallelism S (spec section 4): the S stream heads one per call,
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


# Public names of two pieces of a cached call, timed on their own by
# `benchmarks/decode_speed.py --parts`.
attend_on_cache = _attend
write_cache_rows = _write_rows
