"""The main training command.

  python -m armd_jax.main --config=configs/quickstart.py --workdir=DIR [--config.x=y ...]

Parses the config file (ml-collections `config_flags`; unknown `--config.*` overrides
fail with a message naming them), logs the devices, and calls
`armd_jax.train.train_and_evaluate(config, workdir)`. On several hosts, set
`--jax_distributed` (or call `jax.distributed.initialize()` via the launch scripts).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, cache).")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False,
                                 "Call jax.distributed.initialize() first (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top

  from armd_jax import train  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  print(f"JAX {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s); "
        f"process {jax.process_index()} of {jax.process_count()}.", flush=True)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.NonFiniteError, train.WorkdirBusyError) as e:
    if flags.FLAGS["verbosity"].present:  # --verbosity=... asks for the full traceback
      raise
    sys.exit(f"error: {e}\n(add --verbosity=0 for the traceback)")


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
