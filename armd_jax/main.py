"""The main training command.

  python -m armd_jax.main --config=configs/quickstart.py --workdir=DIR [--config.x=y ...]

Parses the config file (ml-collections `config_flags`; unknown `--config.*` overrides
fail with a message naming them), logs the devices, and calls
`armd_jax.train.train_and_evaluate(config, workdir)`.

Several processes (hosts): start the same command on each with `--jax_distributed`
(what `launch/train_multihost.sh` does). `jax.distributed.initialize` then finds the
coordinator from the cluster (TPU VM metadata, SLURM, ...) or from the environment:
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID (set all three
for a plain cluster or several processes on one machine). On CPU, collectives across
processes use gloo.

`--force_unlock` removes `<workdir>/train.lock` first (printing whose it was), for a person
who knows its trainer is gone; see `armd_jax.train.lock`.

A SIGTERM (preemption, `launch/tpu_vm.sh --stop`, SLURM) saves a checkpoint at a step
every process agrees on and exits with status 143; the same command resumes from it
(`armd_jax.train.preemption`).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, cache).")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host).")
_FORCE_UNLOCK = flags.DEFINE_bool(
    "force_unlock", False, "Remove <workdir>/train.lock before starting, whoever holds it "
    "(only when you know its trainer is gone; a lock also goes stale by itself "
    "config.checkpoint.lock_timeout_s after its last heartbeat).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  from armd_jax import platforms, train  # pylint: disable=g-import-not-at-top
  from armd_jax.train import preemption  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a host without a TPU
  if _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**distributed_args(os.environ))
  print(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s); "
        f"process {jax.process_index()} of {jax.process_count()}.", flush=True)
  try:
    if _FORCE_UNLOCK.value and jax.process_index() == 0:  # only process 0 touches the lock
      from armd_jax.train import lock  # pylint: disable=g-import-not-at-top
      lock.force_unlock(_WORKDIR.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except train.Preempted as e:  # a checkpoint was saved; the same command resumes
    print(e, file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_STATUS)
  except (ValueError, FileNotFoundError, train.NonFiniteError, train.WorkdirBusyError,
          train.ResumeError) as e:
    if flags.FLAGS["verbosity"].present:  # --verbosity=... asks for the full traceback
      raise
    sys.exit(f"error: {e}\n(add --verbosity=0 for the traceback)")


def distributed_args(environ) -> dict:
  """`jax.distributed.initialize` arguments from JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; empty where unset (cluster auto-detection).

  jax reads the coordinator address from the environment itself but not the number of
  processes or the process id, so without this a plain multi-process launch fails with
  "Number of processes must be defined".
  """
  args = {}
  for name, key in (("JAX_COORDINATOR_ADDRESS", "coordinator_address"),
                    ("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    value = environ.get(name, "").strip()
    if not value:
      continue
    if key != "coordinator_address":
      try:
        value = int(value)
      except ValueError:
        sys.exit(f"error: {name}={value!r} must be an integer.")
    args[key] = value
  if ("num_processes" in args) != ("process_id" in args):
    sys.exit("error: set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, to let "
             "jax.distributed detect the cluster).")
  return args


def parse_flags(argv):
  """absl flag parsing that names an unknown `--config.<field>` override."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull for help.")
  except (AttributeError, KeyError) as e:  # ml-collections: override of a missing field
    sys.exit(f"FATAL Flags parsing error: {unknown_override_message(argv) or e}")


def unknown_override_message(argv) -> str:
  """Names the `--config.a.b=...` overrides whose field the config file does not have."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    return ""
  from armd_jax.train.defaults import config_from_file  # pylint: disable=g-import-not-at-top
  config = config_from_file(path)
  bad = []
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    node = config
    for name in arg[len("--config."):].split("=", 1)[0].split("."):
      if not hasattr(node, "keys") or name not in node:
        bad.append(arg.split("=", 1)[0])
        break
      node = node[name]
  return (f"unknown config field(s) {bad} in {path}; check the spelling against the "
          "config file.") if bad else ""


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
