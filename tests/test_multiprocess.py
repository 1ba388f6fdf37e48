"""Real multi-process runs: 2 processes x 4 CPU devices on localhost train `tiny` on an
FSDP mesh over all 8 devices through `python -m armd_jax.main --jax_distributed` (the
route `launch/train_multihost.sh` takes), checked against one process with all 8
devices trained once for the module (`reference`):

- with `--workdir=gs://BUCKET/run` (a local fake-gcs-server), SIGKILLed together mid-run
  and restarted, they resume from the bucket and end with the reference's losses and
  parameters; sampling and evaluation (what the `sample` and `evaluate` commands run)
  read the same URL; nothing is written locally;
- on a copy of the reference with a damaged newest step, they agree that a changed model
  stops both and that the damaged step is skipped by both, and a SIGTERM to one of them
  makes both save one agreed step and exit 143.

The reference's fsdp=8 checkpoint also restores bitwise onto other meshes (fsdp=4 x
tensor=2, one device), and training continues from it there with its losses.

Every process is a fresh interpreter: the device count and `jax.distributed` must be
set before JAX starts.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest

from armd_jax import storage, train
from armd_jax.train import checkpoints, preemption

from conftest import host_devices_env
from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures)
from test_resume import listing, truncate_arrays

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 12
KILL_AFTER = 9  # process 0's progress line of this step triggers the SIGKILL
TIMEOUT_S = 600
# Same program on the same 8-device mesh and the same global batches either way; only
# the cross-process all-reduces (gloo) add in another order than the in-process ones.
# Measured: 7 of 12 steps bitwise equal, the others within 1.7e-7 relative.
LOSS_RTOL = 1e-6


def command(workdir, distributed):
  return [sys.executable, "-m", "armd_jax.main",
          f"--config={os.path.join(REPO, 'configs', 'tiny.py')}",
          f"--workdir={workdir}", f"--config.train.num_steps={NUM_STEPS}",
          "--config.mesh.shape=(1, -1, 1)", "--config.mesh.rule_table=fsdp",
          "--config.train.log_every=1", "--config.train.checkpoint_every=4",
          "--config.train.eval_every=0", "--config.eval.num_batches=2"] + (
              ["--jax_distributed"] if distributed else [])


def environment(devices, process_id=None, port=None):
  env = host_devices_env(devices)
  if process_id is not None:
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(process_id))
  return env


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_pair(workdir, log_dir, attempt, extra=(), cwd=REPO):
  """Starts processes 0 and 1 (4 CPU devices each) with `command(workdir, True) + extra`
  in `cwd`; process 0's stdout is piped, everything else goes to p{i}_{attempt}.log."""
  port = free_port()
  logs = [open(os.path.join(log_dir, f"p{i}_{attempt}.log"), "w") for i in range(2)]
  procs = []
  for i in range(2):
    procs.append(subprocess.Popen(
        command(workdir, True) + list(extra), cwd=cwd, env=environment(4, i, port),
        text=True, stdout=subprocess.PIPE if i == 0 else logs[i], stderr=logs[i]))
  return procs, logs


def _kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def read_until_step(procs, step):
  """Process 0's stdout lines up to its progress line of `step` (or its end); both
  processes are killed if that takes more than TIMEOUT_S, so a hang cannot block."""
  output = []
  watchdog = threading.Timer(TIMEOUT_S, _kill_all, [procs])
  watchdog.start()
  try:
    for line in procs[0].stdout:
      output.append(line)
      if line.startswith(f"step {step}/"):
        break
  finally:
    watchdog.cancel()
  return output


def kill_pair_after(procs, logs, step):
  """SIGKILLs both processes once process 0 prints the progress line of `step` (or ends,
  or TIMEOUT_S passes); closes their log files and returns process 0's stdout lines."""
  try:
    return read_until_step(procs, step)
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
    _kill_all(procs)
    for f in logs:
      f.close()


def finish_pair(procs, logs, log_dir, attempt):
  """Waits at most TIMEOUT_S for a pair from `start_pair` (then kills what is left);
  returns (return codes, [process 0's stdout + log, process 1's log])."""
  try:
    out0, _ = procs[0].communicate(timeout=TIMEOUT_S)
    procs[1].wait(timeout=TIMEOUT_S)
  finally:  # never leave a process behind, even on a timeout
    _kill_all(procs)
    for f in logs:
      f.close()
  texts = [out0 + open(os.path.join(log_dir, f"p0_{attempt}.log")).read(),
           open(os.path.join(log_dir, f"p1_{attempt}.log")).read()]
  return [p.returncode for p in procs], texts


