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
# # armd-jax quickstart
#
# Train a small **Auto-Regressive Masked Diffusion** (ARMD) model in a few minutes,
# watch its loss fall, generate text sequentially and with parallel strided streams,
# and measure its exact held-out perplexity. Runs on a CPU, a Colab GPU or a TPU; every
# model and helper comes from the `armd_jax` library (nothing is defined here).
#
# The `quickstart` config trains a 0.84M-parameter ARMD (4 layers, 2 of them two-stream)
# on the Python standard library's own source files, read as bytes: a corpus present on
# every machine, so nothing is downloaded.

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
# CI runs this notebook with ARMD_NOTEBOOK_SMALL=1: the same cells with a smaller model
# and fewer steps. Set SMALL = True here for a quick tour.
SMALL = os.environ.get("ARMD_NOTEBOOK_SMALL", "0") == "1"

# %% [markdown]
# ## 1. Which accelerator?

# %%
import jax
import numpy as np

import armd_jax
from armd_jax import eval as armd_eval
from armd_jax import sampling, train, viz
from armd_jax.train.defaults import config_from_file

backend = jax.default_backend()  # 'cpu', 'gpu' or 'tpu'
print(f"armd-jax {armd_jax.__version__}, JAX {jax.__version__}: {jax.device_count()} "
      f"{backend.upper()} device(s) {[d.device_kind for d in jax.devices()]}")

# %% [markdown]
# ## 2. Train the `quickstart` config with a live loss plot
#
# `train_and_evaluate(config, workdir)` is the one library call behind
# `python -m armd_jax.main`; `viz.train_with_live_loss` runs it and redraws the curve
# from `<workdir>/metrics.jsonl` while it trains. The order schedule is the paper's
# *progressive permutation*: left to right first, then up to 16 shuffled tokens per
# sequence. The held-out NLL (squares) is exact: left to right, singleton blocks.

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
config.sample.num_samples = 0  # we sample below
config.train.log_every = 10
if SMALL:  # CI-sized: a narrower model, shorter sequences, 10 steps (same code path); the
  # other notebooks' small run, so CI's compilation cache holds its train step once
  config.model.d_model, config.model.num_layers, config.model.num_heads = 32, 2, 2
  config.model.mlp_dim, config.model.d_pe = 64, 16
  config.model.max_len = config.train.seq_len = 64
  config.train.num_steps, config.train.global_batch_size = 10, 8
  config.train.log_every, config.train.eval_every, config.eval.num_batches = 5, 0, 2
workdir = tempfile.mkdtemp(prefix="armd_quickstart_")
print(f"{config.train.num_steps} steps of {config.train.global_batch_size} x "
      f"{config.train.seq_len} bytes in {workdir}")

# %% tags=["figure:loss"]
final = viz.train_with_live_loss(config, workdir, title="quickstart: training loss")
print(f"final train loss {final['train/loss']:.3f}, held-out NLL {final['eval/nll']:.3f} "
      "nats/byte (exact)")

# %% [markdown]
# ## 3. Generate: sequential and with S = 2, 4 strided streams
#
# `load_trained` restores the checkpoint (EMA weights when kept). Sequential decoding
# uses a KV cache and makes one network call per token. With S streams the S stream
# heads come first, one per call, then the j-th token of every stream in one call:
# N/S + S - 1 calls for N tokens. Times exclude compilation (a warm-up run goes first).

# %%
trained = train.load_trained(workdir)
length = int(config.train.seq_len)
speed = []
for streams in (1, 2, 4):
  out = armd_eval.generate_samples(trained.model, trained.params, jax.random.PRNGKey(streams),
                                   batch_size=4, length=length, streams=streams,
                                   sampler=sampling.SamplerConfig(temperature=0.8))
  speed.append({"label": "sequential" if streams == 1 else f"strided S={streams}",
                "calls": out.num_calls, "seconds": out.seconds})
  print(f"--- S={streams}: {out.num_calls} calls, {out.seconds * 1e3:.0f} ms for 4 samples ---")
  print(trained.vocab.decode(out.tokens[0].tolist()))

# %% tags=["figure:decode_speed"]
fig = viz.plot_decode_speed(speed, title=f"{length} bytes per sample, batch 4, {backend.upper()}")

# %% [markdown]
# ## 4. Exact held-out perplexity
#
# With singleton blocks in text order the summed log-probabilities are the exact
# log-likelihood, so this is a perplexity, not a bound. Strided orders are exact too.

# %%
from armd_jax import data as armd_data

datasets = armd_data.create_datasets(
    trained.config.data, seq_len=length, global_batch_size=int(config.train.global_batch_size),
    workdir=workdir, seed=0, process_index=0, process_count=1)
max_batches = 2 if SMALL else 16
for order in (armd_eval.EvalOrder("left_to_right"), armd_eval.EvalOrder("strided", streams=4)):
  result = armd_eval.evaluate_perplexity(trained.model, trained.params, datasets.eval_batches(),
                                         order=order, max_batches=max_batches)
  print(f"{order.describe():>14}: {result}")
