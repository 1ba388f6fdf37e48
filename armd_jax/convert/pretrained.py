"""Our own pretrained format: safetensors weights under flat names plus config.json.

`export` writes a workdir's parameters as `<out>/model.safetensors` (names: the parameter
tree's path joined by '.', `flatten_params`) and `<out>/config.json` (the `ModelConfig`
and the vocabulary, its file copied beside); `load_pretrained` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, Mapping, Tuple

import numpy as np

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "armd-jax-pretrained-v1"


def flatten_params(params: Mapping[str, Any], as_numpy: bool = True) -> Dict[str, Any]:
  """{'params': tree} (or the tree itself) -> {'layer_0.attn.query.kernel': array}
  (numpy arrays, or the leaves as they are with `as_numpy=False`)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  tree = params["params"] if set(params) == {"params"} else params
  flat = traverse_util.flatten_dict(dict(tree), sep=".")
  return {name: np.asarray(value) if as_numpy else value for name, value in flat.items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """The inverse of `flatten_params`: {'params': nested dict of arrays}."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return {"params": traverse_util.unflatten_dict(dict(flat), sep=".")}


def model_config_dict(config) -> Dict[str, Any]:
  """A `ModelConfig` as JSON-ready values (the dtype as its name)."""
  values = dataclasses.asdict(config)
  if not isinstance(values["dtype"], str):
    values["dtype"] = np.dtype(values["dtype"]).name
  return values


def export(workdir: str, out: str, raw: bool = False) -> str:
  """Writes a workdir's parameters as `out`/model.safetensors plus `out`/config.json.

  Args:
    workdir: a training workdir (local or URL) with config.json and a checkpoint.
    out: a local directory (created).
    raw: export the raw parameters instead of the EMA ones (a run without EMA always
      exports its raw parameters).

  Returns:
    the path of the written model.safetensors.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from armd_jax.train.loading import load_trained  # pylint: disable=g-import-not-at-top
  trained = load_trained(workdir, use_ema=not raw, with_vocab=False)
  os.makedirs(out, exist_ok=True)
  vocab = _export_vocab(trained.config, workdir, out)
  flat = flatten_params(trained.params)
  path = os.path.join(out, WEIGHTS_FILE)
  save_file(flat, path, metadata={"format": FORMAT})
  has_ema = bool(trained.config.optim.get("ema_decay", 0.0))
  description = {"format": FORMAT, "model": model_config_dict(trained.model_config),
                 "vocab": vocab,
                 "source": {"workdir": str(workdir), "step": trained.step,
                            "params": "ema" if has_ema and not raw else "raw"}}
  with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(description, f, indent=2, sort_keys=True)
  return path


def _export_vocab(config, workdir: str, out: str) -> Dict[str, Any]:
  """The vocabulary description of a run; its file (if any) copied into `out`."""
  from armd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from armd_jax import storage  # pylint: disable=g-import-not-at-top
  vocab = data_lib.load_vocab(config.data, workdir)
  name = type(vocab).__name__
  if name == "ByteVocabulary":
    return {"kind": "byte"}
  if name == "SentencePieceVocabulary":
    shutil.copyfile(storage.local_copy(vocab.model_file), os.path.join(out, "vocab.model"))
    return {"kind": "sentencepiece", "file": "vocab.model"}
  if name == "HuggingFaceVocabulary":
    if os.path.isfile(vocab.name_or_path):
      shutil.copyfile(vocab.name_or_path, os.path.join(out, "tokenizer.json"))
      return {"kind": "hf", "file": "tokenizer.json"}
    return {"kind": "hf", "name": vocab.name_or_path}
  # A seqio vocabulary lives in its task's registry, not in files we can carry.
  return {"kind": "seqio", "task": config.data.task,
          "note": "not portable: load_pretrained returns vocab None"}


def load_pretrained(directory: str) -> Tuple[Any, Dict[str, Any], Any]:
  """Reads an exported model back: `(model, params, vocab)`.

  Args:
    directory: a folder written by `export` (model.safetensors + config.json).

  Returns:
    model: the Flax module (`build_model` of the saved `ModelConfig`).
    params: {'params': ...} of jnp float32 arrays, bitwise the exported ones.
    vocab: the vocabulary (`armd_jax.data` classes), or None for a seqio vocabulary.

  Raises:
    FileNotFoundError: a file is missing; ValueError: config.json is not ours.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  from armd_jax.models import ModelConfig, build_model  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(directory, CONFIG_FILE)
  weights_path = os.path.join(directory, WEIGHTS_FILE)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"'{path}' does not exist: not a folder written by "
                              "`python -m armd_jax.convert export`.")
  with open(config_path, encoding="utf-8") as f:
    description = json.load(f)
  if description.get("format") != FORMAT:
    raise ValueError(f"'{config_path}' has format {description.get('format')!r}, expected "
                     f"{FORMAT!r} (a Hugging Face folder? use `convert import`).")
  model_config = ModelConfig(**description["model"])
  params = unflatten_params(load_file(weights_path))
  params = jax.tree.map(jnp.asarray, params)
  return build_model(model_config), params, _load_vocab(description["vocab"], directory)


def _load_vocab(vocab: Dict[str, Any], directory: str):
  from armd_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  kind = vocab["kind"]
  if kind == "byte":
    return vocab_lib.ByteVocabulary()
  if kind == "sentencepiece":
    return vocab_lib.SentencePieceVocabulary(os.path.join(directory, vocab["file"]))
  if kind == "hf":
    return vocab_lib.HuggingFaceVocabulary(
        os.path.join(directory, vocab["file"]) if "file" in vocab else vocab["name"])
  return None
