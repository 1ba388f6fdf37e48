"""One network call against the KV caches: the pieces of exact ARMD decoding.

How KV-cached decoding works is in docs/method.md (section 4) and docs/sampling.md. One
model call handles one block (all its positions at once):

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
(later blocks) are masked out by the id comparison itself. The BOS content states are
computed once when the cache is built (one row, independent of the data); that is not
counted as a model call.

Every piece of the network is the ARMD module's own (`embed`, `bos`, `query_stream_init`,
`logits`, `Block.keys_values`, `Block.after_attention`), called through
`model.bind(params)`; only the attention over the cache is written here
(`attend_on_cache`, with the kernels' reference softmax `masked_softmax`).

What the drivers (`decoding`, `confidence_order`) call: `init_state`, `prefill_call`,
`cached_call` / `block_call` (one block), `query_stream` (a confidence probe),
`on_cache_prefix` (a scan on a prefix of the caches) and the helpers `slot_inputs`,
`choose_tokens`, `scatter`. `attend_on_cache` and `write_cache_rows` are also timed on
their own by `benchmarks/decode_speed.py --parts`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp

from armd_jax.kernels.reference import masked_softmax
from armd_jax.losses import token_log_probs
from armd_jax.models import layers as layer_lib
from armd_jax.sampling.sampler import sample_logits

NEVER = 2**30  # block id of cache rows beyond the sequence: no query ever sees them


def empty_caches(config, batch: int, rows: int, count: int) -> List[jax.Array]:
  """`count` zero caches [B, Hkv, rows, Dh] in the compute dtype: the decoders' layout
  (heads before rows, see `init_state`); Hkv = the model's key/value heads (fewer than
  its query heads with grouped-query attention)."""
  shape = (batch, config.kv_heads, rows, config.head_dim)
  return [jnp.zeros(shape, config.compute_dtype) for _ in range(count)]


def init_state(m, tokens: jax.Array, max_width: int) -> Dict[str, Any]:
  """Empty caches with BOS written: content row 0, prefix state = the BOS term.

  Caches are [B, Hkv, rows, Dh] (heads before rows: the score and mixing matmuls of
  `attend_on_cache` batch over (B, H) with the cache as it lies, no per-call transpose)
  with rows in generation order: content 1 + N + W rows (row 0 = BOS), upper half N + W
  rows.
  """
  cfg = m.config
  batch, length = tokens.shape
  num_lower = cfg.num_two_stream_layers
  num_upper = cfg.num_layers - num_lower
  content_rows, upper_rows = 1 + length + max_width, length + max_width
  bos_x0, bos_pe = m.bos(batch)  # [B, 1, D], [B, 1, P]
  zeros = jnp.zeros((batch, 1), jnp.int32)
  bos_ids = jnp.full((batch, content_rows), NEVER, jnp.int32).at[:, 0].set(0)  # BOS sees itself
  _, content_k, content_v = content_layers(
      m.layers[:num_lower], bos_x0, zeros, zeros, zeros[:, 0], None, True,
      empty_caches(cfg, batch, content_rows, num_lower),
      empty_caches(cfg, batch, content_rows, num_lower), bos_ids)
  aggregate = jnp.einsum("bip,bid->bpd", bos_pe, bos_x0, preferred_element_type=jnp.float32)
  return dict(
      tokens=tokens, log_probs=jnp.zeros(tokens.shape, jnp.float32),
      calls=jnp.zeros((), jnp.int32),
      content_k=content_k, content_v=content_v,
      upper_k=empty_caches(cfg, batch, upper_rows, num_upper),
      upper_v=empty_caches(cfg, batch, upper_rows, num_upper),
      aggregate=aggregate,  # [B, P, D] float32: sum of PE_i^T X0_i over revealed + BOS
      count=jnp.ones((batch,), jnp.int32))  # revealed tokens + BOS


# Widest call whose attention `attend_on_cache` splits into one-query attentions on XLA:CPU.
_CPU_SPLIT_MAX_WIDTH = 8


def _attention(q: jax.Array, ids: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
               kv_ids: jax.Array) -> jax.Array:
  """Masked softmax attention of q [B, H, W, Dh] over a [B, Hkv, R, Dh] cache: [B, W, H, Dh].

  Float32 scores scaled by 1/sqrt(Dh); query n sees row i iff kv_ids[i] <= ids[n]; a
  query with no visible row gives zeros (the kernels' reference softmax). Query head h
  reads cache head h // G (G = H / Hkv; `Attention.keys_values`): the queries are grouped
  [B, Hkv, G, W, Dh], so the cache is read as stored, never repeated.
  """
  batch, heads, width, head_dim = q.shape
  kv_heads = cache_k.shape[1]
  q = q.reshape(batch, kv_heads, heads // kv_heads, width, head_dim)  # [B, Hkv, G, W, Dh]
  scores = jnp.einsum("bkgwd,bkrd->bkgwr", q, cache_k, preferred_element_type=jnp.float32)
  visible = (kv_ids[:, None, :] <= ids[:, :, None])[:, None, None]  # [B, 1, 1, W, R]
  probs = masked_softmax(scores * (head_dim ** -0.5), visible)
  out = jnp.einsum("bkgwr,bkrd->bwkgd", probs.astype(cache_v.dtype), cache_v,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, width, heads, head_dim)


# Named scope of the one-query attentions of the XLA:CPU program (in lowered text).
CPU_SPLIT_SCOPE = "cpu_split_attention"


def _split_attention(q: jax.Array, ids: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     kv_ids: jax.Array) -> jax.Array:
  """`_attention` computed as W one-query attentions (XLA:CPU's fast form): [B, W, H, Dh]."""
  with jax.named_scope(CPU_SPLIT_SCOPE):
    return jnp.concatenate([_attention(q[:, :, w:w + 1], ids[:, w:w + 1], cache_k, cache_v,
                                       kv_ids) for w in range(q.shape[2])], axis=1)


def attend_on_cache(layer, x: jax.Array, rope: jax.Array, ids: jax.Array,
                    cache_k: jax.Array, cache_v: jax.Array, kv_ids: jax.Array) -> jax.Array:
  """`Block.attend` of rows x [B, W, D] over a [B, Hkv, R, Dh] cache with row ids [B, R].

  The same layer (its norm, projections, MLP and residuals) and the same attention math
  as the kernels' reference (`_attention`); only the layout differs: the matmuls batch
  over (B, H) on the cache as stored, with no per-call transpose of it.

  Backend choice (by `lax.platform_dependent`, when the decoder is lowered, so an
  ahead-of-time TPU compile on a CPU host gets the TPU program): on XLA:CPU a call of
  2 <= W <= `_CPU_SPLIT_MAX_WIDTH` queries is computed as W one-query attentions
  (named scope `CPU_SPLIT_SCOPE`), which XLA:CPU fuses into multiply-reduce loops,
  instead of one batched matmul of tiny (W x Dh) @ (Dh x R) products, which it runs ~7x
  slower than a single query (measured in docs/sampling.md). The
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
  return layer.after_attention(x, layer.attn.out(y))


def scatter(array: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
  """array[b, index[b, w]] = values[b, w]; out-of-range indices (empty slots) are dropped."""
  rows = jnp.arange(array.shape[0])[:, None]
  return array.at[rows, index].set(values.astype(array.dtype), mode="drop")


def write_cache_rows(cache: jax.Array, values: jax.Array, start: jax.Array, valid,
                     uniform: bool) -> jax.Array:
  """Writes values [B, W, Hkv, Dh] into cache [B, Hkv, R, Dh] at rows start[b] + [0, W).

  uniform: every batch row has the same start, so one in-place dynamic_update_slice
  writes all W rows (rows of empty slots get values that no query sees before the
  block owning those rows overwrites them). Otherwise each valid slot is scattered.
  """
  if uniform:
    values = jnp.swapaxes(values, 1, 2).astype(cache.dtype)  # [B, Hkv, W, Dh]
    return jax.lax.dynamic_update_slice_in_dim(cache, values, start[0], axis=2)
  index = jnp.where(valid, start[:, None] + jnp.arange(values.shape[1]), cache.shape[2])
  rows = jnp.arange(cache.shape[0])[:, None]
  return cache.at[rows, :, index].set(values.astype(cache.dtype), mode="drop")  # [B, W, Hkv, Dh]


def slot_inputs(inputs, slots: jax.Array):
  """Per-slot (index, valid, block id, position) [B, W] of a call's slots."""
  length = inputs["block_ids"].shape[1]
  valid = slots < length
  index = jnp.minimum(slots, length - 1)
  ids = jnp.take_along_axis(inputs["block_ids"], index, axis=1)
  pos = jnp.take_along_axis(inputs["positions"], index, axis=1)
  return index, valid, ids, pos


def choose_tokens(state, inputs, sampler, logits, slots, index, valid):
  """Draws the slots' tokens (known ones teacher-forced) and records them."""
  rng = jax.random.fold_in(inputs["rng"], state["calls"])
  drawn = sample_logits(rng, logits, sampler)  # [B, W]
  given = jnp.take_along_axis(state["tokens"], index, axis=1)
  known = jnp.take_along_axis(inputs["known"], index, axis=1) & valid
  chosen = jnp.where(known, given, drawn)
  state = dict(state)
  state["tokens"] = scatter(state["tokens"], slots, chosen)
  state["log_probs"] = scatter(state["log_probs"], slots, token_log_probs(logits, chosen))
  state["calls"] = state["calls"] + 1
  return state, chosen


def query_stream(m, state, ids, pos, q_pe, aggregate, count, start, valid, uniform: bool,
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
    g = attend_on_cache(m.layers[l], g, rope, ids - 1, state["content_k"][l],
                        state["content_v"][l], content_ids)
  upper_k, upper_v = list(state["upper_k"]), list(state["upper_v"])
  for j, layer in enumerate(m.layers[num_lower:]):
    k, v = layer.keys_values(g, rope, repeat=False)  # the rows' own K/V join the cache first
    upper_k[j] = write_cache_rows(upper_k[j], k, start, valid, uniform)
    upper_v[j] = write_cache_rows(upper_v[j], v, start, valid, uniform)
    g = attend_on_cache(layer, g, rope, ids, upper_k[j], upper_v[j], upper_ids)
  return m.logits(g), upper_k, upper_v  # [B, W, V] float32


def content_layers(layers, x: jax.Array, rope: jax.Array, ids: jax.Array, row: jax.Array,
                   valid, uniform: bool, cache_k: List[jax.Array], cache_v: List[jax.Array],
                   kv_ids: jax.Array, last_output: bool = False):
  """Rows x [B, W, D] of a causal stream through `layers`, each on its own K/V cache.

  At each layer the rows' K/V are written at cache rows row[b] + [0, W) first, then the
  rows attend to the cache with the inclusive mask (a row sees the cache rows whose
  kv_ids [B, R] are <= its id: earlier blocks and its own). ARMD's content stream ends on
  a layer whose output is never read, so that layer only writes its K/V; `last_output`
  runs its attention too (the AR model's stream, whose last output makes the logits).

  Returns:
    (x [B, W, D]: the last layer's output if last_output, else its input; the updated
    caches as new lists).
  """
  cache_k, cache_v = list(cache_k), list(cache_v)
  for l, layer in enumerate(layers):
    k, v = layer.keys_values(x, rope, repeat=False)  # [B, W, Hkv, Dh]
    cache_k[l] = write_cache_rows(cache_k[l], k, row, valid, uniform)
    cache_v[l] = write_cache_rows(cache_v[l], v, row, valid, uniform)
    if last_output or l + 1 < len(layers):
      x = attend_on_cache(layer, x, rope, ids, cache_k[l], cache_v[l], kv_ids)
  return x, cache_k, cache_v


def _content_stream(m, state, tokens, pos, ids, start, valid, uniform: bool, content_ids):
  """Appends the content-stream K/V of tokens [B, W] (inclusive mask) and their prefix
  terms; returns the new state."""
  x0, pe = m.embed(tokens, pos)  # [B, W, D], [B, W, P]
  weight = valid.astype(jnp.float32)[..., None]
  state = dict(state)
  state["aggregate"] = state["aggregate"] + jnp.einsum(
      "bwp,bwd->bpd", pe.astype(jnp.float32) * weight, x0, preferred_element_type=jnp.float32)
  state["count"] = state["count"] + valid.sum(axis=1).astype(jnp.int32)
  _, state["content_k"], state["content_v"] = content_layers(  # row 0 = BOS
      m.layers[:m.config.num_two_stream_layers], x0, pos + 1, ids, start + 1, valid, uniform,
      state["content_k"], state["content_v"], content_ids)
  return state


def block_call(m, sampler, inputs, state, slots, index, valid, ids, pos, start,
               uniform: bool, content_ids, upper_ids):
  """One model call on one block: query stream, draw (or teacher-force), content stream."""
  placeholder = jnp.take_along_axis(state["tokens"], index, axis=1)
  _, q_pe = m.embed(placeholder, pos)  # [B, W, P]
  # G0 from the running prefix state, O(1) in the length.
  aggregate = jnp.einsum("bwp,bpd->bwd", q_pe.astype(jnp.float32), state["aggregate"])
  count = jnp.broadcast_to(state["count"][:, None], ids.shape)
  logits, upper_k, upper_v = query_stream(m, state, ids, pos, q_pe, aggregate, count, start,
                                          valid, uniform, content_ids, upper_ids)
  state, chosen = choose_tokens(state, inputs, sampler, logits, slots, index, valid)
  state["upper_k"], state["upper_v"] = upper_k, upper_v
  return _content_stream(m, state, chosen, pos, ids, start, valid, uniform, content_ids)


def cached_call(m, sampler, inputs, state, slots: jax.Array, start: jax.Array, *,
                uniform: bool):
  """One model call of a plan on the cache. slots: [B, W] positions of this call's block
  (N = empty); start: [B] its first cache row in generation order."""
  index, valid, ids, pos = slot_inputs(inputs, slots)  # [B, W]
  return block_call(m, sampler, inputs, state, slots, index, valid, ids, pos, start, uniform,
                    inputs["content_ids"], inputs["upper_ids"])


# Rows beyond a segment's visible rows: 0 for the upper half, 1 for the content stream
# (its row 0 is BOS); the caches' lists in the state and their ids in the inputs.
_CACHE_ROWS = {"upper_k": 0, "upper_v": 0, "content_k": 1, "content_v": 1}
_ID_ROWS = {"upper_ids": 0, "content_ids": 1}


def on_cache_prefix(scan, state, inputs, rows: Optional[int]):
  """`scan(state, inputs)` on the first `rows` rows of the caches (rows + 1 of the
  content caches, whose row 0 is BOS) and of their ids; None = on the whole caches.

  The calls of a segment (`plan.Plan.segments`) can neither see nor write a later
  row, so their attention reads only this prefix; the rest of each cache is set aside
  and joined back after the scan (two copies per segment, not per call). Caches a
  decoder does not have (the AR stream has no upper half) are left out.
  """
  if rows is None:
    return scan(state, inputs)
  caches = {name: rows + extra for name, extra in _CACHE_ROWS.items() if name in state}
  rest = {name: [c[:, :, keep:] for c in state[name]] for name, keep in caches.items()}
  state = dict(state, **{name: [c[:, :, :keep] for c in state[name]]
                         for name, keep in caches.items()})
  inputs = dict(inputs, **{name: inputs[name][:, :rows + extra]
                           for name, extra in _ID_ROWS.items() if name in inputs})
  state = scan(state, inputs)
  return dict(state, **{name: [jnp.concatenate([c, r], axis=2)
                               for c, r in zip(state[name], rest[name])]
                        for name in caches})


def prefill_call(m, inputs, state, slots: jax.Array):
  """ONE model call reading known tokens of many blocks (slots [B, P], generation order).

  Content stream first (rows 1..P of the content cache, inclusive mask), then the query
  stream of every slot, each seeing exactly the strictly earlier blocks: its prefix
  state is the BOS term plus the slots of smaller id in this call (linear attention over
  them, as the one-pass model's prefix aggregation), and its attention masks are the
  same id comparisons. Log-probs of the given tokens are recorded; one call is counted.
  """
  index, valid, ids, pos = slot_inputs(inputs, slots)
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
  logits, upper_k, upper_v = query_stream(m, state, ids, pos, pe, aggregate, count, start,
                                          valid, True, inputs["content_ids"],
                                          inputs["upper_ids"])
  state["upper_k"], state["upper_v"] = upper_k, upper_v
  state["log_probs"] = scatter(state["log_probs"], slots, token_log_probs(logits, tokens))
  state["calls"] = state["calls"] + 1
  return state

