"""One model family built from the same blocks: ARMD (and the baselines).

Importing this package imports only jax, flax and the package's own modules (never the
registry, the samplers, the trainer or the data layer): models sit at the bottom of the
import graph.
"""

from typing import Callable, Dict

import flax.linen as nn

from armd_jax.models.ar import AR
from armd_jax.models.armd import ARMD
from armd_jax.models.config import MODEL_KINDS, ModelConfig
from armd_jax.models.mdlm import MDLM

# `config.kind` -> the Flax module class it names (one entry per `MODEL_KINDS` name).
MODULES: Dict[str, Callable[[ModelConfig], nn.Module]] = {"armd": ARMD, "ar": AR, "mdlm": MDLM}
assert tuple(MODULES) == MODEL_KINDS, "one module per model kind"


def build_model(config: ModelConfig) -> nn.Module:
  """The Flax module that `config.kind` names ('armd', 'ar' or 'mdlm'), built from `config`."""
  return MODULES[config.kind](config)


__all__ = ["AR", "ARMD", "MDLM", "MODEL_KINDS", "MODULES", "ModelConfig", "build_model"]
