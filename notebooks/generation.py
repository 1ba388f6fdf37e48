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
# # Generating with ARMD
#
# Because ARMD is causal in *block ids*, not in text positions, one trained model can
# continue a prompt, fill in a gap anywhere, and generate many tokens per network call
# with strided streams. This notebook trains a small ARMD and, for comparison, an MDLM
# (masked diffusion) and an AR judge on the same bytes, then trades network calls
# against sample quality. Everything comes from `armd_jax`.

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
# CI runs this notebook with ARMD_NOTEBOOK_SMALL=1: the same cells, smaller training runs.
SMALL = os.environ.get("ARMD_NOTEBOOK_SMALL", "0") == "1"

# %%
import inspect
import tempfile

import jax
import numpy as np

import armd_jax
from armd_jax import eval as armd_eval
from armd_jax import sampling, train, viz
from armd_jax.train.defaults import config_from_file

print(f"JAX {jax.__version__} on {jax.default_backend().upper()}: {jax.devices()}")


def find_config(name):
  """configs/<name>.py of the repository checkout next to the package or the notebook."""
  roots = (os.path.dirname(os.path.dirname(armd_jax.__file__)), "..", ".", "armd-jax")
  for root in roots:
    path = os.path.join(root, "configs", f"{name}.py")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"configs/{name}.py not found next to {roots}: clone the repository.")


def quickstart_config(kind):
  """The quickstart config for a model kind ('armd', 'mdlm' or 'ar'); CI-sized if SMALL."""
  c = config_from_file(find_config("quickstart"))
  c.model.kind = kind
  c.sample.num_samples, c.train.eval_every = 0, 0
  if SMALL:  # CI-sized: 2 narrow layers, 64-byte sequences, 10 steps; the other notebooks'
    # small run, so CI's compilation cache holds the ARMD train step once
    c.model.d_model, c.model.num_layers, c.model.num_heads = 32, 2, 2
    c.model.mlp_dim, c.model.d_pe = 64, 16
    c.model.max_len = c.train.seq_len = 64
    c.train.num_steps, c.train.global_batch_size, c.eval.num_batches = 10, 8, 1
    c.train.log_every = 5
  return c


# %% [markdown]
# ## 1. Train ARMD, MDLM and an AR judge on the same data
#
# Same config, data, size and steps; only `config.model.kind` differs. The AR model is
# used at the end to score samples (generative perplexity): a judge that none of the
# compared samplers is.

# %%
models = {}
for kind in ("armd", "mdlm", "ar"):
  workdir = tempfile.mkdtemp(prefix=f"armd_generation_{kind}_")
  print(f"=== {kind} ===")
  train.train_and_evaluate(quickstart_config(kind), workdir)
  models[kind] = train.load_trained(workdir)
armd = models["armd"]
vocab = armd.vocab
length = int(armd.config.train.seq_len)


def encode(text):
  """Text -> byte ids [n]."""
  return np.array(vocab.encode(text), np.int32)


def decode(ids):
  """Ids -> text."""
  return vocab.decode([int(i) for i in ids])


# %% [markdown]
# ## 2. Prompts
#
# Prompt tokens are read first (one block each), then the rest is generated; with
# S = 2 streams in half the calls.

# %%
prompt = encode("def ")
for streams in (1, 2):
  out = sampling.generate(armd.model, armd.params, jax.random.PRNGKey(streams), batch_size=2,
                          length=length, streams=streams, prompt=prompt,
                          sampler=sampling.SamplerConfig(temperature=0.8))
  print(f"--- prompt 'def ', S={streams}: {out.num_calls} calls ---")
  for row in np.asarray(out.tokens):
    print(decode(row), "\n")

# %% [markdown]
# ## 3. Infilling
#
# Any order is a valid ARMD order, so known tokens anywhere can go into the first
# blocks: here the start and the end of a line are given and the middle is generated.

# %%
template = encode(("    def close(self):\n        self.file.close()\n" * 4)[:length])
a, b = length // 4, 3 * length // 4
known = np.ones(length, bool)
known[a:b] = False  # the gap
out = sampling.generate(armd.model, armd.params, jax.random.PRNGKey(5), batch_size=3,
                        length=length, infill=(template, known),
                        sampler=sampling.SamplerConfig(temperature=0.7))


