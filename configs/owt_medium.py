"""owt_medium: the paper's OpenWebText GPT-2-medium setting for ARMD.

Same data, order schedule and optimiser as `owt_small` (see there); the model is GPT-2
medium: 24 layers (12 two-stream), width 1024, 16 heads, MLP 4096, with 4-way tensor
parallelism over the 'model' mesh axis by default.
Expected result: better than owt_small at equal steps (the paper reports the medium
model in its generative-perplexity study); needs e.g. 16+ A100/H100 or a TPU v4-128.

Command:
  python -m armd_jax.main --config=configs/owt_medium.py --workdir=$WORKDIR
"""

import os

from armd_jax.train.defaults import config_from_file


def _owt_small():
  return config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "owt_small.py"))


def get_config():
  """The OpenWebText GPT-2-medium configuration."""
  c = _owt_small()
  c.model.d_model = 1024  # GPT-2 medium
  c.model.num_layers = 24  # 24 layers ...
  c.model.num_two_stream_layers = 12  # ... the lower 12 two-stream
  c.model.num_heads = 16  # head dim 64
  c.model.mlp_dim = 4096  # 4x width
  c.mesh.shape = (-1, 4)  # 4-way tensor parallelism (heads, MLP, vocabulary)
  return c
