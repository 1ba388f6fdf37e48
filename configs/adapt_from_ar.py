"""adapt_from_ar: ARMD fine-tuned from a pretrained AR model (docs/training.md,
"Adapting a pretrained AR model").

Starts from an AR run of the same shape: `config.checkpoint.init_from` names an AR
workdir of ours (default /tmp/armd_shakespeare_ar, the `shakespeare` model trained as
kind 'ar'; a missing base is an error, never a silent start from scratch). ARMD's shared
weights (embeddings, start row, every layer, final norm, head) are copied from the AR
model and its ARMD-only ones (PE table, query-stream norm and position projection) start
fresh (`armd_jax.convert.adapt_ar_params`). An imported Hugging Face model
(`python -m armd_jax.convert import --kind=armd`) is already adapted: point init_from at
it and set config.model to its saved model section.
Orders: a short left-to-right phase (the copied layers already know that order; the
fresh query-stream parameters learn to feed them), then a ramp to 8 shuffled tokens.
Schedule: AdamW 5e-4 (half the pre-training peak), 50 warmup steps, cosine, 600 steps.
Expected result: not measured at this size. At a smaller size on CPU (width 64, 2
layers, 1000 AR + 300 ARMD steps; benchmarks/results/adapt_from_ar.json, docs/training.md)
the adapted ARMD was worse than ARMD from scratch for 1300 steps (held-out perplexity
8.88 vs 7.53 left-to-right, 10.37 vs 8.53 strided S = 4): at that budget adaptation
did not pay.

Commands:
  python -m armd_jax.main --config=configs/shakespeare.py --config.model.kind=ar \\
    --workdir=/tmp/armd_shakespeare_ar
  python -m armd_jax.main --config=configs/adapt_from_ar.py --workdir=$WORKDIR \\
    --config.checkpoint.init_from=/tmp/armd_shakespeare_ar
"""

import os

from armd_jax.train.defaults import config_from_file


def get_config():
  """The AR -> ARMD adaptation recipe on the `shakespeare` model."""
  c = config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "shakespeare.py"))
  c.model.kind = "armd"  # the AR base's shared fields stay as in shakespeare.py
  c.checkpoint.init_from = "/tmp/armd_shakespeare_ar"  # the AR base workdir (must exist)
  c.order.kind = "progressive_permutation"  # left-to-right first, then shuffled tokens
  c.order.i_ar = 100  # the fresh query-stream parameters learn on the AR's own order
  c.order.i_perm = 400  # k reaches rho at step 400
  c.order.rho = 8  # up to 8 shuffled tokens, as in shakespeare.py
  c.optim.learning_rate = 5e-4  # half the pre-training peak: keep what the AR learned
  c.optim.warmup_steps = 50  # short warmup from the base
  c.train.num_steps = 600  # adaptation budget at this size
  c.train.eval_every = 200  # three validations
  c.train.checkpoint_every = 200  # three checkpoints
  return c
