"""One model family built from the same blocks: ARMD (and the baselines)."""

import flax.linen as nn

from armd_jax.models.armd import ARMD
from armd_jax.models.config import ModelConfig


def build_model(config: ModelConfig) -> nn.Module:
  """The Flax module that `config.kind` names."""
  if config.kind == "armd":
    return ARMD(config)
  raise ValueError(f"build_model: unknown ModelConfig.kind {config.kind!r}.")


__all__ = ["ARMD", "ModelConfig", "build_model"]
