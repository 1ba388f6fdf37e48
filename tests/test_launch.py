"""The launch scripts: --dry_run prints the exact commands (nothing runs, no cloud needed);
tpu_vm.sh runs against a fake gcloud whose one TPU worker is a local directory, with real
shells and real detached processes."""

import importlib.util
import os
import shlex
import signal
import subprocess

import pytest

from armd_jax.train.settings import settings_from

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ("python -m armd_jax.main --config=configs/owt_small.py --workdir=gs://bucket/run "
         "--jax_distributed --config.train.seed=3")


def dry_run(script, *args, env=None):
  """The '+ ' command lines a launch script prints with --dry_run."""
  out = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args, "--dry_run"],
                       capture_output=True, text=True, check=True, cwd=REPO,
                       env={**os.environ, **(env or {})}, timeout=60)
  return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A stand-in for gcloud: a TPU VM slice of one worker, emulated by a local home directory.
w="${FAKE_TPU_DIR}"
{ printf '%s\x1f' "$@"; printf '\x1e'; } >> "${w}/calls"
[ "$1" = storage ] && exit 0  # the job copying its log to a gs:// workdir
job_alive() {
  pid=$(cat "${w}/home/armd-run/pid" 2>/dev/null) && [ -n "${pid}" ] \
    && ps -ww -p "${pid}" -o args= 2>/dev/null | grep -q armd_jax.main
}
case "$4" in
  describe) if [ -e "${w}/slice" ]; then echo READY; else echo "ERROR: NOT_FOUND $5" >&2; exit 1; fi ;;
  create) touch "${w}/slice" ;;
  delete) if job_alive; then echo "$*" >> "${w}/deleted_while_running"; fi; rm -f "${w}/slice" ;;
  scp) cp "$5" "${w}/home/${6#*:}" ;;
  ssh)
    if [ -e "${w}/unreachable" ]; then echo "ssh: connect to host: timed out" >&2; exit 255; fi
    for a in "$@"; do case "${a}" in --command=*) cmd="${a#--command=}" ;; esac; done
    HOME="${w}/home" bash -c "${cmd}" ;;
  *) echo "fake gcloud: unexpected $*" >&2; exit 3 ;;
