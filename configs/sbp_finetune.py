"""sbp_finetune: strided-block-permutation fine-tuning for parallel generation [paper].

Starts from the parameters (and their EMA) of a trained `owt_small` run and fine-tunes
with the strided order, S drawn uniformly from {1, 2, 4} every step, so that the model
generates with S streams in N/S + S - 1 calls. The base workdir is
`config.checkpoint.init_from` (default /tmp/armd_owt_small; a missing base is an error,
never a silent start from scratch). The fine-tune's own workdir resumes first.
Expected result [paper]: generative perplexity 36.5 / 37.8 / 39.4 with S = 1 / 2 / 4
(entropy ~8.0), i.e. little loss from 2-4x fewer network calls.
Length and rate (docs/recipes.md): a constant rate at a third of the base's peak, for
a fifth of the base's steps (80K after 400K: the paper's longest SBP, close to the
quarter that sufficed in our study). On tiny
Shakespeare the gain in the exact strided S = 4 ratio was complete after a quarter of
the base's steps (1.111 -> 1.094 over three seeds, no further gain by 2.5x the base's
steps), and at equal extra steps SBP beat continuing in the base order (S = 4 ratio
1.091 vs 1.111; left-to-right perplexity 5.971 vs 6.000, within seed noise). With a constant rate, every
checkpoint along the way is itself a shorter SBP run.

Command:
  python -m armd_jax.main --config=configs/sbp_finetune.py --workdir=$WORKDIR \\
    --config.checkpoint.init_from=$OWT_SMALL_WORKDIR
"""

import os

from armd_jax.train.defaults import config_from_file


def _owt_small():
  return config_from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                       "owt_small.py"))


def get_config():
  """The SBP fine-tuning configuration."""
  c = _owt_small()
  c.checkpoint.init_from = "/tmp/armd_owt_small"  # the base run's workdir (must exist)
  c.order.kind = "strided"  # strided block permutation [paper]
  c.order.streams = (1, 2, 4)  # S uniform over {1, 2, 4} each step [paper]
  c.optim.learning_rate = 1e-4  # a third of owt_small's 3e-4 (docs/recipes.md)
  c.optim.schedule = "constant"  # every checkpoint is a shorter SBP run
  c.optim.warmup_steps = 500  # short warmup from the base
  c.train.num_steps = 80_000  # a fifth of the base's 400K (docs/recipes.md)
  c.sample.streams = 4  # show the 4-stream sampler at the end
  return c
