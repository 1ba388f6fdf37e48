"""The damage check that checkpoint recovery relies on, and `short_tiny`, the short run the
resume tests train. Recovery itself (a damaged newest checkpoint moved aside, training
resumed from the older one) is tested in test_resume.py, the workdir lock in
test_lock.py."""

import glob
import os
import shutil

from armd_jax.train import checkpoints
from armd_jax.train.defaults import config_from_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_tiny(num_steps):
  config = config_from_file(os.path.join(ROOT, "configs", "tiny.py"))
  config.train.num_steps = num_steps
  config.train.checkpoint_every = 10
  config.train.eval_every = 0
  config.eval.num_batches = 1
  config.checkpoint.async_save = False
  return config


def test_the_damage_check_names_a_truncated_array_file_and_passes_whole_steps(tiny_workdir,
                                                                               tmp_path):
  """`read_damage` on a copy of the shared trained workdir (no training): every saved
  step reads back whole; after one array file of step 60 is cut short, step 60 is
  unreadable (OUT_OF_RANGE) naming that file, and step 40 is still whole."""
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_workdir, workdir)
  directory = checkpoints.checkpoint_dir(workdir)
  assert sorted(os.listdir(directory), key=int) == ["20", "40", "60"]
  for step in ("20", "40", "60"):
    assert checkpoints.read_damage(directory / step) is None, step
  data_files = sorted(glob.glob(os.path.join(str(directory), "60", "state", "**", "d", "*"),
                                recursive=True))
  assert data_files
  with open(data_files[0], "r+b") as f:
    f.truncate(8)
  damage = checkpoints.read_damage(directory / "60")
  assert damage is not None, "a truncated array file passed the damage check"
  # The file may hold index nodes or array values: 'unreadable array index/data (CODE)'.
  assert damage.reason.startswith("unreadable array ") and "(OUT_OF_RANGE)" in damage.reason
  assert os.path.basename(data_files[0]) in damage.detail
  assert checkpoints.read_damage(directory / "40") is None
