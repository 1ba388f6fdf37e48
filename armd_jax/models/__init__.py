"""One model family built from the same blocks: ARMD (and the baselines)."""

import flax.linen as nn

from armd_jax.models.ar import AR
from armd_jax.models.armd import ARMD
from armd_jax.models.config import ModelConfig
from armd_jax.models.mdlm import MDLM


def build_model(config: ModelConfig) -> nn.Module:
  """The Flax module that `config.kind` names (through `armd_jax.registry.KINDS`)."""
  from armd_jax import registry  # pylint: disable=import-outside-toplevel
  return registry.build_model(config)


__all__ = ["AR", "ARMD", "MDLM", "ModelConfig", "build_model"]
