"""The target-free restore (`checkpoints.restore_state_arrays`, the path a restore onto
another mesh takes) reads a saved step as the trainer saved it. A fsdp=8 checkpoint
restored bitwise onto other meshes, with training continuing there, is
tests/test_multiprocess.py's (it reuses that file's 8-device reference run).
"""

from armd_jax import train


def test_the_target_free_restore_reads_any_saved_step_as_the_trainer_saved_it(tiny_workdir):
  """`restore_state_arrays` builds its target from the checkpoint's metadata (the path
  the mesh-change restore takes), on the shared one-device `tiny` run: the newest step
  is 60 and its params are the raw params `load_trained` restores with its own target;
  an older step comes back with its own step counter and other params."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from armd_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
  state, step = checkpoints.restore_state_arrays(tiny_workdir)
  trained = train.load_trained(tiny_workdir, use_ema=False, with_vocab=False)
  assert step == 60 == int(state["step"]) == trained.step
  leaves = jax.tree.leaves(trained.params)
  assert len(jax.tree.leaves(state["params"])) == len(leaves)
  for a, b in zip(jax.tree.leaves(state["params"]), leaves):
    np.testing.assert_array_equal(a, b)
  older, older_step = checkpoints.restore_state_arrays(tiny_workdir, step=20)
  assert older_step == 20 == int(older["step"])
  assert not np.array_equal(jax.tree.leaves(older["params"])[0], leaves[0])