esac
"""
FAKE_PYTHON = '#!/bin/sh\necho "python $*"\nexec sleep "${FAKE_TRAIN_SECONDS:-120}"\n'
FAKE_PIP = '#!/bin/sh\necho "pip $*"\n'


class FakeSlice:
  """Runs launch/tpu_vm.sh against the fake gcloud: real shells and real processes on one
  emulated worker (its home is `self.home`); pip and the trainer are stand-ins (the
  trainer sleeps FAKE_TRAIN_SECONDS)."""

  def __init__(self, root):
    self.root, self.home = root, root / "home"
    self.home.mkdir()
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in (("gcloud", FAKE_GCLOUD), ("python", FAKE_PYTHON), ("pip", FAKE_PIP)):
      (bin_dir / name).write_text(text)
      (bin_dir / name).chmod(0o755)
    self.name = f"armd-test-{os.getpid()}-{root.name}"
    self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "FAKE_TPU_DIR": str(root)}

  def tpu_vm(self, *args, dry_run=False, train_seconds=120, expect_rc=0):
    """Runs the launcher; returns (stdout, stderr), checking its exit status."""
    out = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "--zone=z", f"--name={self.name}",
         *args, *(["--dry_run"] if dry_run else [])],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**self.env, "FAKE_TRAIN_SECONDS": str(train_seconds)})
    assert out.returncode == expect_rc, out.stdout + out.stderr
    return out.stdout, out.stderr

  def launch(self, *args, **kwargs):
    return self.tpu_vm("--config=configs/owt_small.py", "--workdir=gs://bucket/run",
                       "--config.train.seed=3", *args, **kwargs)

  def calls(self):
    """Every gcloud call so far, as argument lists."""
    path = self.root / "calls"
    text = path.read_text() if path.exists() else ""
    return [call.split("\x1f")[:-1] for call in text.split("\x1e")[:-1]]

  def deletes(self):
    return [c for c in self.calls() if c[3:4] == ["delete"]]

  def slice_up(self):
    return (self.root / "slice").exists()

  def job_pid(self):
    path = self.home / "armd-run" / "pid"
    return int(path.read_text()) if path.exists() else None

  def job_alive(self):
    pid = self.job_pid()
    if pid is None:
      return False
    args = subprocess.run(["ps", "-ww", "-p", str(pid), "-o", "args="], capture_output=True,
                          text=True).stdout
    return "armd_jax.main" in args

  def deleted_while_running(self):
    return (self.root / "deleted_while_running").exists()

  def kill_job(self):
    """Ends the job a test started (its own process group), if still there."""
    if self.job_alive():
      os.killpg(self.job_pid(), signal.SIGKILL)


@pytest.fixture
def fake_slice(tmp_path):
  fake = FakeSlice(tmp_path)
  yield fake
  fake.kill_job()
  if os.path.exists(f"/tmp/{fake.name}-src.tar.gz"):
    os.remove(f"/tmp/{fake.name}-src.tar.gz")
  assert not fake.deleted_while_running(), "a slice was deleted while its job ran"


def remote_command(line):
  """The --command= of a printed gcloud ssh line."""
  words = shlex.split(line)
  assert words[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and words[4] == "ssh", line
  (command,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
  return command


def assert_parses(shell_text):
  out = subprocess.run(["bash", "-n", "-c", shell_text], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr


def load_config_with_overrides(argv):
  """The config a `python -m armd_jax.main ...` command line trains, overrides applied."""
  flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
  path = os.path.join(REPO, flags.pop("config"))
  spec = importlib.util.spec_from_file_location("launched_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in flags.items():
    if key.startswith("config."):
      *sections, field = key[len("config."):].split(".")
      node = config
      for section in sections:
        node = node[section]
      assert field in node, key
      node[field] = type(node[field])(value)
  return config, flags


def test_tpu_vm_launch_commands_parse_and_start_a_detached_job_on_every_worker(fake_slice):
  """Dry run on a new slice: create, copy, install, then one ssh that starts the training
  command detached (nohup setsid ... &, output appended to a log, stdin from /dev/null)
  on all workers, with a config that loads; nothing deletes the slice."""
  assert subprocess.run(["bash", "-n", os.path.join(REPO, "launch", "tpu_vm.sh")]).returncode == 0
  stdout, _ = fake_slice.launch(dry_run=True)
  lines = [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]
  words = [shlex.split(line) for line in lines]
  name = fake_slice.name
  assert words[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", name, "--zone=z",
                      "--accelerator-type=v5litepod-64", "--version=v2-alpha-tpuv5-lite"]
  assert words[1][:2] == ["git", "archive"]
  assert words[2][4] == "scp" and "--worker=all" in words[2]
  assert [w[4] for w in words[3:]] == ["ssh", "ssh"]
  assert all("--worker=all" in w for w in words[3:])
  for line in lines[3:]:
    assert_parses(remote_command(line))
  assert "pip install" in remote_command(lines[3])

  start = shlex.split(remote_command(lines[4]))
  i = start.index("nohup")
  assert start[i + 1:i + 4] == ["setsid", "bash", "-c"]
  job, rest = start[i + 4], start[i + 5:]
  assert rest[:6] == [">", "/dev/null", "2>&1", "<", "/dev/null", "&"]
  assert_parses(job)
  job_words = shlex.split(job.replace(";", " ; "))
  p = job_words.index("python")
  end = job_words.index(">>", p)
  argv = job_words[p:end]
  assert job_words[end:end + 3] == [">>", "$log", "2>&1"]
  assert argv[:3] == ["python", "-m", "armd_jax.main"] and "--jax_distributed" in argv
  config, flags = load_config_with_overrides(argv)
  assert config.train.seed == 3 and flags["workdir"] == "gs://bucket/run"
  settings_from(config)  # the typed settings validate
  assert "gcloud storage cp \"$log\" gs://bucket/run/logs/tpu_vm-$(hostname).log" in job
  assert "tee" not in job_words  # nothing ties the job to this client's terminal
  assert not any("delete" in line for line in lines)
  assert [c[3] for c in fake_slice.calls()] == ["describe"]  # a dry run only asks


def test_tpu_vm_picks_the_runtime_image_of_the_chip_generation(fake_slice):
  stdout, _ = fake_slice.tpu_vm("--accelerator_type=v5p-256", "--project=p", "--keep",
                                "--config=configs/owt_medium.py", "--workdir=gs://b/w",
                                dry_run=True)
  assert stdout.splitlines()[0] == (
      f"+ gcloud compute tpus tpu-vm create {fake_slice.name} --zone=z --project=p "
      "--accelerator-type=v5p-256 --version=v2-alpha-tpuv5")


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_launch_never_deletes_the_slice_and_a_rerun_does_not_start_a_second_job(
    fake_slice, dry_run):
  """The job outlives the launcher (it returns while the job runs); running the same
  command again reports the job and starts nothing (the same pid runs on)."""
  fake_slice.launch()
  assert fake_slice.slice_up() and fake_slice.job_alive()
  pid = fake_slice.job_pid()
  calls_before = len(fake_slice.calls())
  stdout, _ = fake_slice.launch(dry_run=dry_run)
  assert "already running" in stdout and not any(l.startswith("+ ") for l in stdout.splitlines())
  assert [c[3] for c in fake_slice.calls()[calls_before:]] == ["describe", "ssh"]
  assert fake_slice.job_pid() == pid and fake_slice.job_alive()
  assert fake_slice.deletes() == [] and fake_slice.slice_up()
  log = (fake_slice.home / "armd-run" / "train.log").read_text()
  assert log.count("python -m armd_jax.main --config=configs/owt_small.py") == 1


def test_status_stop_and_a_restart_after_the_job_ended(fake_slice):
  """--status follows the job, --stop ends its processes on every worker (the slice stays
  up), and the same launch command then starts it again (the trainer resumes)."""
  fake_slice.launch()
  first = fake_slice.job_pid()
  assert fake_slice.tpu_vm("--status")[0].strip().endswith("running")
  stdout, _ = fake_slice.tpu_vm("--stop")
  assert "armd-job: stopped" in stdout and not fake_slice.job_alive() and fake_slice.slice_up()
  assert fake_slice.tpu_vm("--status")[0].strip().endswith("idle")
  fake_slice.launch()
  assert fake_slice.job_alive() and fake_slice.job_pid() != first
  assert fake_slice.deletes() == []
  logs, _ = fake_slice.tpu_vm("--logs", "--worker=3", dry_run=True)
  assert "--worker=3" in logs and "tail -n 200 -F ~/armd-run/train.log" in logs


def test_delete_refuses_while_a_job_runs_and_stop_delete_stops_it_first(fake_slice):
  fake_slice.launch()
  _, stderr = fake_slice.tpu_vm("--delete", expect_rc=2)
  assert "a job is still running" in stderr and "--stop --delete" in stderr
  assert fake_slice.deletes() == [] and fake_slice.job_alive() and fake_slice.slice_up()
  stdout, _ = fake_slice.tpu_vm("--stop", "--delete", dry_run=True)
  printed = [l for l in stdout.splitlines() if l.startswith("+ ")]
  assert "kill -TERM" in printed[0] and " delete " in printed[1]  # dry run: stop, then delete
  assert fake_slice.job_alive() and fake_slice.slice_up()
  fake_slice.tpu_vm("--stop", "--delete")
  assert not fake_slice.job_alive() and not fake_slice.slice_up()
  assert len(fake_slice.deletes()) == 1  # and the fixture checks no job ran at the delete


def test_nothing_is_deleted_or_started_when_the_workers_cannot_be_asked(fake_slice):
  fake_slice.launch()
  (fake_slice.root / "unreachable").touch()
  _, stderr = fake_slice.tpu_vm("--delete", expect_rc=2)
  assert "could not ask the workers" in stderr
  _, stderr = fake_slice.launch(expect_rc=2)
  assert "not starting one" in stderr
  assert fake_slice.deletes() == [] and fake_slice.slice_up()


def test_delete_when_done_waits_for_the_job_to_end_on_every_worker(fake_slice):
  stdout, stderr = fake_slice.launch("--delete_when_done", "--poll_seconds=1", train_seconds=3)
  assert "armd-job: running" in stderr  # it saw the job running, and waited
  assert "deleting the slice" in stdout and not fake_slice.slice_up()
  assert len(fake_slice.deletes()) == 1
  assert (fake_slice.home / "armd-run" / "exit_code").read_text().strip() == "0"


def test_a_config_the_workers_would_not_get_is_refused(fake_slice):
  _, stderr = fake_slice.tpu_vm("--config=configs/not_committed.py", "--workdir=gs://b/w",
                                dry_run=True, expect_rc=2)
  assert "--config=configs/not_committed.py" in stderr and fake_slice.calls() == []


def test_xpk_creates_waits_and_deletes_a_workload():
  lines = dry_run("xpk.sh", "--cluster=c1", "--workload=w1", "--config=configs/owt_small.py",
                  "--workdir=gs://bucket/run", "--config.train.seed=3")
  assert lines == [
      "xpk workload create --cluster=c1 --workload=w1 --tpu-type=v5litepod-64 --num-slices=1 "
      "--base-docker-image=us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest "
      f"'--command=pip install -q -e \".[tpu,hf]\" && {TRAIN}'",
      "xpk workload list --cluster=c1 --wait-for-job-completion=w1",
      "xpk workload delete --cluster=c1 --workload=w1",
  ]


def test_slurm_submits_itself_and_runs_one_process_per_gpu():
  lines = dry_run("slurm_gpu.sbatch", "--config=configs/owt_small.py",
                  "--workdir=gs://bucket/run", "--sbatch_args=--nodes=4 --partition=gpu",
                  "--config.train.seed=3", env={"SLURM_JOB_ID": ""})
  assert lines == [
      "sbatch --nodes=4 --partition=gpu launch/slurm_gpu.sbatch --config=configs/owt_small.py "
      "--workdir=gs://bucket/run --config.train.seed=3",
      f"srun --kill-on-bad-exit=1 bash -c '{TRAIN}'",
  ]
  with open(os.path.join(REPO, "launch", "slurm_gpu.sbatch"), encoding="utf-8") as f:
    text = f.read()
  assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text


@pytest.mark.parametrize("script", ["tpu_vm.sh", "xpk.sh", "slurm_gpu.sbatch"])
def test_scripts_are_strict_and_refuse_non_config_hyperparameters(script):
  with open(os.path.join(REPO, "launch", script), encoding="utf-8") as f:
    assert "set -euo pipefail" in f.read()
  out = subprocess.run(["bash", os.path.join(REPO, "launch", script),
                        "--config=configs/tiny.py", "--workdir=/tmp/w", "--learning_rate=1",
                        "--dry_run"], capture_output=True, text=True, cwd=REPO, timeout=60)
  assert out.returncode == 2 and "unknown argument '--learning_rate=1'" in out.stderr
