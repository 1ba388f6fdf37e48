"""The notebooks run top to bottom against the installed library (so they cannot rot)."""

import json
import os

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb")))
def test_every_code_cell_of_the_notebook_runs_and_defines_no_model_inline(name):
  cells = code_cells(os.path.join(NOTEBOOKS, name))
  assert cells, f"{name} has no code"
  for source in cells:
    assert "nn.Module" not in source and "class " not in source, "notebooks only import"
  namespace = {}
  for source in cells:
    exec(compile(source, name, "exec"), namespace)  # pylint: disable=exec-used
