"""Benchmark scripts: clear errors on missing inputs, and a tiny run of the FLOPs-per-call
analysis (the timed runs themselves are in benchmarks/)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_compare_names_a_missing_data_file():
  missing = os.path.join(ROOT, "no_such_dir", "input.txt")
  run = subprocess.run([sys.executable, "benchmarks/compare.py", "--smoke", "--data", missing],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert f"no tiny Shakespeare file at {missing} (pass --data)" in run.stderr


@pytest.mark.slow
def test_strided_bound_counts_the_flops_of_one_call_per_width_and_its_calls(tmp_path):
  out = tmp_path / "bound.json"
  run = subprocess.run([sys.executable, "benchmarks/strided_bound.py", "--settings=tiny:16",
                        "--repeats=1", f"--out={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(out, encoding="utf-8") as f:
    (record,) = json.load(f)["records"]
  assert record["calls"] == {"sequential": 16, "strided": 7, "strided_width_1": 4,
                             "strided_width_4": 3}
  flops = record["flops_per_call"]
  # A width-4 call does 2-4x the work of a width-1 call (per-call parts do not grow).
  assert 2.0 < flops["width_4"] / flops["width_1"] < 4.0
  assert record["flops_total"]["strided"] < record["flops_total"]["sequential"]
  assert record["speedup"]["measured"] > 0
