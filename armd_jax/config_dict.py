"""One ConfigDict section from one typed dataclass: how every default is written once.

Each config section (`model`, `data`, `order`, ...) is a frozen dataclass whose fields
carry the defaults and, beside them, their meaning. `section_config(cls)` builds the
ml-collections ConfigDict that config files override from those defaults; optional fields
(default None, or no default at all) become typed placeholders so that
`--config.section.field=...` still parses on the command line.

Light on purpose: it imports ml_collections only, so config files stay fast to load.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Type

import ml_collections
from ml_collections import config_dict


def section_config(cls: Type[Any]) -> ml_collections.ConfigDict:
  """A ConfigDict of dataclass `cls`'s fields at their defaults (None -> placeholder)."""
  hints = typing.get_type_hints(cls)
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(cls):
    if field.default is not dataclasses.MISSING:
      value = field.default
    elif field.default_factory is not dataclasses.MISSING:
      value = field.default_factory()
    else:
      value = None
    if value is None:
      value = config_dict.placeholder(_base_type(hints[field.name]))
    out[field.name] = value
  return out


def _base_type(hint: Any) -> Any:
  """int for Optional[int] / int; object when the hint names no single type."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) is typing.Union:
    return args[0] if len(args) == 1 and isinstance(args[0], type) else object
  return hint if isinstance(hint, type) else object
