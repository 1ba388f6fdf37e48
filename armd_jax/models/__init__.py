"""Models built from one set of blocks: ARMD (and the baselines)."""

from armd_jax.models.armd import ARMD
from armd_jax.models.config import ModelConfig

__all__ = ["ARMD", "ModelConfig"]
