"""Sweeps, the ml-collections way: a config file's `sweep()` expanded into one run per point.

  python -m armd_jax.sweep --config=configs/shakespeare.py --root=DIR \\
      [--launcher=local|tpu_vm|xpk|slurm] [--launcher_args='--zone=... ...'] [--dry_run] \\
      [--config.x=y ...]

A config file that can be swept defines, next to `get_config()`, a `sweep()` returning a
list of override dicts, dotted field names to values, e.g.

  def sweep():
    return [{"order.rho": rho, "model.query_init": init}
            for rho in (4, 8) for init in ("prefix", "prefix_plus_position")]

Each point is `get_config()` (with any `--config.*` flags given here) plus its overrides,
trained in its own workdir `ROOT/<name>`, the name made from the overrides
(`order.rho=4,model.query_init=prefix`), so a point's directory says what it is.

Launchers:
- `local`: trains the points in turn in this process (`train_and_evaluate`). A point whose
  workdir holds `final_metrics.json` is finished and skipped; an unfinished one resumes
  from its latest checkpoint. So a killed sweep is resumed by running the same command.
  Afterwards ROOT/summary.md (a markdown table of every point's final metrics),
  ROOT/summary.json and ROOT/val_curves.png (held-out NLL against step; needs
  matplotlib) are written.
- `tpu_vm`, `xpk`, `slurm`: run `launch/tpu_vm.sh`, `launch/xpk.sh` or
  `launch/slurm_gpu.sbatch` once per point (in turn; `--launcher_args` are passed to each,
  e.g. the zone or cluster), with `--workdir=ROOT/<name>` and the point's overrides as
  `--config.*` flags. ROOT must then be storage the workers share (e.g. gs://...); when
  it is also readable here, `--summarize` rebuilds the summary from the workdirs.
`--dry_run` prints every command and trains nothing. ROOT may be a local folder or a URL
(`armd_jax.storage`); the summary files are written next to the workdirs either way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Mapping, Sequence

from armd_jax import storage

LAUNCHERS = ("local", "tpu_vm", "xpk", "slurm")
SCRIPTS = {"tpu_vm": "launch/tpu_vm.sh", "xpk": "launch/xpk.sh",
           "slurm": "launch/slurm_gpu.sbatch"}
DONE_FILE = "final_metrics.json"
SUMMARY_METRICS = ("eval/nll", "eval/perplexity", "eval/accuracy", "train/loss")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_sweep(config_file: str) -> List[Dict[str, Any]]:
  """The override dicts of `config_file`'s `sweep()`, checked (non-empty, unique)."""
  spec = importlib.util.spec_from_file_location("_armd_sweep_config", config_file)
  if spec is None:
    raise FileNotFoundError(f"no config file at {config_file!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{config_file} defines no sweep(); add one returning a list of "
                     "override dicts (see armd_jax/sweep.py).")
  points = [dict(p) for p in module.sweep()]
  if not points:
    raise ValueError(f"{config_file}: sweep() returned no points.")
  names = [point_name(p) for p in points]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"{config_file}: sweep() repeats the point(s) {repeated}.")
  return points


def format_value(value: Any) -> str:
  """A value as a `--config.x=` flag takes it (ml-collections parses tuples from '(a,b)')."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def point_name(overrides: Mapping[str, Any]) -> str:
  """The workdir name of a point: 'order.rho=4,model.query_init=prefix' (safe characters)."""
  text = ",".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "base"
  return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)


def override_flags(overrides: Mapping[str, Any]) -> List[str]:
  """The point's overrides as `--config.<field>=<value>` flags."""
  return [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]


