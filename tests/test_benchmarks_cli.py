"""Benchmark scripts fail clearly on missing inputs (they are not run here: see benchmarks/)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_names_a_missing_data_file():
  missing = os.path.join(ROOT, "no_such_dir", "input.txt")
  run = subprocess.run([sys.executable, "benchmarks/compare.py", "--smoke", "--data", missing],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert f"no tiny Shakespeare file at {missing} (pass --data)" in run.stderr
