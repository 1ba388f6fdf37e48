"""armd-jax: Auto-Regressive Masked Diffusion in JAX/Flax.

Public API:
- `ModelConfig`, `build_model`, and the one model family built from the same blocks:
  `ARMD`, the baselines `AR` (causal GPT) and `MDLM` (masked diffusion).
- `orders` (block-id generators and the order table), `losses` (the objective),
  `kernels` (block-id attention: jnp reference and Pallas flash kernels), `sampling`
  (KV-cached and strided generation, scoring).
- `load_pretrained(DIR)` -> (model, params, vocab) of a folder written by
  `python -m armd_jax.convert export` (safetensors; imported on first use).
- Imported on demand, since they pull in heavier dependencies: `armd_jax.train`
  (train step, checkpoints, `train_and_evaluate`, `load_trained`), `armd_jax.data`
  (grain pipelines; seqio/TensorFlow only lazily) and `armd_jax.eval`.

Importing this package never imports TensorFlow or seqio.
"""

import importlib

from armd_jax import kernels, losses, orders
from armd_jax.models import AR, ARMD, MDLM, ModelConfig, build_model

__version__ = "0.1.0"

__all__ = ["AR", "ARMD", "MDLM", "ModelConfig", "build_model", "kernels", "losses", "orders",
           "sampling", "load_pretrained", "__version__"]


def __getattr__(name):  # `armd_jax.sampling` on first use: the models never import it
  if name == "sampling":
    return importlib.import_module("armd_jax.sampling")
  if name == "load_pretrained":  # safetensors and the data layer only when used
    return importlib.import_module("armd_jax.convert").load_pretrained
  raise AttributeError(f"module 'armd_jax' has no attribute {name!r}")