# Run in one process with 8 CPU devices: argv = the reference workdir, a scratch folder.
RESTORE_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from armd_jax import train
    from armd_jax.models import build_model
    from armd_jax.train import checkpoints, partitioning, run_config, state as state_lib
    from armd_jax.train.settings import model_config_from, settings_from

    reference, root = sys.argv[1:]

    def config(shape):  # the reference run's own config on another mesh
      c = run_config.load_config(reference)
      c.mesh.shape, c.mesh.rule_table = shape, "fsdp_tensor"
      return c

    # 1. The fsdp=8 checkpoint of step 8, restored onto fsdp=4 x tensor=2 (8 devices) and
    #    onto one device, against the target-free restore of its saved arrays.
    saved, step = checkpoints.restore_state_arrays(reference, step=8)  # one device
    assert step == 8
    out = {}
    for name, shape, devices in (("fsdp4_tensor2", (1, 4, 2), jax.devices()),
                                 ("one_device", (1, 1, 1), jax.devices()[:1])):
      settings = settings_from(config(shape))
      mesh = partitioning.make_mesh(settings.mesh, devices)
      rules = partitioning.rules_of(settings.mesh)
      tc = settings.train
      _, abstract, _ = state_lib.train_state_layout(
          build_model(model_config_from(config(shape))), settings.optim, tc.num_steps,
          tc.seq_len, tc.seed, mesh, rules)
      manager = checkpoints.make_manager(reference, 3, False, read_only=True)
      state = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))["state"]
      manager.close()
      # `saved` is a dict (sorted keys); the TrainState flattens in field order, so
      # compare field by field (inside a field both flatten alike).
      pairs = []
      for field in ("step", "rng", "params", "ema_params", "opt_state"):
        got = jax.tree_util.tree_leaves_with_path(getattr(state, field))
        want = jax.tree.leaves(saved[field])
        assert len(got) == len(want), field
        pairs += [(field + jax.tree_util.keystr(p), x, y) for (p, x), y in zip(got, want)]
      mismatches = [name for name, x, y in pairs
                    if np.shape(x) != np.shape(y) or not np.array_equal(np.asarray(x),
                                                                         np.asarray(y))]
      layouts = [x.sharding == t.sharding for x, t in zip(jax.tree.leaves(state),
                                                          jax.tree.leaves(abstract))]
      wi = state.params["params"]["layer_0"]["mlp"]["wi"]["kernel"]
      out[name] = {"mismatches": mismatches, "leaves": len(pairs), "on_target": all(layouts),
                   "wi_spec": [a for a in wi.sharding.spec], "wi_devices": len(wi.devices())}

    # 2. Training continues from step 8 on the new mesh (a copy, step 12 removed).
    continued = f"{root}/continued_fsdp4_tensor2"
    shutil.copytree(reference, continued)
    shutil.rmtree(checkpoints.checkpoint_dir(continued) / "12")
    train.train_and_evaluate(config((1, 4, 2)), continued)
    print("RESULT", json.dumps(out))
