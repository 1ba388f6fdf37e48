"""Transformer building blocks shared by ARMD and the baselines.

Every attention here is masked by block ids (`kv_id <= q_id`), so one `Block` serves
the content stream, the query stream (ids lowered by one), the causal upper half, a
plain causal GPT (ids = positions) and a bidirectional denoiser (all ids equal).

Logical axis names (for sharding rules, see `armd_jax.train.partitioning`):
params: 'vocab', 'embed', 'mlp', 'heads', 'kv', 'pe'; activations:
'activation_batch', 'activation_length', 'activation_embed', 'activation_heads',
'activation_kv', 'activation_mlp'.
"""

from __future__ import annotations

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from armd_jax import kernels
from armd_jax.models.config import ModelConfig

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
HEADS_ACTIVATION = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

# `jax.checkpoint` policies of `ModelConfig.remat` (None: save nothing but the inputs).
# 'save_dots' keeps matmuls without batch dimensions (the weight projections), not the
# [B, H, Nq, Nk] attention scores, which are recomputed.
REMAT_POLICIES = {"full": None,
                  "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class _LogicallyPartitionedKernel(nn.LogicallyPartitioned):
  """`nn.LogicallyPartitioned` that skips its sharding constraint while the value's rank
  differs from the names' (flax's `DenseGeneral` unboxes its kernel once in a flat 2-D
  shape before reshaping it; under a global mesh that constraint would fail)."""

  def unbox(self, apply_constraint=True):
    if jnp.ndim(self.value) != len(self.names):
      return self.value
    return super().unbox(apply_constraint)


def check_tokens(config: ModelConfig, tokens: jax.Array) -> jax.Array:
  """Validates a [batch, length] integer token array against the config; int32."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an integer [batch, length] array, got "
                     f"{tokens.dtype}{list(tokens.shape)}.")
  if tokens.shape[1] > config.max_len:
    raise ValueError(f"sequence length {tokens.shape[1]} exceeds ModelConfig.max_len="
                     f"{config.max_len}.")
  return tokens.astype(jnp.int32)


def dense_init(*axes: str):
  """Xavier-uniform kernel init annotated with logical axis names."""
  init = nn.initializers.xavier_uniform()
  return lambda *args, **kwargs: _LogicallyPartitionedKernel(init(*args, **kwargs), axes)


def layer_norm(config: ModelConfig, name: str | None = None) -> nn.Module:
  """The config's normalisation in the compute dtype: LayerNorm with float32,
  'embed'-sharded scale and bias, or RMSNorm (scale only) with `config.norm='rms_norm'`."""
  if config.norm == "rms_norm":
    return nn.RMSNorm(
        epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)))
  return nn.LayerNorm(
      epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def token_embedding(config: ModelConfig, num_embeddings: int) -> nn.Embed:
  """The token table [num_embeddings, D] with ('vocab', 'embed') logical axes."""
  return nn.Embed(num_embeddings, config.d_model, dtype=config.compute_dtype,
                  embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                              ("vocab", "embed")),
                  name="embedding")


def position_table(module: nn.Module, config: ModelConfig) -> jax.Array | None:
  """The learned absolute position table [max_len + 1, D] of `module` (call inside its
  setup), or None unless `config.learned_positions`."""
  if not config.learned_positions:
    return None
  return module.param("position_embedding",
                      nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                   (None, "embed")),
                      (config.max_len + 1, config.d_model))


def add_positions(config: ModelConfig, x: jax.Array, table: jax.Array | None,
                  positions: jax.Array | None) -> jax.Array:
  """x [B, N, D] plus rows `positions` [B, N] of the learned table (x itself without one).

  Raises ValueError when the model has a table and no positions were given.
  """
  if table is None:
    return x
  if positions is None:
    raise ValueError("ModelConfig.learned_positions=True: this call needs the rows' "
                     "positions to add the position table.")
  return x + jnp.take(table, positions, axis=0).astype(x.dtype)


def start_embedding(module: nn.Module, config: ModelConfig) -> jax.Array:
  """The learned start-token (BOS) embedding [D] of `module` (call inside its setup)."""
  return module.param("bos_embedding",
                      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                      (config.d_model,))


def output_head(config: ModelConfig) -> nn.Dense | None:
  """The untied output projection D -> vocab, or None with tied embeddings."""
  if config.tie_embeddings:
    return None
  return nn.Dense(config.vocab_size, use_bias=False, dtype=config.compute_dtype,
                  kernel_init=dense_init("embed", "vocab"))


def vocab_logits(config: ModelConfig, h: jax.Array, embedding: nn.Embed,
                 head: nn.Module | None) -> jax.Array:
  """Float32 logits [B, N, vocab_size] from normalised states h [B, N, D].

  With tied embeddings the first `vocab_size` rows of the table are the output
  projection (MDLM's extra [MASK] row is an input only, never an output).
  """
  if config.tie_embeddings:
    table = embedding.embedding[:config.vocab_size].astype(h.dtype)  # [V, D]
    logits = jnp.einsum("bnd,vd->bnv", h, table, preferred_element_type=jnp.float32)
  else:
    logits = head(h)
  return nn.with_logical_constraint(logits.astype(jnp.float32),
                                    ("activation_batch", "activation_length", "vocab"))


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding driven by (original) integer positions.

  Args:
    x: [B, N, H, D] with D even.
    positions: [B, N] int positions; relative offsets are all that matter.
    base: wavelength base.

  Returns:
    [B, N, H, D], same dtype as x (rotation computed in float32); x itself when `base`
    is None (no RoPE).
  """
  if base is None:
    return x
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, N, D/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class Attention(nn.Module):
  """Multi-head attention with RoPE and a block-id mask; K/V may come from other rows."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    bias = lambda *axes: nn.with_logical_partitioning(nn.initializers.zeros, axes)  # noqa: E731
    proj = lambda name, heads: nn.DenseGeneral(  # noqa: E731
        (heads, cfg.head_dim), use_bias=cfg.attention_bias, dtype=cfg.compute_dtype,
        kernel_init=dense_init("embed", "heads", "kv"), bias_init=bias("heads", "kv"),
        name=name)
    self.query = proj("query", cfg.num_heads)
    self.key, self.value = proj("key", cfg.kv_heads), proj("value", cfg.kv_heads)
    self.out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=cfg.attention_bias,
                               dtype=cfg.compute_dtype,
                               kernel_init=dense_init("heads", "kv", "embed"),
                               bias_init=bias("embed"), name="out")

  def keys_values(self, h: jax.Array, positions: jax.Array,
                  repeat: bool = True) -> Tuple[jax.Array, jax.Array]:
    """Rotated keys and values [B, Nk, H, Dh] of normalised inputs h [B, Nk, D].

    With grouped-query attention (`num_kv_heads` < num_heads) each key/value head is
    repeated for its num_heads / num_kv_heads query heads (head h reads kv head
    h // group), so the attention kernels get num_heads heads. repeat=False returns the
    [B, Nk, Hkv, Dh] key/value heads themselves (what the decoders' KV caches store).
    """
    cfg = self.config
    k = apply_rope(self.key(h), positions, cfg.rope_base)  # [B, Nk, Hkv, Dh]
    v = self.value(h)
    if repeat and cfg.kv_heads != cfg.num_heads:
      k = jnp.repeat(k, cfg.num_heads // cfg.kv_heads, axis=2)  # [B, Nk, H, Dh]
      v = jnp.repeat(v, cfg.num_heads // cfg.kv_heads, axis=2)
    return (nn.with_logical_constraint(k, HEADS_ACTIVATION),
            nn.with_logical_constraint(v, HEADS_ACTIVATION))

  def attend(self, h: jax.Array, positions: jax.Array, ids: jax.Array, k: jax.Array,
             v: jax.Array, kv_ids: jax.Array,
             q_segments: Tuple[int, ...] | None = None) -> jax.Array:
    """Queries from h [B, Nq, D] at `positions`, `ids` attend to k, v with `kv_ids`.

    `q_segments`: lengths of the sorted query runs (the kernel pads each to a tile).
    Returns [B, Nq, D].
    """
    q = apply_rope(self.query(h), positions, self.config.rope_base)  # [B, Nq, H, Dh]
    q = nn.with_logical_constraint(q, HEADS_ACTIVATION)
    return self.out(attention(self.config, q, k, v, ids, kv_ids, q_segments))


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array,
              kv_ids: jax.Array, q_segments: Tuple[int, ...] | None = None) -> jax.Array:
  """`kernels.block_causal_attention` of q [B, Nq, H, Dh] on k, v [B, Nk, H, Dh].

  The 'pallas' kernel is an opaque custom call that XLA cannot partition, so under a
  mesh (the train / eval steps set one with `partitioning.activation_sharding`) it runs
  inside `jax.shard_map` on that mesh: q, k and v (both ARMD streams' queries and the
  K/V they share) are split alike, batch over the 'activation_batch' mesh axes and
  heads over the 'activation_heads' axes of the rule table; ids split over the batch.
  Each device then runs the kernel on its own rows and heads; no communication. Called
  inside the caller's own `shard_map` (every mesh axis manual), it runs the kernel on the
  per-device rows it is given.
  `q_segments`: lengths of the sorted query runs along Nq (the kernel pads each to a tile).
  """
  call = functools.partial(
      kernels.block_causal_attention, implementation=cfg.attention_implementation,
      interpret=cfg.pallas_interpret,
      block_sizes=(kernels.BlockSizes(cfg.pallas_block_q, cfg.pallas_block_kv)
                   if cfg.pallas_block_q else None),  # None: per platform
      q_segments=q_segments)
  mesh = jax.sharding.get_abstract_mesh()
  if (cfg.attention_implementation != "pallas" or mesh.empty or mesh.size == 1
      or mesh.are_all_axes_manual):  # inside the caller's shard_map: already per device
    return call(q, k, v, q_ids, kv_ids)
  spec = divisible_spec(nn.logical_to_mesh_axes(HEADS_ACTIVATION), q.shape, mesh)
  id_spec = P(spec[0], None)
  # The Pallas interpreter (always used on CPU) slices blocks with unvarying indices,
  # which the varying-axes check rejects; compiled kernels keep the check.
  interpreted = cfg.pallas_interpret or jax.default_backend() == "cpu"
  sharded = jax.shard_map(call, mesh=mesh, in_specs=(spec, spec, spec, id_spec, id_spec),
                          out_specs=spec, check_vma=not interpreted)
  return sharded(q, k, v, q_ids, kv_ids)


def divisible_spec(spec: P, shape: Tuple[int, ...], mesh) -> P:
  """`spec` without the mesh axes that do not divide their dimension (those replicate).

  `mesh` is a `Mesh` or `AbstractMesh` (anything with a `shape` {axis: size} mapping).
  """
  entries = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for dim, axes in zip(shape, entries):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for name in names:
      size *= mesh.shape[name]
    out.append(axes if dim % size == 0 else None)
  return P(*out)


class Mlp(nn.Module):
  """The MLP: two-layer GELU (tanh approximation), or SwiGLU with
  `config.mlp_activation='swiglu'` (`wo(silu(wi_gate(x)) * wi(x))`)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda features, axes, name: nn.Dense(  # noqa: E731
        features, use_bias=cfg.mlp_bias, dtype=cfg.compute_dtype, kernel_init=dense_init(*axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]), name=name)
    h = dense(cfg.mlp_dim, ("embed", "mlp"), "wi")(x)  # [B, N, F]
    if cfg.mlp_activation == "swiglu":
      h = nn.silu(dense(cfg.mlp_dim, ("embed", "mlp"), "wi_gate")(x)) * h
    else:
      h = nn.gelu(h)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length",
                                       "activation_mlp"))
    return dense(cfg.d_model, ("mlp", "embed"), "wo")(h)


class Block(nn.Module):
  """Pre-norm transformer layer whose attention is masked by block ids.

  `__call__` runs the layer on x [B, Nq, D] with keys/values taken from its first
  `kv_len` rows; that is how the two ARMD streams share one call and one set of weights.
  `keys_values` and `attend` expose the two halves for KV-cached decoding, and
  `after_attention` the rest of the layer for a caller that computes the attention itself.
  """

  config: ModelConfig

  def setup(self):
    self.ln_attn = layer_norm(self.config)
    self.attn = Attention(self.config)
    self.ln_mlp = layer_norm(self.config)
    self.mlp = Mlp(self.config)
    self.dropout = nn.Dropout(self.config.dropout_rate)

  def keys_values(self, x: jax.Array, positions: jax.Array,
                  repeat: bool = True) -> Tuple[jax.Array, jax.Array]:
    """Keys and values [B, Nk, H, Dh] that rows x [B, Nk, D] contribute ([B, Nk, Hkv, Dh]
    with repeat=False: `Attention.keys_values`)."""
    return self.attn.keys_values(self.ln_attn(x), positions, repeat)

  def attend(self, x: jax.Array, positions: jax.Array, ids: jax.Array, k: jax.Array,
             v: jax.Array, kv_ids: jax.Array, deterministic: bool = True) -> jax.Array:
    """Updates query rows x [B, Nq, D] attending to given k, v [B, Nk, H, Dh]."""
    return self.after_attention(
        x, self.attn.attend(self.ln_attn(x), positions, ids, k, v, kv_ids), deterministic)

  def __call__(self, x: jax.Array, positions: jax.Array, ids: jax.Array,
               kv_len: int | None = None, deterministic: bool = True) -> jax.Array:
    """x [B, Nq, D], positions/ids [B, Nq]; K/V from rows [:kv_len]. Returns [B, Nq, D].

    With `config.remat` other than 'none' the layer runs under `jax.checkpoint` with
    that policy (`REMAT_POLICIES`): same values and gradients, less memory kept.
    """
    kv_len = x.shape[1] if kv_len is None else kv_len
    # Arguments: 0 the module, 1 x, 2 positions, 3 ids, 4 kv_len, 5 deterministic.
    return self._maybe_remat(Block._layer, (4, 5))(self, x, positions, ids, kv_len,
                                                   deterministic)

  def cross(self, x: jax.Array, positions: jax.Array, ids: jax.Array, kv_x: jax.Array,
            kv_positions: jax.Array, kv_ids: jax.Array, deterministic: bool = True) -> jax.Array:
    """Updates query rows x [B, Nq, D] attending to the K/V of other rows kv_x [B, Nk, D].

    ARMD's lean last two-stream layer: the content rows only contribute keys and values,
    the query rows are updated. Rematerialised like `__call__` under `config.remat`.
    """
    # Arguments: 0 the module, 1 x, 2 positions, 3 ids, 4 kv_x, 5 kv_positions, 6 kv_ids,
    # 7 deterministic.
    return self._maybe_remat(Block._cross, (7,))(self, x, positions, ids, kv_x, kv_positions,
                                                 kv_ids, deterministic)

  def _maybe_remat(self, method, static_argnums: Tuple[int, ...]):
    """`method` (unbound) under `nn.remat` with the config's policy, or as it is."""
    if self.config.remat == "none":
      return method
    return nn.remat(method, policy=REMAT_POLICIES[self.config.remat],
                    static_argnums=static_argnums)

  def _cross(self, x: jax.Array, positions: jax.Array, ids: jax.Array, kv_x: jax.Array,
             kv_positions: jax.Array, kv_ids: jax.Array, deterministic: bool) -> jax.Array:
    k, v = self.keys_values(kv_x, kv_positions)
    return self.attend(x, positions, ids, k, v, kv_ids, deterministic)

  def _layer(self, x: jax.Array, positions: jax.Array, ids: jax.Array, kv_len: int,
             deterministic: bool) -> jax.Array:
    h = self.ln_attn(x)
    k, v = self.attn.keys_values(h[:, :kv_len], positions[:, :kv_len])
    # Two streams (content rows, then query rows): two sorted runs for the kernel.
    segments = None if kv_len == x.shape[1] else (kv_len, x.shape[1] - kv_len)
    y = self.attn.attend(h, positions, ids, k, v, ids[:, :kv_len], q_segments=segments)
    return self.after_attention(x, y, deterministic)

  def after_attention(self, x: jax.Array, y: jax.Array,
                      deterministic: bool = True) -> jax.Array:
    """The layer after its attention: rows x [B, Nq, D] plus the projected attention
    output y [B, Nq, D], then the pre-norm MLP with its residual (dropout on both unless
    deterministic). Returns [B, Nq, D].

    The KV-cached decoder (`armd_jax.sampling.cache`) computes y on its caches and
    finishes the layer here.
    """
    x = x + self.dropout(y, deterministic=deterministic)
    x = x + self.dropout(self.mlp(self.ln_mlp(x)), deterministic=deterministic)
    return nn.with_logical_constraint(x, ACTIVATION)
