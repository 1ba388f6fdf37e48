"""lm1b_small: the paper's LM1B setting (docs/method.md, section 3) for ARMD.

Data: TFDS `lm1b` (train / test), bert-base-uncased WordPiece (Hugging Face tokenizer;
`config.data.hf_tokenizer` may point at a local tokenizer.json), sentences joined with EOS
and packed into 128-token sequences ('concat'; use `--config.data.packing=pad` for the
padded protocol, ~4 PPL apart). Model: 12 layers (6 two-stream), width 768, 12 heads.
Order: progressive permutation, i_AR = 100K, i_perm = 300K, rho = 8 [paper].
Optimiser (unpublished; MDLM defaults): AdamW 3e-4, 2.5K warmup, constant, EMA 0.9999,
dropout 0.1; batch 512; bf16 compute.
Expected result [paper]: test perplexity 23.64 after 300K steps, 22.36 after 1M
(exact left-to-right NLL); needs accelerators.
Mesh: target slice TPU v5e-16 (16 chips): FSDP over every chip, mesh (data 1, fsdp 16,
tensor 1), 'fsdp' rule table; `(1, -1, 1)` takes any device count dividing 512 (e.g. 8
GPUs).

Command:
  python -m armd_jax.main --config=configs/lm1b_small.py --workdir=$WORKDIR
  (several hosts: launch/train_multihost.sh configs/lm1b_small.py $WORKDIR)
"""

from armd_jax.train.defaults import base_config


def get_config():
  """The LM1B configuration."""
  c = base_config()
  c.model.d_model = 768  # GPT-2 small width
  c.model.num_layers = 12  # 12 layers ...
  c.model.num_two_stream_layers = 6  # ... the lower 6 two-stream [paper]
  c.model.num_heads = 12  # head dim 64
  c.model.mlp_dim = 3072  # 4x width
  c.model.max_len = 128  # = seq_len
  c.model.dropout_rate = 0.1  # MDLM default
  c.model.dtype = "bfloat16"  # bf16 compute, float32 params
  c.model.attention = "auto"  # Pallas kernel on TPU / GPU (O(N) memory), XLA on CPU

  c.data.task = "lm1b"  # TFDS lm1b
  c.data.vocab = "hf"  # bert-base-uncased WordPiece [paper]
  c.data.hf_tokenizer = "bert-base-uncased"  # or a local tokenizer.json
  c.data.packing = "concat"  # sentences joined with EOS

  c.order.kind = "progressive_permutation"  # [paper]
  c.order.i_ar = 100_000  # [paper]
  c.order.i_perm = 300_000  # [paper]
  c.order.rho = 8  # [paper]

  c.optim.learning_rate = 3e-4  # MDLM default
  c.optim.warmup_steps = 2_500  # MDLM default
  c.optim.schedule = "constant"  # MDLM default
  c.optim.ema_decay = 0.9999  # MDLM default

  c.train.num_steps = 1_000_000  # [paper] (300K for the shorter table row)
  c.train.global_batch_size = 512  # [paper]
  c.train.seq_len = 128  # LM1B protocol
  c.train.log_every = 100  # progress line every 100 steps
  c.train.eval_every = 10_000  # validation every 10K steps
  c.train.checkpoint_every = 5_000  # checkpoints every 5K steps

  c.mesh.shape = (1, -1, 1)  # v5e-16: FSDP over all 16 chips (data, fsdp, tensor)
  c.mesh.rule_table = "fsdp"  # weights split over 'fsdp', batch over data x fsdp

  c.eval.num_batches = 0  # the whole test split

  c.sample.num_samples = 4  # a few samples at the end
  c.sample.length = 128  # one sequence
  c.sample.streams = 4  # strided generation, 35 calls
  return c