def apply_overrides(config, overrides: Mapping[str, Any]):
  """A copy of ConfigDict `config` with the dotted `overrides` set (unknown fields: ValueError)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *path, field = key.split(".")
    node = config
    for part in path:
      if part not in node or not hasattr(node[part], "keys"):
        raise ValueError(f"sweep override {key!r}: config has no section {part!r}.")
      node = node[part]
    if field not in node:
      raise ValueError(f"sweep override {key!r}: config has no field {field!r}.")
    node[field] = tuple(value) if isinstance(value, list) else value
  return config


def point_commands(launcher: str, config_file: str, root: str, points, cli_overrides,
                   launcher_args: Sequence[str], dry_run: bool) -> List[List[str]]:
  """The command that trains each point (local: the equivalent `armd_jax.main` call)."""
  commands = []
  for i, point in enumerate(points):
    workdir = point_workdir(root, point)
    flags = [f"--config={config_file}", f"--workdir={workdir}", *cli_overrides,
             *override_flags(point)]
    if launcher == "local":
      commands.append([sys.executable, "-m", "armd_jax.main", *flags])
    else:
      extra = list(launcher_args)
      if launcher == "tpu_vm" and not any(a.startswith("--name=") for a in extra):
        extra.append(f"--name=armd-sweep-{i}")
      if launcher == "xpk" and not any(a.startswith("--workload=") for a in extra):
        extra.append(f"--workload=armd-sweep-{i}")
      commands.append(["bash", os.path.join(REPO, SCRIPTS[launcher]), *extra, *flags,
                       *(["--dry_run"] if dry_run else [])])
  return commands


def point_workdir(root: str, point: Mapping[str, Any]) -> str:
  """ROOT/<point name> as text (for command lines: no storage client is needed here)."""
  name = point_name(point)
  if storage.is_local(root):
    return os.path.join(root, name)
  return f"{root.rstrip('/')}/{name}"


def run_local(config, root: str, points) -> None:
  """Trains each unfinished point in turn in this process; writes its final metrics."""
  from armd_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  for i, point in enumerate(points):
    name = point_name(point)
    workdir = storage.path(root) / name
    if (workdir / DONE_FILE).exists():
      print(f"[sweep {i + 1}/{len(points)}] {name}: finished, skipped", flush=True)
      continue
    print(f"[sweep {i + 1}/{len(points)}] {name}: training in {workdir}", flush=True)
    final = train_and_evaluate(apply_overrides(config, point), os.fspath(workdir))
    # Atomic (a renamed local file, or one object): a point is done or not.
    storage.write_atomic(workdir / DONE_FILE,
                         json.dumps({"overrides": point, "metrics": final}, indent=1))


def summarize(root: str, points) -> str:
  """Writes ROOT/summary.md, summary.json and val_curves.png; returns the markdown table."""
  from armd_jax.train.observe import read_metrics  # pylint: disable=g-import-not-at-top
  keys = list(dict.fromkeys(k for p in points for k in p))
  rows, curves = [], {}
  for point in points:
    name = point_name(point)
    workdir = storage.path(root) / name
    done = workdir / DONE_FILE
    metrics = {}
    if done.exists():
      metrics = json.loads(done.read_text(encoding="utf-8"))["metrics"]
    records = read_metrics(workdir)
    curves[name] = [(r["step"], r["eval/nll"]) for r in records if "eval/nll" in r]
    steps = [r["step"] for r in records]
    rows.append(dict(name=name, overrides=point, finished=bool(metrics), metrics=metrics,
                     last_step=max(steps) if steps else 0))
  lines = ["| " + " | ".join(keys + ["steps"] + list(SUMMARY_METRICS)) + " |",
           "|" + "---|" * (len(keys) + 1 + len(SUMMARY_METRICS))]
  for row in rows:
    values = [format_value(row["overrides"].get(k, "")) for k in keys]
    values.append(str(row["last_step"]) + ("" if row["finished"] else " (unfinished)"))
    values += [f"{row['metrics'][m]:.4f}" if m in row["metrics"] else "-"
               for m in SUMMARY_METRICS]
    lines.append("| " + " | ".join(values) + " |")
  table = "\n".join(lines) + "\n"
  directory = storage.path(root)
  storage.write_atomic(directory / "summary.md", table)
  storage.write_atomic(directory / "summary.json", json.dumps(rows, indent=1))
  plot_curves(curves, directory / "val_curves.png")
  return table


def plot_curves(curves: Mapping[str, Sequence[Any]], path: storage.PathLike) -> bool:
  """Held-out NLL against step, one line per point, saved to `path` (a local file or URL);
  False (and a note) without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: no val_curves.png (pip install -e .[plot]).")
    return False
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, points in curves.items():
    if points:
      steps, nll = zip(*sorted(points))
      ax.plot(steps, nll, marker="o", markersize=3, label=name)
  ax.set_xlabel("step")
  ax.set_ylabel("held-out NLL (nats/token)")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  with tempfile.TemporaryDirectory() as tmp:  # matplotlib writes local files
    local = os.path.join(tmp, "val_curves.png")
    fig.savefig(local, dpi=110)
    storage.upload(local, path)
  plt.close(fig)
  return True


def main(argv) -> None:
  """Entry point of `python -m armd_jax.sweep`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"sweep: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  config_file = f["config"].config_filename
  points = load_sweep(config_file)
  cli_overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
  print(f"sweep of {config_file}: {len(points)} points, launcher {f.launcher}, root {f.root}",
        flush=True)
  if f.summarize:
    print(summarize(f.root, points))
    return
  commands = point_commands(f.launcher, config_file, f.root, points, cli_overrides,
                            shlex.split(f.launcher_args), f.dry_run)
  if f.launcher == "local":
    if f.dry_run:
      for command in commands:
        print("+ " + shlex.join(["python", *command[1:]]))
      return
    run_local(f.config, f.root, points)
    print(summarize(f.root, points))
    return
  for command in commands:
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file that defines sweep().")
  flags.DEFINE_string("root", None, "Directory or URL (gs://...) holding one workdir per point.")
  flags.DEFINE_enum("launcher", "local", LAUNCHERS, "Where the points run.")
  flags.DEFINE_string("launcher_args", "", "Arguments for the launch script (quoted).")
  flags.DEFINE_bool("dry_run", False, "Print the commands; train nothing.")
  flags.DEFINE_bool("summarize", False, "Only rebuild the summary from the workdirs.")
  flags.mark_flags_as_required(["config", "root"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
