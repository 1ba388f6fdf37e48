"""`base_config()`: every experiment field at its default, one comment per field.

Config files in `configs/` start from this and override what they change (each override
commented there). The typed view of each section lives in `armd_jax.train.typed`.
"""

from __future__ import annotations

import importlib.util

import ml_collections
from ml_collections import config_dict

from armd_jax import data as data_lib


def base_config() -> ml_collections.ConfigDict:
  """The experiment ConfigDict with sections model, data, order, optim, train, mesh,
  checkpoint, eval and sample at their defaults."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.kind = "armd"  # which network build_model makes ('armd'; baselines add kinds)
  m.vocab_size = config_dict.placeholder(int)  # None = the data vocabulary's size
  m.d_model = 256  # residual width
  m.num_layers = 4  # total layers L
  m.num_two_stream_layers = config_dict.placeholder(int)  # lower half; None = L // 2
  m.num_heads = 4  # attention heads
  m.mlp_dim = 1024  # MLP hidden width
  m.max_len = 1024  # PE table size (>= train.seq_len and sample.length)
  m.dropout_rate = 0.0  # residual dropout
  m.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  m.attention = "xla"  # attention implementation ('xla' reference, 'pallas' kernel)
  m.remat = "none"  # block rematerialisation: 'none' | 'full' | 'save_dots'
  m.d_pe = 64  # prefix-aggregation PE width
  m.query_init = "prefix_plus_position"  # query-stream init ('prefix' = plain spec)
  m.tie_embeddings = True  # share input embedding and output projection
  m.rope_base = 10_000.0  # RoPE wavelength base
  m.layer_norm_epsilon = 1e-6  # LayerNorm epsilon

  c.data = data_lib.default_config()  # documented in armd_jax/data/config.py

  c.order = o = ml_collections.ConfigDict()
  o.kind = "progressive_permutation"  # left_to_right | progressive_permutation | strided
  #                                     | masked_diffusion
  o.i_ar = 0  # progressive: steps of pure left-to-right training
  o.i_perm = 1  # progressive: step at which k reaches rho
  o.rho = 1  # progressive: final number of shuffled tokens
  o.streams = (1,)  # strided: S drawn uniformly from this set each step
  o.num_steps = 128  # masked_diffusion: number of masking steps T
  o.schedule = "linear"  # masked_diffusion: 'linear' or 'cosine'

  c.optim = p = ml_collections.ConfigDict()
  p.learning_rate = 3e-4  # peak learning rate
  p.warmup_steps = 100  # linear warmup steps
  p.schedule = "cosine"  # after warmup: 'cosine' or 'constant'
  p.end_lr_factor = 0.1  # cosine: final lr / peak
  p.weight_decay = 0.0  # AdamW decay on matrices
  p.b1 = 0.9  # Adam beta1
  p.b2 = 0.999  # Adam beta2
  p.eps = 1e-8  # Adam epsilon
  p.grad_clip_norm = 1.0  # global-norm clipping (0 = off)
  p.ema_decay = 0.0  # parameter EMA decay (0 = no EMA)

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 1000  # optimiser steps
  t.global_batch_size = 32  # sequences per step over all processes
  t.seq_len = 128  # tokens per sequence
  t.seed = 0  # init / per-step rng / data-order seed
  t.log_every = 50  # steps between progress lines
  t.eval_every = 500  # steps between validations (0 = at the end only)
  t.checkpoint_every = 500  # steps between checkpoints (0 = at the end only)
  t.tensorboard = True  # TensorBoard summaries via CLU when installed

  c.mesh = h = ml_collections.ConfigDict()
  h.shape = (-1, 1, 1)  # sizes of the mesh axes (data, fsdp, tensor); -1 = the rest
  h.rule_table = "fsdp_tensor"  # data_parallel | fsdp | fsdp_tensor (partitioning.RULE_TABLES)
  h.rules = ()  # explicit (logical, mesh axes) pairs replacing the table (() = the table)

  c.checkpoint = k = ml_collections.ConfigDict()
  k.max_to_keep = 3  # checkpoints kept
  k.async_save = True  # orbax async checkpointing
  k.init_from = ""  # workdir whose parameters start a fresh run ('' = scratch)

  c.eval = e = ml_collections.ConfigDict()
  e.num_batches = 0  # held-out batches per validation (0 = whole split)
  e.use_ema = True  # evaluate (and sample) with EMA parameters when kept

  c.sample = s = ml_collections.ConfigDict()
  s.num_samples = 0  # samples printed at the end (0 = none)
  s.length = 128  # tokens per sample
  s.streams = 1  # strided parallel streams S
  s.temperature = 1.0  # softmax temperature
  s.top_k = 0  # top-k filter (0 = off)
  s.top_p = 1.0  # nucleus filter (1.0 = off)
  s.seed = 0  # sampling seed
  return c


def config_from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (how configs build on each other)."""
  spec = importlib.util.spec_from_file_location("_armd_config", path)
  if spec is None:
    raise FileNotFoundError(f"no config file at {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
