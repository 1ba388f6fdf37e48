"""tiny: the configuration the tests train (synthetic data, seconds on one CPU core).

Purpose: exercise the whole training system (data, sharded step, eval, checkpoints,
resume) in seconds. Data: DATA's in-memory 'synthetic' Markov corpus at byte level, so
no file or download is needed. Expected result: train loss falls from ~5.6 (ln 259)
to below 3.5 in 60 steps; the numbers mean nothing beyond that.

Command:
  python -m armd_jax.main --config=configs/tiny.py --workdir=/tmp/armd_tiny
"""

from armd_jax.train.defaults import base_config


def get_config():
  """The tiny test configuration."""
  c = base_config()
  c.model.d_model = 32  # tiny width
  c.model.num_layers = 2  # one two-stream + one causal layer
  c.model.num_heads = 2  # head dim 16
  c.model.mlp_dim = 64  # tiny MLP
  c.model.max_len = 32  # >= train.seq_len and sample.length
  c.model.d_pe = 16  # small PE table

  c.data.task = "synthetic"  # in-memory Markov text, no files
  c.data.synthetic_num_documents = 400  # small corpus, quick to tokenise
  c.data.num_threads = 0  # read in the training thread (deterministic, no workers)

  c.order.kind = "progressive_permutation"  # the paper's main-run schedule ...
  c.order.i_ar = 10  # ... left-to-right for 10 steps,
  c.order.i_perm = 40  # ... k ramping to rho by step 40,
  c.order.rho = 16  # ... up to a uniform random order over 16 tokens

  c.optim.learning_rate = 3e-3  # high lr: tiny model, few steps
  c.optim.warmup_steps = 5  # short warmup
  c.optim.ema_decay = 0.9  # exercise the EMA path

  c.train.num_steps = 60  # seconds on CPU
  c.train.global_batch_size = 8  # small batch
  c.train.seq_len = 16  # short sequences
  c.train.log_every = 10  # progress line every 10 steps
  c.train.eval_every = 30  # one mid-run validation
  c.train.checkpoint_every = 20  # three checkpoints
  c.train.tensorboard = False  # console + metrics.jsonl only (no TensorFlow import)

  c.eval.num_batches = 4  # a few held-out batches
  c.sample.length = 16  # if samples are asked for (--config.sample.num_samples=2)
  return c
