"""One model family built from the same blocks: ARMD (and the baselines)."""

import flax.linen as nn

from armd_jax.models.ar import AR
from armd_jax.models.armd import ARMD
from armd_jax.models.config import ModelConfig
from armd_jax.models.mdlm import MDLM


def build_model(config: ModelConfig) -> nn.Module:
  """The Flax module that `config.kind` names."""
  if config.kind == "armd":
    return ARMD(config)
  if config.kind == "ar":
    return AR(config)
  if config.kind == "mdlm":
    return MDLM(config)
  raise ValueError(f"build_model: unknown ModelConfig.kind {config.kind!r}.")


__all__ = ["AR", "ARMD", "MDLM", "ModelConfig", "build_model"]
