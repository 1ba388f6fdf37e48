"""Writing a CPU benchmark's JSON results file: the machine it ran on, the command, records.

Shared by the CPU timing benchmarks (decode_speed)
so that every results file states the same facts about its run: platform, core count,
JAX version and backend, the load average at the end (the 2-core development machines
are shared; a loaded machine is why a figure may be slow) and the XLA flags.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from typing import Any, Dict

import jax


def machine() -> Dict[str, Any]:
  """Facts about the machine and JAX setup a timing depends on."""
  return {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "devices": str(jax.devices()),
          "load_average": os.getloadavg(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def command(args) -> str:
  """The command line that reproduces a run: script path and every argparse option
  (flags as `--name` when set, left out when not; values shell-quoted)."""
  script = os.path.relpath(sys.argv[0], os.path.join(os.path.dirname(__file__), ".."))
  options = [f"--{k}" if v is True else f"--{k}={shlex.quote(str(v))}"
             for k, v in vars(args).items() if v is not False]
  return " ".join(["python", script] + options)


def write(path: str, args, **payload: Any) -> None:
  """Writes {machine, command, **payload} as JSON to `path` (folders made as needed)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"machine": machine(), "command": command(args), **payload}, f, indent=1)
  print(f"wrote {path}", flush=True)
