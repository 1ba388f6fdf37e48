"""A run's config.json: written beside the checkpoints, read back, and compared.

`save_config` / `load_config` write and read `<workdir>/config.json`;
`identity_fields` / `config_differences` say which of its fields a checkpoint must agree
with (what the network is, not how it computes) and which differ.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from armd_jax import storage

CONFIG_FILE = "config.json"


def save_config(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> None:
  """Writes the (filled) experiment config to <workdir>/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  # Atomic: a reader never sees half a file (a renamed temporary file, or one object).
  storage.write_atomic(storage.path(workdir) / CONFIG_FILE,
                       config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(workdir: storage.PathLike) -> ml_collections.ConfigDict:
  """The experiment config saved in a workdir."""
  path = storage.path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"'{path}' does not exist: {workdir!r} is not a training workdir.")
  values = json.loads(path.read_text(encoding="utf-8"))
  return ml_collections.ConfigDict(_tuples(values))


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (configs use tuples for shapes, rules and sets)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


# config.model fields that say how the network computes, not what it is: a run may
# resume with other values. Every other model field (shapes, vocab_size, kind) must match.
EXECUTION_FIELDS = ("dropout_rate", "dtype", "attention", "pallas_block_q", "pallas_block_kv",
                    "pallas_interpret", "remat", "prefix_aggregation", "prefix_chunk")


def identity_fields(config: dict) -> dict:
  """{'model.d_model': 32, ..., 'data.vocab': ...}: what a checkpoint must agree with.

  Every `config.model` field but `EXECUTION_FIELDS`, and the tokenizer (`data.vocab`
  and the fields of that tokenizer: `sentencepiece_*` or `hf_tokenizer`). `config` is
  the plain dict of an experiment config (as in config.json).
  """
  fields = {f"model.{k}": v for k, v in (config.get("model") or {}).items()
            if k not in EXECUTION_FIELDS}
  data = config.get("data") or {}
  if "vocab" in data:
    fields["data.vocab"] = data["vocab"]
  if data.get("vocab") == "sentencepiece":
    for k in ("sentencepiece_model", "sentencepiece_vocab_size", "sentencepiece_model_type"):
      fields[f"data.{k}"] = data.get(k)
  if data.get("vocab") == "hf" or (data.get("vocab") is None and data.get("hf_tokenizer")):
    fields["data.hf_tokenizer"] = data.get("hf_tokenizer")
  return fields


def config_differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, value now)] of the `identity_fields` that differ.

  A field the saved config does not have (written by an older version) is not compared.
  """
  old, new = identity_fields(saved), identity_fields(now)
  return [(k, old[k], new.get(k)) for k in sorted(old) if k in new and old[k] != new[k]]