""")


def losses_after_resume(workdir):
  """{9..12: loss} as the run resumed at step 8 wrote them, after the records of steps
  1..12 copied from the reference (metrics.jsonl is appended to)."""
  records = [(r["step"], r["train/loss"]) for r in train.read_metrics(workdir)
             if "train/loss" in r]
  redone = list(range(9, NUM_STEPS + 1))
  assert [s for s, _ in records] == list(range(1, NUM_STEPS + 1)) + redone, records
  return dict(records[NUM_STEPS:])


def last_loss_per_step(workdir):
  return {r["step"]: r["train/loss"] for r in train.read_metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process with all 8 devices, uninterrupted: checkpoints at steps 4, 8 and 12
  (read only; a test that changes it copies it first)."""
  workdir = str(tmp_path_factory.mktemp("reference") / "single")
  result = subprocess.run(command(workdir, False), cwd=REPO, env=environment(8), text=True,
                          capture_output=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "process 0 of 1" in result.stdout
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in result.stdout
  assert sorted(last_loss_per_step(workdir)) == list(range(1, NUM_STEPS + 1))
  return workdir


@pytest.mark.slow
def test_two_processes_in_a_bucket_killed_and_restarted_match_one_local_process(
    reference, gcs_bucket, tmp_path, monkeypatch):
  """`--workdir=gs://BUCKET/run` on 2 processes x 4 CPU devices: both write their
  checkpoint parts to the bucket, are SIGKILLed together after step 9, restart and resume
  from the bucket; every step's loss equals the 1-process x 8-device local run within
  LOSS_RTOL and so do the final parameters. Sampling and evaluation (`sample_from_workdir`
  and `evaluate_workdir`, what the `sample` and `evaluate` commands run) read the same URL,
  and nothing is written to the cwd of any of them (no local `gs:` folder)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.setenv(storage.LOCAL_CACHE_VARIABLE, str(tmp_path / "local_cache"))
  run, logs_dir = f"{gcs_bucket}/run", str(tmp_path / "logs")
  os.makedirs(logs_dir)

  def log(name):
    with open(os.path.join(logs_dir, name)) as f:
      return f.read()[-3000:]

  # 1. Two processes, SIGKILLed together right after step KILL_AFTER.
  procs, logs = start_pair(run, logs_dir, 0, cwd=cwd)
  first_output = "".join(kill_pair_after(procs, logs, KILL_AFTER))
  assert f"step {KILL_AFTER}/" in first_output, first_output[-2000:] + log("p0_0.log")
  assert "process 0 of 2" in first_output
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in first_output
  assert all(p.returncode == -signal.SIGKILL for p in procs)
  directory = checkpoints.checkpoint_dir(run)
  saved = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  assert saved and NUM_STEPS not in saved, saved  # stopped mid-run, checkpoints in the bucket
  # Both processes wrote their part: one data-iterator state file per process.
  for step in saved:
    names = [p.name for p in (directory / str(step) / "data").iterdir()]
    assert len([n for n in names if "process" in n]) == 2, (step, names)

  # 2. Restart both; they resume from the last checkpoint in the bucket and finish.
  procs, logs = start_pair(run, logs_dir, 1, cwd=cwd)
  codes, texts = finish_pair(procs, logs, logs_dir, 1)
  assert codes == [0, 0], [t[-3000:] for t in texts]
  resumed_from = int(texts[0].split("resuming from step ")[1].split()[0])
  assert resumed_from in saved and resumed_from >= 4

  # 3. The same losses and parameters as one uninterrupted local process on 8 devices.
  expected, got = last_loss_per_step(reference), last_loss_per_step(run)
  assert sorted(got) == sorted(expected) == list(range(1, NUM_STEPS + 1))
  diffs = {s: abs(got[s] - expected[s]) / abs(expected[s]) for s in expected}
  print("bucket (2 processes, resumed) vs local (1 process) relative loss differences:",
        diffs)
  assert max(diffs.values()) <= LOSS_RTOL, diffs
  a = train.load_trained(run, with_vocab=False)
  b = train.load_trained(reference, with_vocab=False)
  assert a.step == b.step == NUM_STEPS
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

  # 4. Sampling and evaluation read the run from its URL, in this process (the commands
  #    themselves run in tests/test_cli_output.py and test_eval_workdir.py) and the same
  #    empty cwd.
  from armd_jax import evaluate as evaluate_command  # pylint: disable=import-outside-toplevel
  from armd_jax import sample as sample_command  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(cwd)
  samples = sample_command.sample_from_workdir(run, num_samples=1, length=8, warmup=False)
  assert samples.step == NUM_STEPS and len(samples.texts) == 1
  results = evaluate_command.evaluate_workdir(run, max_batches=1)
  assert results["step"] == NUM_STEPS and results["workdir"] == run and results["heldout"]
  local_files = [os.path.join(d, n) for d, dirs, files in os.walk(cwd) for n in dirs + files]
  assert local_files == []  # no `gs:` folder (nor anything else) in the cwd


@pytest.mark.slow
def test_two_processes_agree_to_stop_on_another_model_skip_a_damaged_step_and_save_one_step_on_a_sigterm(
    reference, tmp_path):
  """A copy of the 1-process run (8 devices; steps 4, 8 and 12), step 12 removed as if
  killed after step 8 and step 8's arrays truncated.
  Two processes (4 devices each) started with another d_model both exit non-zero naming
  the field, moving nothing. Started with the run's config both report step 8 damaged,
  resume from step 4 (with a data-iterator restart: the process count changed) and redo
  steps from 5 with the 1-process run's losses (same state, same global batches); a
  SIGTERM to the second process only at step 5 (jax's preemption service turns a notice on
  one host into one step for all hosts) makes both save one agreed step and exit 143.
  Old code: each process judged alone (both steps 'damaged', moved, training from 0)."""
  workdir, log_dir = str(tmp_path / "run"), str(tmp_path / "logs")
  os.makedirs(log_dir)
  shutil.copytree(reference, workdir)
  first = last_loss_per_step(workdir)
  shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(workdir), "12"))  # as if killed at 8
  truncate_arrays(workdir, 8)
  before = listing(workdir)

  # 1. Another model: a stop on both processes, nothing moved.
  procs, logs = start_pair(workdir, log_dir, 1, ["--config.model.d_model=64"])
  codes, texts = finish_pair(procs, logs, log_dir, 1)
  assert all(code not in (0, None) for code in codes), texts
  for text in texts:
    assert "config.model.d_model: saved 32, now 64" in text, text[-3000:]
  assert listing(workdir) == before

  # 2. The run's config: both skip step 8 and resume from step 4; process 1 is preempted.
  procs, logs = start_pair(workdir, log_dir, 2)
  try:
    until_sigterm = "".join(read_until_step(procs, 5))
    procs[1].send_signal(signal.SIGTERM)  # only the second host is preempted
  finally:
    codes, texts = finish_pair(procs, logs, log_dir, 2)
  texts[0] = until_sigterm + texts[0]
  assert codes == [preemption.EXIT_STATUS] * 2, [t[-3000:] for t in texts]
  for text in texts:
    assert "checkpoint at step 8 is damaged (unreadable array" in text, text[-3000:]
    assert "resuming from step 4" in text
    assert "saved by 1 process(es), this run has 2" in text
  assert os.listdir(os.path.join(workdir, checkpoints.DAMAGED_DIR)) == ["8"]
  agreed = {int(m) for text in texts
            for m in re.findall(r"saved a checkpoint at step (\d+)", text)}
  assert len(agreed) == 1, agreed  # both processes name one step
  stopped = agreed.pop()
  saved = {int(s) for s in os.listdir(checkpoints.checkpoint_dir(workdir)) if s.isdigit()}
  assert 5 < stopped < NUM_STEPS and stopped in saved, (stopped, saved)
  # The records after the 12 copied ones are the two processes' own: steps 5..stopped.
  redone = [(r["step"], r["train/loss"]) for r in train.read_metrics(workdir)
            if "train/loss" in r][NUM_STEPS:]
  assert [step for step, _ in redone] == list(range(5, stopped + 1)), redone
  for step, loss in redone:
    assert abs(loss - first[step]) <= LOSS_RTOL * abs(first[step]), (step, redone, first)


@pytest.mark.slow
def test_a_fsdp8_checkpoint_restores_bitwise_on_other_meshes_and_training_continues(
    reference, tmp_path):
  """The reference's step-8 checkpoint (written on fsdp=8) restores onto fsdp=4 x
  tensor=2 and onto one device with every leaf of the state (params, Adam moments, EMA,
  step, rng) bitwise equal and laid out on the target mesh; training continues from it on
  fsdp=4 x tensor=2 (in the 8-device process) and in a 1-device process through the
  command, and steps 9-12 have the uninterrupted fsdp=8 run's losses within 1e-5 relative
  (same data, same state, same step rng)."""
  result = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, reference, str(tmp_path)],
                          cwd=REPO, env=environment(8), text=True, capture_output=True,
                          timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  out = json.loads(result.stdout.split("RESULT ", 1)[1])
  print(out)
  for name in ("fsdp4_tensor2", "one_device"):
    assert out[name]["mismatches"] == [], out[name]
    assert out[name]["leaves"] > 20 and out[name]["on_target"]
  assert out["fsdp4_tensor2"]["wi_spec"] == ["fsdp", "tensor"]
  assert out["fsdp4_tensor2"]["wi_devices"] == 8 and out["one_device"]["wi_devices"] == 1

  # One device: a copy continues through the command in a 1-device process.
  one = str(tmp_path / "continued_one_device")
  shutil.copytree(reference, one)
  shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(one), "12"))  # as if stopped at 8
  result = subprocess.run(
      [a for a in command(one, False) if not a.startswith("--config.mesh.")] +
      ["--config.mesh.shape=(1, 1, 1)"], cwd=REPO, env=environment(1), text=True,
      capture_output=True, timeout=TIMEOUT_S)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "resuming from step 8" in result.stdout

  expected = last_loss_per_step(reference)  # uninterrupted on fsdp=8
  for workdir in ("continued_fsdp4_tensor2", "continued_one_device"):
    got = losses_after_resume(str(tmp_path / workdir))
    for step in got:
      assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (
          workdir, got, expected)
