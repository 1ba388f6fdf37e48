"""Typed model configuration shared by ARMD and the baselines built from its blocks."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

# The networks of the family (`armd_jax.models.build_model`); `armd_jax.registry.KINDS`
# holds what each kind trains, scores and samples with, one row per name here.
MODEL_KINDS = ("armd", "ar", "mdlm")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "pallas")
PREFIX_AGGREGATIONS = ("auto", "dense", "chunked")
QUERY_INITS = ("prefix", "prefix_plus_position")
REMAT_POLICIES = ("none", "full", "save_dots")
NORMS = ("layer_norm", "rms_norm")
MLP_ACTIVATIONS = ("gelu", "swiglu")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
  """Returns a jnp dtype for a dtype object or one of 'float32', 'bfloat16', 'float16'."""
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"ModelConfig.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[dtype]
  return jnp.dtype(dtype).type


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the ARMD network (docs/method.md, section 2).

  Attributes:
    kind: which network of the family `build_model` makes: 'armd', 'ar' (causal GPT
      baseline) or 'mdlm' (masked-diffusion baseline; reads one extra [MASK] token id
      = vocab_size). The baselines ignore the ARMD-only fields (num_two_stream_layers,
      d_pe, query_init).
    vocab_size: number of token ids the model reads and predicts.
    d_model: width of the residual stream.
    num_layers: total transformer layers L.
    num_two_stream_layers: layers in the two-stream lower half; None means L // 2.
    num_heads: attention heads; must divide d_model.
    mlp_dim: hidden width of each MLP.
    max_len: largest original position + 1 (size of the learned PE table).
    dropout_rate: residual dropout on attention and MLP outputs (training only).
    dtype: compute dtype ('float32' / 'bfloat16' or a jnp dtype); params stay float32
      and logits are returned in float32.
    attention: 'xla' (reference, materialises the id mask), 'pallas' (kernel) or
      'auto' (Pallas on TPU / GPU, XLA on CPU; resolved when the model is traced, see
      `attention_implementation`).
    pallas_block_q: query tile of the Pallas kernel (multiple of 128 on TPU, power of
      two >= 16 on GPU, multiple of 8 in interpret mode); passed to the kernel entry
      point `armd_jax.kernels.block_causal_attention` as `BlockSizes`. 0 (default, with
      pallas_block_kv 0): per platform, `armd_jax.kernels.default_block_sizes` (128 x 128
      on TPU, 64-wide tiles on GPU from the H200 tile sweep).
    pallas_block_kv: key tile of the Pallas kernel (same constraints).
    pallas_interpret: run the Pallas kernel under the Pallas interpreter (CPU tests;
      on CPU 'pallas' is always interpreted).
    remat: activation rematerialisation of every transformer block (`jax.checkpoint`):
      'none' (keep every activation for the backward pass), 'full' (keep only each
      block's input, recompute the rest) or 'save_dots' (keep the outputs of the
      weight matmuls, recompute the rest: attention scores, softmax, GELU, norms).
      Applies to every layer, ARMD's lean last two-stream layer (`Block.cross`) included.
    d_pe: width of the prefix-aggregation position table.
    prefix_aggregation: how G0 is computed: 'dense' (materialises a [B, N, N+1] weight
      tensor), 'chunked' (linear attention in generation order, O(N) memory; the
      model sorts by block id first) or 'auto' (chunked on the Pallas path, dense
      otherwise). See `armd_jax.models.prefix`.
    prefix_chunk: rows per chunk of the chunked prefix aggregation.
    query_init: how the query stream starts. 'prefix' is the method's prefix aggregation
      (mean over visible tokens, then LayerNorm); 'prefix_plus_position' also adds a
      learned projection of the target position's PE row (a calibration ablation, docs/benchmarks.md).
    tie_embeddings: share the token embedding with the output projection.
    rope_base: RoPE wavelength base; None: no rotary embedding (attention sees
      positions only through `learned_positions`, as in GPT-2).
    layer_norm_epsilon: epsilon of every normalisation layer (LayerNorm or RMSNorm).

  Architecture options (defaults give the original blocks; `armd_jax.convert` sets them
  to read GPT-2 and Llama-family weights into the same modules):
    norm: 'layer_norm' (scale and bias) or 'rms_norm' (scale only, Llama).
    mlp_activation: 'gelu' (two-layer MLP, tanh-approximated GELU) or 'swiglu'
      (`wo(silu(wi_gate(x)) * wi(x))`, Llama).
    mlp_bias: biases on the MLP projections.
    attention_bias: biases on the query, key, value and output projections (GPT-2).
    num_kv_heads: key/value heads (grouped-query attention); must divide num_heads.
      None: num_heads. Keys and values are repeated to num_heads for the attention
      kernels (`keys_values`); the decoders' KV caches keep the num_kv_heads heads
      (num_heads / num_kv_heads times less cache memory) and group the queries instead.
    learned_positions: add a learned absolute position table [max_len + 1, D]
      (`position_embedding`) to the input rows, indexed by the row's RoPE position
      (AR: row j; ARMD: the start token 0, token p at p + 1; MDLM: p).
  """

  vocab_size: int
  kind: str = "armd"
  d_model: int = 256
  num_layers: int = 4
  num_two_stream_layers: Optional[int] = None
  num_heads: int = 4
  mlp_dim: int = 1024
  max_len: int = 1024
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  attention: str = "xla"
  pallas_block_q: int = 0
  pallas_block_kv: int = 0
  pallas_interpret: bool = False
  remat: str = "none"
  d_pe: int = 64
  prefix_aggregation: str = "auto"
  prefix_chunk: int = 256
  query_init: str = "prefix_plus_position"
  tie_embeddings: bool = True
  rope_base: Optional[float] = 10_000.0
  layer_norm_epsilon: float = 1e-6
  norm: str = "layer_norm"
  mlp_activation: str = "gelu"
  mlp_bias: bool = True
  attention_bias: bool = False
  num_kv_heads: Optional[int] = None
  learned_positions: bool = False

  def __post_init__(self):
    if self.num_two_stream_layers is None:
      object.__setattr__(self, "num_two_stream_layers", self.num_layers // 2)
    _positive(self, "vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim",
              "max_len", "d_pe", "prefix_chunk")
    if self.d_model % self.num_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must divide "
                       f"ModelConfig.d_model={self.d_model}.")
    if self.rope_base is not None and (self.d_model // self.num_heads) % 2:
      raise ValueError(f"ModelConfig.d_model / num_heads = {self.d_model // self.num_heads} "
                       "must be even for RoPE (or rope_base=None: no RoPE).")
    if self.rope_base is not None and not self.rope_base > 0:
      raise ValueError(f"ModelConfig.rope_base={self.rope_base} must be positive, or None "
                       "for no RoPE.")
    if self.num_kv_heads is not None and (
        not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0
        or self.num_heads % self.num_kv_heads):
      raise ValueError(f"ModelConfig.num_kv_heads={self.num_kv_heads!r} must be None or a "
                       f"positive int dividing num_heads={self.num_heads}.")
    if self.norm not in NORMS:
      raise ValueError(f"ModelConfig.norm must be one of {NORMS}, got {self.norm!r}.")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"ModelConfig.mlp_activation must be one of {MLP_ACTIVATIONS}, got "
                       f"{self.mlp_activation!r}.")
    if not 0 <= self.num_two_stream_layers <= self.num_layers:
      raise ValueError(f"ModelConfig.num_two_stream_layers={self.num_two_stream_layers} must "
                       f"be in [0, num_layers={self.num_layers}].")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"ModelConfig.dropout_rate={self.dropout_rate} must be in [0, 1).")
    if self.kind not in MODEL_KINDS:
      raise ValueError(f"ModelConfig.kind must be one of {MODEL_KINDS}, got {self.kind!r}.")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {self.attention!r}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}.")
    for name in ("pallas_block_q", "pallas_block_kv"):
      if getattr(self, name) < 0 or getattr(self, name) % 8:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be 0 (per platform) "
                         "or a positive multiple of 8 (Pallas tiles: multiples of 128 on TPU, "
                         "powers of two >= 16 on GPU).")
    if (self.pallas_block_q == 0) != (self.pallas_block_kv == 0):
      raise ValueError("ModelConfig.pallas_block_q and pallas_block_kv are set together: both "
                       f"0 (per platform) or both tiles, got {self.pallas_block_q} and "
                       f"{self.pallas_block_kv}.")
    if self.prefix_aggregation not in PREFIX_AGGREGATIONS:
      raise ValueError(f"ModelConfig.prefix_aggregation must be one of {PREFIX_AGGREGATIONS}, "
                       f"got {self.prefix_aggregation!r}.")
    if self.query_init not in QUERY_INITS:
      raise ValueError(f"ModelConfig.query_init must be one of {QUERY_INITS}, "
                       f"got {self.query_init!r}.")
    resolve_dtype(self.dtype)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads: `num_kv_heads`, or num_heads when unset."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def attention_implementation(self) -> str:
    """'xla' or 'pallas': `attention` with 'auto' resolved by the default backend."""
    if self.attention != "auto":
      return self.attention
    return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"

  @property
  def prefix_implementation(self) -> str:
    """'dense' or 'chunked': `prefix_aggregation` with 'auto' resolved."""
    if self.prefix_aggregation != "auto":
      return self.prefix_aggregation
    return "chunked" if self.attention_implementation == "pallas" else "dense"

  @property
  def compute_dtype(self) -> Any:
    return resolve_dtype(self.dtype)

  def replace(self, **changes) -> "ModelConfig":
    """Returns a validated copy with some fields changed."""
    return dataclasses.replace(self, **changes)


def _positive(config: ModelConfig, *names: str) -> None:
  for name in names:
    value = getattr(config, name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}.")
