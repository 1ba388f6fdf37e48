"""Lazy package exports (PEP 562): names imported from their submodule on first use."""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple


def lazy_exports(package: str, namespace: dict,
                 exports: Dict[str, str]) -> Tuple[Callable, Callable]:
  """`(__getattr__, __dir__)` for `package` whose `exports` map name -> submodule.

  A name is imported from `package.<submodule>` on first access and cached in
  `namespace` (the package's globals()), so importing the package itself stays light.
  """

  def __getattr__(name):  # pylint: disable=invalid-name
    if name in exports:
      value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
      namespace[name] = value
      return value
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  def __dir__():  # pylint: disable=invalid-name
    return sorted(set(namespace) | set(exports))

  return __getattr__, __dir__
