"""Sweeps: a config's sweep() expanded into named workdirs; a killed local sweep resumes."""

import os
import signal
import subprocess
import sys
import time

import pytest

from armd_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_CONFIG = '''
import os
from armd_jax.train.defaults import config_from_file

def get_config():
  c = config_from_file(os.path.join({repo!r}, "configs", "tiny.py"))
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.eval_every = 2
  c.train.checkpoint_every = 4  # one checkpoint per point, at its last step
  c.eval.num_batches = 1
  c.checkpoint.async_save = False
  return c

def sweep():  # two points that differ in the seed only (one compiled train step serves
  # both); each names two fields
  return [{{"train.seed": seed, "model.query_init": "prefix_plus_position"}} for seed in (0, 1)]
'''


def test_point_names_flags_and_overrides():
  from armd_jax.train.defaults import config_from_file
  point = {"order.rho": 4, "model.query_init": "prefix", "mesh.shape": (2, -1)}
  assert sweep.point_name(point) == "order.rho=4,model.query_init=prefix,mesh.shape=_2,-1_"
  assert sweep.override_flags(point) == ["--config.order.rho=4",
                                         "--config.model.query_init=prefix",
                                         "--config.mesh.shape=(2,-1)"]
  base = config_from_file(os.path.join(REPO, "configs", "tiny.py"))
  swept = sweep.apply_overrides(base, point)
  assert (swept.order.rho, swept.model.query_init, swept.mesh.shape) == (4, "prefix", (2, -1))
  assert base.order.rho == 16  # the base config is not modified
  with pytest.raises(ValueError, match="no field 'rhoo'"):
    sweep.apply_overrides(base, {"order.rhoo": 1})


def test_shipped_example_sweep_is_2x2_and_valid():
  from armd_jax.train.defaults import config_from_file
  path = os.path.join(REPO, "configs", "shakespeare.py")
  points = sweep.load_sweep(path)
  assert len(points) == 4 and len({sweep.point_name(p) for p in points}) == 4
  base = config_from_file(path)
  for point in points:
    sweep.apply_overrides(base, point)


def _sweep_cmd(config_file, root):
  return [sys.executable, "-m", "armd_jax.sweep", f"--config={config_file}", f"--root={root}"]


@pytest.mark.slow
def test_local_sweep_killed_and_resumed(tmp_path):
  """A local sweep SIGKILLed after its first point finished, rerun: the first point is
  skipped, the second trained, and the summary has one complete row per point."""
  config_file = tmp_path / "tiny_sweep.py"
  config_file.write_text(SWEEP_CONFIG.format(repo=REPO))
  root = tmp_path / "sweep"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  points = sweep.load_sweep(str(config_file))
  first_done = root / sweep.point_name(points[0]) / sweep.DONE_FILE
  log = open(tmp_path / "first.log", "w", encoding="utf-8")
  proc = subprocess.Popen(_sweep_cmd(config_file, root), cwd=REPO, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while not first_done.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  assert first_done.exists(), (tmp_path / "first.log").read_text()[-3000:]
  proc.send_signal(signal.SIGKILL)  # mid-sweep: the first point finished, the second not
  proc.wait()
  log.close()
  assert not (root / "summary.md").exists()

  out = subprocess.run(_sweep_cmd(config_file, root), cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f"{sweep.point_name(points[0])}: finished, skipped" in out.stdout
  table = (root / "summary.md").read_text().splitlines()
  rows = table[2:]
  assert len(rows) == len(points) == 2, table
  for point, row in zip(points, rows):
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == [str(point["train.seed"]), point["model.query_init"], "4"], row
    assert all(c != "-" for c in cells[3:]), row  # every final metric present
  losses = [row.split("|")[-2].strip() for row in rows]
  assert losses[0] != losses[1]  # the two seeds really trained two runs
  assert (root / "val_curves.png").stat().st_size > 0
