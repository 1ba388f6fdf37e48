"""The notebooks: stripped, paired with their jupytext sources, importing only the library,
and executed top to bottom (CI-sized settings) drawing every figure they promise."""

import json
import os
import subprocess
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


def install_cell(name):
  return "".join(code_cells(load(name))[0]["source"])


def test_a_notebook_opened_alone_names_its_source_or_says_how_to_set_it(tmp_path):
  # All notebooks share one install cell, whose source is the ARMD_JAX_SOURCE constant.
  cells = {install_cell(name) for name in FIGURES}
  assert len(cells) == 1
  cell = cells.pop()
  assert cell.count('os.environ.get("ARMD_JAX_SOURCE", "")') == 1
  assert "armd-jax[plot]\"" not in cell  # no unpublished PyPI name to fall back to
  # Run it as a fresh runtime would: `python -S` cannot import armd_jax (no site-packages),
  # and the working directory is no checkout.
  env = {k: v for k, v in os.environ.items() if k != "ARMD_JAX_SOURCE"}
  for source, message in ((None, "set ARMD_JAX_SOURCE"),
                          (str(tmp_path / "no_such_repo"), "could not clone ARMD_JAX_SOURCE")):
    run_env = env if source is None else {**env, "ARMD_JAX_SOURCE": source}
    proc = subprocess.run([sys.executable, "-S", "-c", cell], cwd=tmp_path, env=run_env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "RuntimeError" in proc.stderr and not (tmp_path / "armd-jax").exists()
