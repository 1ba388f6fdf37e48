"""Executes the notebooks top to bottom and collects the figures they draw.

Every notebook reads `ARMD_NOTEBOOK_SMALL=1` in its `parameters` cell and then runs the
same cells with CI-sized settings. Figure cells carry a tag `figure:<name>`; their
image/png outputs are what the tests check and what `--save` writes to `docs/img/`.

Commands:
  python notebooks/run_notebooks.py                          # all, small settings
  python notebooks/run_notebooks.py --full --save docs/img   # full settings, save PNGs
  python notebooks/run_notebooks.py anatomy.ipynb            # one notebook
  python notebooks/run_notebooks.py --plain --full --save DIR # no Jupyter: exec the .py
                                                             # pairs cell by cell (Agg)

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


def execute_plain(name: str, small: bool = True) -> Dict[str, List[bytes]]:
  """Runs the jupytext pair of notebooks/<name> cell by cell in this process, no Jupyter.

  matplotlib draws off-screen (Agg); after each code cell its new figures are rendered
  to PNG under the cell's `figure:<name>` tag (untagged cells' figures are dropped).
  Needs only armd_jax's own dependencies and matplotlib.

  Returns:
    The PNG bytes per figure name, as `figures` does for an executed notebook.
  """
  import io  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel

  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  with open(os.path.join(HERE, name.removesuffix(".ipynb") + ".py"), encoding="utf-8") as f:
    text = f.read()
  cells = re.split(r"^# %%(.*)$", text, flags=re.M)  # [preamble, header, body, ...]
  found: Dict[str, List[bytes]] = {}
  namespace: Dict[str, object] = {"__name__": "__main__"}
  saved_cwd = os.getcwd()
  sys.path.insert(0, REPO)
  os.chdir(HERE)
  try:
    with _environment(small):
      for index, (header, body) in enumerate(zip(cells[1::2], cells[2::2])):
        if "[markdown]" in header:
          continue
        start = time.perf_counter()
        exec(compile(body, f"{name}[{index}]", "exec"), namespace)  # pylint: disable=exec-used
        tags = re.findall(r'"([^"]+)"', re.search(r"tags=\[(.*?)\]", header).group(1)
                          ) if "tags=" in header else []
        figure = next((t[len(FIGURE_TAG):] for t in tags if t.startswith(FIGURE_TAG)), None)
        for number in plt.get_fignums():
          if figure is not None:
            buffer = io.BytesIO()
            plt.figure(number).savefig(buffer, format="png", dpi=80, bbox_inches="tight")
            found.setdefault(figure, []).append(buffer.getvalue())
          plt.close(number)
        first = (body.strip().splitlines() or [""])[0][:60]
        print(f"  cell {index:2d}: {time.perf_counter() - start:6.1f} s  {first}", flush=True)
  finally:
    os.chdir(saved_cwd)
    sys.path.remove(REPO)
  return found


def save_figures(name: str, found: Dict[str, List[bytes]], directory: str) -> None:
  """Writes <directory>/<notebook>_<figure>[_i].png for every figure drawn."""
  os.makedirs(directory, exist_ok=True)
  for fig, pngs in found.items():
    for i, png in enumerate(pngs):
      suffix = f"_{i + 1}" if len(pngs) > 1 else ""
      path = os.path.join(directory, f"{name.removesuffix('.ipynb')}_{fig}{suffix}.png")
      with open(path, "wb") as f:
        f.write(png)
      print(f"  wrote {path} ({len(png) // 1024} KiB)")


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
  parser.add_argument("--plain", action="store_true",
                      help="exec the .py pairs in this process (no Jupyter needed)")
  args = parser.parse_args(argv)
  for name in args.names:
    cpu, start = _children_cpu(), time.perf_counter()
    if args.plain:
      found = execute_plain(name, small=not args.full)
    else:
      notebook, _ = execute(name, small=not args.full, verbose=True)
      found = figures(notebook)
    print(f"{name}: {time.perf_counter() - start:.1f} s wall, {_children_cpu() - cpu:.1f} s "
          f"CPU (kernel; 0 with --plain), figures {sorted(found)}", flush=True)
    if args.save:
      save_figures(name, found, args.save)


if __name__ == "__main__":
  sys.exit(main())
