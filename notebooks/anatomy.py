# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Anatomy of ARMD, in pictures
#
# ARMD gives every token a **block id**: the reverse-diffusion step that reveals it. The
# network is *strictly causal in block ids*: `logits[n]` depends only on tokens whose
# block id is smaller than `b(n)`. One forward pass therefore yields every conditional
# of every denoising step, like teacher forcing in a GPT. This notebook draws the orders,
# the masks they induce, a causality check on a trained model, and the prefix
# aggregation that initialises the query stream. Everything comes from `armd_jax`.

# %%
# Install armd-jax in a fresh runtime (Colab); does nothing when it is already importable.
# Inside a checkout of the repository that checkout is installed; anywhere else (a notebook
# opened alone) the repository is cloned from ARMD_JAX_SOURCE (its git URL: set it here or
# in the environment variable of the same name). The clone also holds configs/.
import importlib
import importlib.util
import os
import subprocess
import sys

ARMD_JAX_SOURCE = os.environ.get("ARMD_JAX_SOURCE", "")  # e.g. "https://github.com/OWNER/armd-jax"

if importlib.util.find_spec("armd_jax") is None:
  checkout = next((p for p in (".", "..", "armd-jax") if os.path.exists(os.path.join(p, "setup.py"))),
                  None)
  if checkout is None:
    if not ARMD_JAX_SOURCE:
      raise RuntimeError("armd-jax is not installed and this notebook is not inside a checkout: "
                         "set ARMD_JAX_SOURCE (first code cell, or the environment variable) to "
                         "the repository's git URL, or clone it next to the notebook.")
    try:
      subprocess.run(["git", "clone", "-q", "--depth=1", ARMD_JAX_SOURCE, "armd-jax"], check=True,
                     capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
      raise RuntimeError(f"could not clone ARMD_JAX_SOURCE={ARMD_JAX_SOURCE!r}: "
                         f"{getattr(e, 'stderr', None) or e}") from None
    checkout = "armd-jax"
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q",
                         os.path.abspath(checkout) + "[plot]"])
  importlib.invalidate_caches()  # the new package is importable in this running kernel

# %% tags=["parameters"]
# CI runs this notebook with ARMD_NOTEBOOK_SMALL=1: the same cells, a smaller training run.
SMALL = os.environ.get("ARMD_NOTEBOOK_SMALL", "0") == "1"

# %%
import jax
import numpy as np

import armd_jax
from armd_jax import orders, train, viz
from armd_jax.train.defaults import config_from_file

print(f"JAX {jax.__version__} on {jax.default_backend().upper()}: {jax.devices()}")

# %% [markdown]
# ## 1. Orders are block ids
#
# * **left to right**: `b(n) = n + 1`, an autoregressive LM.
# * **progressive permutation** (the paper's training schedule): k tokens chosen at
#   random swap their slots in the left-to-right order; k grows during training, and
#   k = N is a uniformly random order.
# * **strided, S streams** (SBP): the sequence is cut into S contiguous streams; their
#   heads come first, one per block, then block j holds the j-th token of every stream.
#   N/S + S - 1 blocks, so N/S + S - 1 network calls to generate.
# * **masked diffusion, T steps**: every token gets a masking time; tokens revealed at
#   the same reverse step share a block (multi-token blocks).

# %% tags=["figure:orders"]
N = 16
key = jax.random.PRNGKey(0)
order_rows = {"left to right": orders.left_to_right(1, N)}
for k in (2, 4, 8, 16):
  order_rows[f"progressive k={k}"] = orders.progressive_permutation(jax.random.fold_in(key, k), 1, N, k)
for s in (2, 4):
  order_rows[f"strided S={s}"] = orders.strided(1, N, streams=s)
order_rows["masked diffusion T=4"] = orders.masked_diffusion(jax.random.PRNGKey(3), 1, N, num_steps=4)
fig = viz.plot_block_ids(order_rows)

