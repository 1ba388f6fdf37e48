"""`load_trained`: a trained model back from its workdir (for sampling and evaluation)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections

from armd_jax.models import ModelConfig, build_model
from armd_jax.train import checkpoints
from armd_jax.train.settings import model_config_from


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model restored from a workdir.

  Attributes:
    config: the experiment ConfigDict saved in the workdir (vocab_size filled in).
    model_config: its typed `ModelConfig`.
    model: the Flax module (`build_model(model_config)`).
    params: variables {'params': ...} on the default device: the EMA parameters when
      the run kept them and `use_ema`, else the raw ones.
    vocab: the data vocabulary (`armd_jax.data.load_vocab`), or None if `with_vocab`
      was False.
    step: the training step of the checkpoint.
  """

  config: ml_collections.ConfigDict
  model_config: ModelConfig
  model: nn.Module
  params: Any
  vocab: Any
  step: int


def load_trained(workdir: str, use_ema: bool = True, step: Optional[int] = None,
                 with_vocab: bool = True) -> Trained:
  """Restores the latest (or `step`) checkpoint of a training workdir (a local folder or
  a URL such as gs://BUCKET/RUN: `armd_jax.storage`).

  Raises:
    FileNotFoundError: `workdir` has no config.json or no finished checkpoint.
  """
  config = checkpoints.load_config(workdir)
  saved, step = checkpoints.restore_state_arrays(workdir, step)
  model_config = model_config_from(config)
  params = saved["params"]
  if use_ema and saved.get("ema_params") is not None:
    params = saved["ema_params"]
  params = jax.tree.map(jax.numpy.asarray, params)
  vocab = None
  if with_vocab:
    from armd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    vocab = data_lib.load_vocab(config.data, workdir)
  return Trained(config=config, model_config=model_config,
                 model=build_model(model_config), params=params, vocab=vocab,
                 step=step)
