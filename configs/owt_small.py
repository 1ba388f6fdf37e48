"""owt_small: the paper's OpenWebText GPT-2-small setting (docs/method.md, section 3) for ARMD.

Data: Hugging Face `openwebtext` (needs `pip install -e .[hf]` and the dataset; the last
0.05% of documents held out), GPT-2 BPE, documents joined with EOS into 1024-token
sequences. Model: GPT-2 small, 12 layers (6 two-stream), width 768, 12 heads.
Order: progressive permutation, i_AR = 9K, i_perm = 48K, rho = 32 [paper].
Optimiser (unpublished; MDLM defaults): AdamW 3e-4, 2.5K warmup, constant, EMA 0.9999;
batch 512; bf16 compute.
Expected result [paper], after 400K steps: zero-shot perplexity WikiText2 35.64,
WikiText103 35.15, 1BW 52.94, PTB 123.43, LAMBADA 45.35; generative perplexity ~36.5
sequential. Needs accelerators.
Mesh: target slice TPU v5e-64 (64 chips): FSDP over every chip, mesh (data 1, fsdp 64,
tensor 1) with the 'fsdp' rule table (parameters, Adam moments and EMA split over
'fsdp'); the same `(1, -1, 1)` takes any device count dividing the batch of 512.
On N slices (`launch/xpk.sh --num_slices=N`) that is the mesh inside each slice, and
`mesh.dcn_shape` (-1, 1, 1) puts the slices on 'data' over the data-centre network:
mesh (N, 64, 1) on v5e-64s, parameters gathered only inside a slice, one gradient
all-reduce per step across slices.

Command:
  python -m armd_jax.main --config=configs/owt_small.py --workdir=$WORKDIR
  (several hosts: launch/train_multihost.sh configs/owt_small.py $WORKDIR)
"""

from armd_jax.train.defaults import base_config


def get_config():
  """The OpenWebText GPT-2-small configuration."""
  c = base_config()
  c.model.d_model = 768  # GPT-2 small
  c.model.num_layers = 12  # 12 layers ...
  c.model.num_two_stream_layers = 6  # ... the lower 6 two-stream [paper]
  c.model.num_heads = 12  # head dim 64
  c.model.mlp_dim = 3072  # 4x width
  c.model.max_len = 1024  # = seq_len
  c.model.dtype = "bfloat16"  # bf16 compute, float32 params
  c.model.attention = "auto"  # Pallas kernel on TPU / GPU (O(N) memory), XLA on CPU

  c.data.task = "openwebtext"  # Hugging Face datasets
  c.data.vocab = "hf"  # GPT-2 BPE [paper]
  c.data.hf_tokenizer = "gpt2"  # or a local tokenizer.json
  c.data.eval_fraction = 0.0005  # held-out documents
  c.data.packing = "concat"  # documents joined with EOS

  c.order.kind = "progressive_permutation"  # [paper]
  c.order.i_ar = 9_000  # [paper]
  c.order.i_perm = 48_000  # [paper]
  c.order.rho = 32  # [paper]

  c.optim.learning_rate = 3e-4  # MDLM default
  c.optim.warmup_steps = 2_500  # MDLM default
  c.optim.schedule = "constant"  # MDLM default
  c.optim.ema_decay = 0.9999  # MDLM default

  c.train.num_steps = 400_000  # [paper]
  c.train.global_batch_size = 512  # [paper]
  c.train.seq_len = 1024  # [paper]
  c.train.log_every = 100  # progress line every 100 steps
  c.train.eval_every = 10_000  # validation every 10K steps
  c.train.checkpoint_every = 5_000  # checkpoints every 5K steps

  c.mesh.shape = (1, -1, 1)  # v5e-64: FSDP over all 64 chips (data, fsdp, tensor)
  c.mesh.rule_table = "fsdp"  # weights split over 'fsdp', batch over data x fsdp
  c.mesh.dcn_shape = (-1, 1, 1)  # several slices: data parallel across them (DCN)

  c.eval.num_batches = 100  # 100 x 512 x 1024 held-out tokens

  c.sample.num_samples = 4  # a few samples at the end
  c.sample.length = 1024  # one sequence
  c.sample.streams = 4  # strided generation: 259 calls
  return c