def gap(row):
  """The row with its gap in brackets."""
  return decode(row[:a]) + "[" + decode(row[a:b]) + "]" + decode(row[b:])


print("template:\n" + gap(template))
for row in np.asarray(out.tokens):
  print("---\n" + gap(row))

# %% [markdown]
# ## 4. Temperature and top-p
#
# Lower temperature and nucleus (top-p) filtering trade diversity for likelihood.

# %%
for temperature, top_p in ((1.0, 1.0), (0.6, 1.0), (1.0, 0.8)):
  out = sampling.generate(armd.model, armd.params, jax.random.PRNGKey(11), batch_size=1,
                          length=length, streams=2,
                          sampler=sampling.SamplerConfig(temperature=temperature, top_p=top_p))
  print(f"--- temperature {temperature}, top-p {top_p} ---\n{decode(np.asarray(out.tokens)[0])}")

# %% [markdown]
# ## 5. Strided generation, call by call
#
# Each row is one network call: orange cells are the positions it fills, blue ones were
# filled before. With S = 4 streams the four stream heads come first (calls 1-4), then
# every call fills one token in each stream: N/4 + 3 calls instead of N (sequential
# decoding would be one diagonal, one cell per row).

# %% tags=["figure:strided_steps"]
n_draw = min(length, 48)
out = sampling.generate(armd.model, armd.params, jax.random.PRNGKey(3), batch_size=1,
                        length=n_draw, streams=4, sampler=sampling.SamplerConfig(temperature=0.8))
fig = viz.plot_fill_steps(out.block_ids[0], np.asarray(out.tokens)[0], vocab.decode,
                          title=f"S=4: {n_draw} bytes in {out.num_calls} calls")

# %% [markdown]
# ## 6. Quality against the number of network calls
#
# Generative perplexity (the AR judge's perplexity of the samples; lower is more
# plausible) and the unigram entropy of each sample (too low = repetitive), against the
# calls spent per sample:
#
# * ARMD **sequential** (N calls) and **strided** S = 2, 4, 8 (N/S + S - 1 calls; CI
#   runs S = 1, 4 only);
# * ARMD **confidence-ordered** decoding (k tokens per call, the most confident
#   positions first), when this version of the library has it;
# * **MDLM** ancestral sampling with the same numbers of reverse steps.

# %%
num_samples = 4 if SMALL else 16
streams_list = (1, 4) if SMALL else (1, 2, 4, 8)
sampler = sampling.SamplerConfig()
judge = armd_eval.ModelEvaluator(models["ar"].model, models["ar"].params, vocab,
                                 name="the AR model trained above")
results = []


def record(method, tokens, calls):
  scored = armd_eval.generative_perplexity(np.asarray(tokens), judge)
  results.append({"method": method, "calls": int(calls), "gen_ppl": scored.ppl,
                  "entropy": scored.entropy})
  print(f"{method:>22} {int(calls):4d} calls: gen PPL {scored.ppl:7.2f}, "
        f"entropy {scored.entropy:.3f} nats")


for streams in streams_list:
  for kind, method in (("armd", "ARMD sequential/strided"), ("mdlm", "MDLM")):
    m = models[kind]
    out = armd_eval.generate_samples(m.model, m.params, jax.random.PRNGKey(streams),
                                     batch_size=num_samples, length=length, streams=streams,
                                     sampler=sampler, warmup=False)
    record(method, out.tokens, out.num_calls)

has_confidence = "k" in inspect.signature(sampling.generate).parameters
if has_confidence:
  for k in streams_list:
    out = sampling.generate(armd.model, armd.params, jax.random.PRNGKey(k), batch_size=num_samples,
                            length=length, order="confidence", k=k, sampler=sampler)
    record("ARMD confidence", out.tokens, out.num_calls)
else:
  print("confidence-ordered decoding (generate(..., order='confidence', k=...)) is not in "
        "this version of armd_jax; its line is left out.")

# %% tags=["figure:tradeoff"]
fig = viz.plot_tradeoff(results, evaluator=judge.name)
