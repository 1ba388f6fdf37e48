"""The launch scripts' --dry_run prints the exact commands (nothing runs, no cloud needed)."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ("python -m armd_jax.main --config=configs/owt_small.py --workdir=gs://bucket/run "
         "--jax_distributed --config.train.seed=3")


def dry_run(script, *args, env=None):
  """The '+ ' command lines a launch script prints with --dry_run."""
  out = subprocess.run(["bash", os.path.join(REPO, "launch", script), *args, "--dry_run"],
                       capture_output=True, text=True, check=True, cwd=REPO,
                       env={**os.environ, **(env or {})}, timeout=60)
  return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


def test_tpu_vm_creates_installs_runs_on_all_workers_and_deletes():
  lines = dry_run("tpu_vm.sh", "--zone=us-west4-a", "--name=armd-test",
                  "--config=configs/owt_small.py", "--workdir=gs://bucket/run",
                  "--config.train.seed=3")
  assert lines == [
      "gcloud compute tpus tpu-vm create armd-test --zone=us-west4-a "
      "--accelerator-type=v5litepod-64 --version=v2-alpha-tpuv5-lite",
      "git archive --format=tar.gz --output=/tmp/armd-test-src.tar.gz HEAD",
      "gcloud compute tpus tpu-vm scp /tmp/armd-test-src.tar.gz armd-test:armd-src.tar.gz "
      "--zone=us-west4-a --worker=all",
      "gcloud compute tpus tpu-vm ssh armd-test --zone=us-west4-a --worker=all '--command="
      "mkdir -p ~/armd-jax && tar -xzf ~/armd-src.tar.gz -C ~/armd-jax && cd ~/armd-jax && "
      "pip install -q -e \".[tpu,hf]\"'",
      "gcloud compute tpus tpu-vm ssh armd-test --zone=us-west4-a --worker=all '--command="
      f"cd ~/armd-jax && {TRAIN} 2>&1 | tee ~/train.log'",
      "gcloud compute tpus tpu-vm delete armd-test --zone=us-west4-a --quiet",
  ]


def test_tpu_vm_v5p_runtime_and_keep():
  lines = dry_run("tpu_vm.sh", "--zone=z", "--name=n", "--accelerator_type=v5p-256", "--keep",
                  "--project=p", "--config=configs/owt_medium.py", "--workdir=gs://b/w")
  assert lines[0] == ("gcloud compute tpus tpu-vm create n --zone=z --project=p "
                      "--accelerator-type=v5p-256 --version=v2-alpha-tpuv5")
  assert not any("delete" in line for line in lines)


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
