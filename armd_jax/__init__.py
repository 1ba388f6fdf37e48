"""armd-jax: Auto-Regressive Masked Diffusion in JAX/Flax.

Public API: `ModelConfig`, `ARMD`, and the modules `orders` (block-id generators),
`losses` (the objective) and `kernels` (block-id attention). Importing this package
never imports TensorFlow or seqio; only `armd_jax.data` does, lazily.
"""

from armd_jax import kernels, losses, orders
from armd_jax.models import ARMD, ModelConfig, build_model

__version__ = "0.1.0"

__all__ = ["ARMD", "ModelConfig", "build_model", "kernels", "losses", "orders", "__version__"]