# %% [markdown]
# ## 2. The masks an order induces
#
# Attention never sees an N x N mask in the fast path: it compares two integer vectors.
# Over the context `[BOS, x_0, ..., x_{N-1}]` (BOS has id 0 and is always visible):
#
# * the **content stream** (lower layers) uses the inclusive mask `id_j <= b(n)`: a
#   token's content state sees its own block;
# * the **query stream**, which makes the predictions, uses the strict mask
#   `id_j < b(n)`: position n never sees itself or anything revealed with or after it.
#
# Left to right gives the familiar triangles; other orders give the same triangles with
# rows and columns permuted, and multi-token blocks give block-triangular masks.

# %% tags=["figure:masks"]
mask_rows = {name: order_rows[name] for name in
             ("left to right", "progressive k=8", "strided S=4", "masked diffusion T=4")}
fig = viz.plot_masks(mask_rows)

# %% [markdown]
# ## 3. Train a small model
#
# The `quickstart` config (bytes of the Python standard library's sources), shortened:
# the pictures below only need a model that has learnt something.

# %%
import tempfile


def find_config(name):
  """configs/<name>.py of the repository checkout next to the package or the notebook."""
  roots = (os.path.dirname(os.path.dirname(armd_jax.__file__)), "..", ".", "armd-jax")
  for root in roots:
    path = os.path.join(root, "configs", f"{name}.py")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"configs/{name}.py not found next to {roots}: clone the repository.")


config = config_from_file(find_config("quickstart"))
config.sample.num_samples = 0
config.train.num_steps, config.train.eval_every = 200, 0
if SMALL:  # CI-sized (also the quickstart and generation notebooks' small run)
  config.model.d_model, config.model.num_layers, config.model.num_heads = 32, 2, 2
  config.model.mlp_dim, config.model.d_pe = 64, 16
  config.model.max_len = config.train.seq_len = 64
  config.train.num_steps, config.train.global_batch_size, config.eval.num_batches = 10, 8, 1
  config.train.log_every = 10
workdir = tempfile.mkdtemp(prefix="armd_anatomy_")
final = train.train_and_evaluate(config, workdir)
trained = train.load_trained(workdir)
model, params, vocab = trained.model, trained.params, trained.vocab

# %% [markdown]
# ## 4. Strict causality, seen on the trained model
#
# Take a piece of Python, give it a random order, change one token, and measure how much
# every position's predicted distribution moves. Positions whose block is earlier than
# or equal to the changed token's block (blue, orange) do not move at all, bit for bit;
# only later blocks (red) react.

# %% tags=["figure:causality"]
text = "def __init__(self, name, value=None):\n        self.name = name\n"
length = 48
tokens = np.array(vocab.encode(text)[:length], np.int32)
ids = np.asarray(orders.progressive_permutation(jax.random.PRNGKey(7), 1, length, length))[0]
position = int(np.argsort(ids)[length // 2])  # the token revealed halfway through
change = viz.logit_change(model, params, tokens, ids, position)
earlier_or_same = ids <= ids[position]
print(f"changed token {position} (block {ids[position]}): max change at earlier/same blocks "
      f"{change[earlier_or_same].max():.1e}, at later blocks {change[~earlier_or_same].max():.3f}")
assert change[earlier_or_same].max() == 0.0
fig = viz.plot_logit_change(change, ids, position)

# %% [markdown]
# ## 5. Prefix aggregation: how the query stream starts
#
# Position n's query stream starts from
# `G0[n] = LN(sum_{j: id_j < b(n)} <PE[p_n], PE[p_j]> X0[j] / count_n)` (plus a learned
# projection of `PE[p_n]`): a linear attention, driven only by the positions, over the
# tokens of earlier blocks. Drawn for the trained model's learnt position table, under
# left to right and strided S = 4 (each row scaled by its largest weight).

# %% tags=["figure:prefix_weights"]
n_show = 32
for name, row in (("left to right", orders.left_to_right(1, n_show)),
                  ("strided S=4", orders.strided(1, n_show, streams=4))):
  weights = viz.prefix_aggregation_weights(model, params, row)
  fig = viz.plot_prefix_weights(weights, row, title=f"prefix-aggregation weights, {name}")
