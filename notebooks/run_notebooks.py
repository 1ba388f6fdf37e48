"""Executes the notebooks top to bottom and collects the figures they draw.

Every notebook reads `ARMD_NOTEBOOK_SMALL=1` in its `parameters` cell and then runs the
same cells with CI-sized settings. Figure cells carry a tag `figure:<name>`; their
image/png outputs are what the tests check and what `--save` writes to `docs/img/`.

Commands:
  python notebooks/run_notebooks.py                          # all, small settings
  python notebooks/run_notebooks.py --full --save docs/img   # full settings, save PNGs
  python notebooks/run_notebooks.py anatomy.ipynb            # one notebook

The `.ipynb` files are generated from their paired jupytext sources (`*.py`, percent
format) with outputs stripped: `jupytext --to ipynb notebooks/<name>.py`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import time
from typing import Dict, Iterator, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
NOTEBOOKS = ("quickstart.ipynb", "anatomy.ipynb", "generation.ipynb")
FIGURE_TAG = "figure:"


@contextlib.contextmanager
def _environment(small: bool) -> Iterator[None]:
  """The kernel inherits these: small settings, and this checkout's armd_jax first."""
  saved = {k: os.environ.get(k) for k in ("ARMD_NOTEBOOK_SMALL", "PYTHONPATH", "MPLBACKEND")}
  os.environ["ARMD_NOTEBOOK_SMALL"] = "1" if small else "0"
  os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, saved["PYTHONPATH"]) if p)
  os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend draws the PNGs
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def execute(name: str, small: bool = True, timeout: int = 900, verbose: bool = False):
  """Runs notebooks/<name> in a fresh kernel (cwd notebooks/); raises on any cell error.

  With `verbose`, prints each code cell's wall time as it finishes.

  Returns:
    (executed notebook node, wall seconds).
  """
  import nbformat  # pylint: disable=import-outside-toplevel
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel

  notebook = nbformat.read(os.path.join(HERE, name), as_version=4)
  client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": HERE}})
  start = last = time.perf_counter()
  if verbose:
    def report(cell, cell_index, **_):
      nonlocal last
      now = time.perf_counter()
      first = (cell.source.splitlines() or [""])[0][:60]
      print(f"  cell {cell_index:2d}: {now - last:6.1f} s  {first}", flush=True)
      last = now
    client.on_cell_executed = report
  with _environment(small):
    client.execute()
  return notebook, time.perf_counter() - start


def figures(notebook) -> Dict[str, List[bytes]]:
  """PNG bytes of every `figure:<name>`-tagged cell, by name (empty list: drew nothing)."""
  found: Dict[str, List[bytes]] = {}
  for cell in notebook.cells:
    for tag in cell.get("metadata", {}).get("tags", []):
      if tag.startswith(FIGURE_TAG):
        found[tag[len(FIGURE_TAG):]] = [
            base64.b64decode(out["data"]["image/png"]) for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  return found


def _children_cpu() -> float:
  """User + system CPU seconds of finished child processes (the kernels)."""
  import resource  # pylint: disable=import-outside-toplevel
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("names", nargs="*", default=list(NOTEBOOKS))
  parser.add_argument("--full", action="store_true", help="full settings (not CI-sized)")
  parser.add_argument("--save", default="", help="write <notebook>_<figure>.png here")
  args = parser.parse_args(argv)
  for name in args.names:
    cpu = _children_cpu()
    notebook, seconds = execute(name, small=not args.full, verbose=True)
    found = figures(notebook)
    print(f"{name}: {seconds:.1f} s wall, {_children_cpu() - cpu:.1f} s CPU (kernel), "
          f"figures {sorted(found)}", flush=True)
    if args.save:
      os.makedirs(args.save, exist_ok=True)
      for fig, pngs in found.items():
        for i, png in enumerate(pngs):
          suffix = f"_{i + 1}" if len(pngs) > 1 else ""
          path = os.path.join(args.save, f"{name.removesuffix('.ipynb')}_{fig}{suffix}.png")
          with open(path, "wb") as f:
            f.write(png)
          print(f"  wrote {path} ({len(png) // 1024} KiB)")


if __name__ == "__main__":
  sys.exit(main())
