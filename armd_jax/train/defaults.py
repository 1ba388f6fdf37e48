"""`base_config()`: every experiment field at its default, derived from the typed configs.

Each default is written once, in the typed frozen dataclass that documents it:
`armd_jax.models.ModelConfig` (section `model`), `armd_jax.data.DataConfig` (`data`),
and the dataclasses of `armd_jax.train.settings` (`order`, `optim`, `train`, `mesh`,
`checkpoint`, `eval`, `sample`). `base_config()` builds the ConfigDict from those
defaults with `armd_jax.config_dict.section_config`; optional fields (default None, or no
default such as `model.vocab_size`) become typed placeholders so
`--config.model.vocab_size=...` still parses. Config files in `configs/` start from this
and override what they change (each override commented there).

Importing this module is light: it pulls in ml_collections and the typed configs, never
orbax, grain, optax or the trainer, so config files load fast.
"""

from __future__ import annotations

import importlib.util

import ml_collections

from armd_jax.config_dict import section_config
from armd_jax.data import config as data_config
from armd_jax.models.config import ModelConfig
from armd_jax.train import settings

SECTION_TYPES = {"model": ModelConfig, "data": data_config.DataConfig,
                 "order": settings.OrderConfig, "optim": settings.OptimConfig,
                 "train": settings.TrainConfig, "mesh": settings.MeshConfig,
                 "checkpoint": settings.CheckpointConfig, "eval": settings.EvalConfig,
                 "sample": settings.SampleConfig}


def base_config() -> ml_collections.ConfigDict:
  """The experiment ConfigDict with sections model, data, order, optim, train, mesh,
  checkpoint, eval and sample at their defaults (see the module doc)."""
  c = ml_collections.ConfigDict()
  for name in settings.SECTIONS:
    c[name] = section_config(SECTION_TYPES[name])
  return c


def config_from_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file at `path` (how configs build on each other)."""
  spec = importlib.util.spec_from_file_location("_armd_config", path)
  if spec is None:
    raise FileNotFoundError(f"no config file at {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
