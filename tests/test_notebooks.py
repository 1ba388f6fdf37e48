"""The notebooks: stripped, paired with their jupytext sources, importing only the library,
and executed top to bottom (CI-sized settings) drawing every figure they promise."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NOTEBOOKS)
import run_notebooks  # noqa: E402  pylint: disable=wrong-import-position

# The figures each notebook must draw (cells tagged `figure:<name>`).
FIGURES = {
    "quickstart.ipynb": {"loss", "decode_speed"},
    "anatomy.ipynb": {"orders", "masks", "causality", "prefix_weights"},
    "generation.ipynb": {"strided_steps", "tradeoff"},
}


def load(name):
  with open(os.path.join(NOTEBOOKS, name)) as f:
    return json.load(f)


def code_cells(notebook):
  return [c for c in notebook["cells"] if c["cell_type"] == "code"]


def test_every_notebook_in_the_directory_is_listed():
  assert sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")) == sorted(FIGURES)
  assert set(run_notebooks.NOTEBOOKS) == set(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_is_stripped_paired_and_only_imports(name):
  notebook = load(name)
  cells = code_cells(notebook)
  for cell in cells:
    assert not cell.get("outputs") and cell.get("execution_count") is None, \
        f"{name}: outputs must be stripped (jupytext --to ipynb {name[:-6]}.py)"
    source = "".join(cell["source"])
    assert "nn.Module" not in source and "class " not in source, "notebooks only import"
  # The first code cell installs the package in a fresh runtime, and only when needed.
  assert 'find_spec("armd_jax") is None' in "".join(cells[0]["source"])
  tags = [t for c in cells for t in c.get("metadata", {}).get("tags", [])]
  assert "parameters" in tags
  assert {t[len("figure:"):] for t in tags if t.startswith("figure:")} == FIGURES[name]
  # The .ipynb is generated from its jupytext pair; they must not drift.
  import jupytext  # pylint: disable=import-outside-toplevel
  paired = jupytext.read(os.path.join(NOTEBOOKS, name[:-len(".ipynb")] + ".py"))
  assert [(c.cell_type, c.source) for c in paired.cells] == [
      (c["cell_type"], "".join(c["source"])) for c in notebook["cells"]], \
      f"{name} and its .py differ: jupytext --to ipynb notebooks/{name[:-6]}.py"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_draws_its_figures(name):
  notebook, seconds = run_notebooks.execute(name, small=True)  # raises on any cell error
  drawn = run_notebooks.figures(notebook)
  missing = sorted(f for f in FIGURES[name] if not drawn.get(f))
  assert not missing, f"{name} drew no image for figure(s) {missing}"
  print(f"{name}: executed in {seconds:.1f} s")
  if os.environ.get("ARMD_NOTEBOOK_FIGURES"):  # e.g. =docs/img to refresh the README's
    run_notebooks.save_figures(name, drawn, os.environ["ARMD_NOTEBOOK_FIGURES"])
