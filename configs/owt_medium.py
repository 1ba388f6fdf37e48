"""owt_medium: the paper's OpenWebText GPT-2-medium setting for ARMD.

Same data, order schedule and optimiser as `owt_small` (see there); the model is GPT-2
medium: 24 layers (12 two-stream), width 1024, 16 heads, MLP 4096.
Mesh: target slice TPU v5p-128 (64 chips, 128 TensorCores): FSDP x 4-way tensor
parallelism, mesh (data 1, fsdp 16, tensor 4) with the 'fsdp_tensor' rule table (heads,
MLP and vocabulary over 'tensor', the embed dimension over 'fsdp'); `(1, -1, 4)` takes
any device count that is a multiple of 4 and divides 4 x 512. On N slices that is the
mesh inside each slice and `mesh.dcn_shape` (-1, 1, 1) puts the slices on 'data'.
On a v5e-64 slice this mesh does not fit (docs/scaling.md); there use
`--config.mesh.shape='(1,-1,1)' --config.mesh.rule_table=fsdp --config.model.remat=full`
(compiled: 4.94 GiB of 14.90 per chip with the Pallas kernel).
Expected result: better than owt_small at equal steps (the paper reports the medium
model in its generative-perplexity study).

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
  c.mesh.shape = (1, -1, 4)  # v5p-128: fsdp 16 x tensor 4 (heads, MLP, vocabulary)
  c.mesh.rule_table = "fsdp_tensor"  # weights over fsdp (embed) and tensor
  c.mesh.dcn_shape = (-1, 1, 1)  # several slices: data parallel across them (DCN)
  return c
