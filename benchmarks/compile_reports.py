"""Compile reports of the paper configs on TPU pod slices (`armd_jax.compile_check`).

Runs `python -m armd_jax.compile_check` once per case, one at a time (each compile of
a GPT-2-size step for 64-128 chips takes minutes and GiBs of host memory), each niced
and under a timeout, writing its JSON report as soon as it finishes; cases whose report
exists are skipped, so a killed run resumes. Then gathers every report into
benchmarks/results/compile_reports.json and a markdown table (compile_reports.md).

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/compile_reports.py [--only=NAME_SUBSTRING]
  python benchmarks/compile_reports.py --gather    # tables only, from the reports present
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from armd_jax import compile_check  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
REPORTS = os.path.join(RESULTS, "compile")
TOPOLOGIES = {"v5e-64": "v5e:8x8", "v5p-128": "v5p:4x4x8"}
GIB = 2.0 ** 30
PAPER_STEPS = 400_000  # owt_small / owt_medium train.num_steps


LAYERS = {"owt_small": 12, "owt_medium": 24}  # num_layers of each config (half two-stream)
SHALLOW = (2, 4)  # the shallow copies compiled for the extrapolation in depth


# Variants beside each config's own mesh (the suffix of a case name, and its overrides).
VARIANTS = {
    "": [],  # the config's mesh and rule table as shipped
    "_dp": ["--config.mesh.shape=(-1,1,1)", "--config.mesh.rule_table=data_parallel"],
}


def cases():
  """(name, config file, topology, overrides) for every report in docs/scaling.md.

  Each config is compiled as shipped (name without a layer suffix) and as shallow copies
  with 2 and 4 layers (suffix _L2, _L4; half two-stream as in the config), from which
  `gather` extrapolates linearly in depth: every per-chip figure (memory, FLOPs, bytes)
  is a + b * layers. On the shared 2-core host a full-depth compile takes an hour or
  more, the shallow ones less; full-depth compiles that finished check the extrapolation.
  Listed in the order they matter: the configs' own meshes with XLA attention first.
  """
  out = []
  for variant, attention in (("", "xla"), ("", "pallas"), ("_dp", "xla")):
    for layers in SHALLOW + (None,):
      for config in ("owt_medium", "owt_small"):
        for slice_name, topology in TOPOLOGIES.items():
          overrides = [f"--config.model.attention={attention}", *VARIANTS[variant]]
          name = f"{config}_{slice_name}_{attention}{variant}"
          if layers:
            overrides += [f"--config.model.num_layers={layers}",
                          f"--config.model.num_two_stream_layers={layers // 2}"]
            name += f"_L{layers}"
          out.append((name, f"configs/{config}.py", topology, overrides))
  return out


def extra_cases():
  """Remat where the config's own mesh does not fit: `owt_medium` on v5e-64 (with the
  Pallas kernel XLA ran out of HBM at full depth; the XLA-attention extrapolation needs
  31.9 GiB per chip of 14.9): `model.remat=full` at full depth with the kernel, and 2-
  and 4-layer copies extrapolated in depth like the others."""
  out = [("owt_medium_v5e-64_pallas_remat_full", "configs/owt_medium.py", TOPOLOGIES["v5e-64"],
          ["--config.model.attention=pallas", "--config.model.remat=full"]),  # full depth
         # ... which still needs 15.88 GiB: split the batch 64 ways (8 sequences per chip)
         ("owt_medium_v5e-64_pallas_fsdp_remat_full", "configs/owt_medium.py",
          TOPOLOGIES["v5e-64"], ["--config.model.attention=pallas", "--config.model.remat=full",
                                 "--config.mesh.shape=(1,-1,1)",
                                 "--config.mesh.rule_table=fsdp"])]
  for attention in ("xla", "pallas"):
    for layers in SHALLOW:
      out.append((f"owt_medium_v5e-64_{attention}_remat_full_L{layers}", "configs/owt_medium.py",
                  TOPOLOGIES["v5e-64"],
                  [f"--config.model.attention={attention}", "--config.model.remat=full",
                   f"--config.model.num_layers={layers}",
                   f"--config.model.num_two_stream_layers={layers // 2}"]))
  for layers in SHALLOW:  # the fsdp + remat case above, extrapolated like the others
    out.append((f"owt_medium_v5e-64_pallas_fsdp_remat_full_L{layers}", "configs/owt_medium.py",
                TOPOLOGIES["v5e-64"],
                ["--config.model.attention=pallas", "--config.model.remat=full",
                 "--config.mesh.shape=(1,-1,1)", "--config.mesh.rule_table=fsdp",
                 f"--config.model.num_layers={layers}",
                 f"--config.model.num_two_stream_layers={layers // 2}"]))
  return out


FIELDS = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes",
          "flops", "bytes_accessed", "total_bytes")


def extrapolate(shallow: dict, deeper: dict, layers: int) -> dict:
  """A report at `layers` from reports at 2 and 4 layers, each figure linear in depth."""
  out = json.loads(json.dumps(deeper))
  l1, l2 = SHALLOW
  for part in ("train_step", "decode"):
    if part not in deeper or part not in shallow:
      continue
    for field in FIELDS:
      a, b = shallow[part][field], deeper[part][field]
      out[part][field] = b + (b - a) * (layers - l2) / (l2 - l1)
    out[part]["seconds"] = None
  out["params"] = deeper["params"] + (deeper["params"] - shallow["params"]) * (
      layers - l2) / (l2 - l1)
  chip = out["chip"]
  step = out["train_step"]
  compute_s, memory_s = step["flops"] / chip["peak_flops"], (
      step["bytes_accessed"] / chip["hbm_bandwidth"])
  step_s = max(compute_s, memory_s)
  step["roofline"] = dict(compute_s=compute_s, memory_s=memory_s, step_s=step_s,
                          bound="compute" if compute_s >= memory_s else "memory",
                          tokens_per_s_per_chip=out["global_batch"] * out["seq_len"] / step_s
                          / out["chips"], mfu_at_roofline=compute_s / step_s)
  out["fits"] = all(out[p]["total_bytes"] <= chip["hbm_bytes"]
                    for p in ("train_step", "decode") if p in out)
  shrinking = [f"{p}.{f}" for p in ("train_step", "decode") if p in deeper and p in shallow
               for f in ("temp_bytes", "total_bytes") if deeper[p][f] < shallow[p][f]]
  if shrinking:  # XLA scheduled the copies differently: memory is not linear in depth
    out["fits"] = None
    out["not_linear"] = (f"{', '.join(shrinking)} smaller at {l2} layers than at {l1}: "
                         "memory not extrapolated (compile the full depth)")
  notes = sorted({r["note"] for r in (shallow, deeper) if r.get("note")})
  out.pop("note", None)
  if notes:  # an older copy in the pair: say what it did not count
    out["note"] = "; ".join(notes)
  out["extrapolated_from"] = [shallow["name"], deeper["name"]]
  out["command"] = None
  return out


def case_flags(name: str, config: str, topology: str, overrides) -> list:
  """compile_check's flags for one case, its report path relative to the repository root
  (the commands run there)."""
  out = os.path.relpath(os.path.join(REPORTS, f"{name}.json"), ROOT)
  return [f"--config={config}", f"--topology={topology}", f"--out={out}", *overrides]


def run_case(name: str, config: str, topology: str, overrides, timeout_s: int) -> None:
  """Runs one compile_check (niced, with a timeout) and writes REPORTS/name.json (+ .log)."""
  os.makedirs(REPORTS, exist_ok=True)
  out = os.path.join(REPORTS, f"{name}.json")
  flags = case_flags(name, config, topology, overrides)
  command = compile_check.command_line(flags)  # what the report records: runnable as is
  cmd = ["nice", "-n", "10", "timeout", str(timeout_s), sys.executable, "-m",
         "armd_jax.compile_check", *flags]
  print(f"[{time.strftime('%H:%M:%S')}] {name}: {command}", flush=True)
  start = time.time()
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  with open(os.path.join(REPORTS, f"{name}.log"), "w", encoding="utf-8") as log:
    rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
  seconds = time.time() - start
  if os.path.exists(out):
    with open(out, encoding="utf-8") as f:
      report = json.load(f)
    report.update(name=name, command=command, exit_status=rc, wall_s=seconds)
    with open(out, "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
  else:  # compile failed or timed out: keep the reason
    with open(out, "w", encoding="utf-8") as f:
      json.dump(dict(name=name, exit_status=rc, wall_s=seconds, failed=True, command=command,
                     log_tail=_tail(os.path.join(REPORTS, f"{name}.log"))), f, indent=1)
  print(f"  exit {rc} after {seconds:.0f} s", flush=True)


def _tail(path: str, lines: int = 15) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def gather() -> str:
  """Writes compile_reports.json and .md from every report present; returns the table."""
  reports = []
  for file in sorted(os.listdir(REPORTS)) if os.path.isdir(REPORTS) else []:
    if file.endswith(".json"):
      with open(os.path.join(REPORTS, file), encoding="utf-8") as f:
        report = json.load(f)
      report.setdefault("name", file[:-len(".json")])
      reports.append(report)
  by_name = {r["name"]: r for r in reports if not r.get("failed")}
  for name in list(by_name):
    if name.endswith(f"_L{SHALLOW[0]}"):
      base = name[:-len(f"_L{SHALLOW[0]}")]
      deeper = by_name.get(f"{base}_L{SHALLOW[1]}")
      if deeper is not None and not _out_of_memory(deeper) and not _out_of_memory(
          by_name[name]):
        layers = LAYERS[base.split("_v5")[0]]
        report = extrapolate(by_name[name], deeper, layers)
        report["name"] = f"{base} (extrapolated to L={layers})"
        reports.append(report)
  with open(os.path.join(RESULTS, "compile_reports.json"), "w", encoding="utf-8") as f:
    json.dump(reports, f, indent=1)
  lines = ["| case | mesh | remat | train step GiB/chip (args + temp + out - alias + code) | "
           "HBM GiB | fits | TFLOP/chip/step | roofline step ms | tokens/s/chip (roofline) | "
           "decode GiB/chip | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in reports:
    oom = _out_of_memory(r)
    if oom:
      lines.append(f"| {_label(r)} | {_mesh(r) if 'mesh' in r else ''} | "
                   f"{r.get('remat', 'none')} | does not fit: XLA ran out of HBM compiling it "
                   f"({oom}) | | NO | | | | | {r.get('wall_s', 0):.0f} |")
      continue
    if r.get("failed"):
      lines.append(f"| {_label(r)} | | | compile failed (exit {r['exit_status']}) | | | | | | | "
                   f"{r['wall_s']:.0f} |")
      continue
    t = r["train_step"]
    rl = t.get("roofline", {})
    dec = r.get("decode")
    if r.get("not_linear"):
      lines.append(
          f"| {_label(r)} | {_mesh(r)} | {r.get('remat', 'none')} | not extrapolated: "
          f"{r['not_linear']} | {r['chip']['hbm_bytes'] / GIB:.2f} | unknown | "
          f"{t['flops'] / 1e12:.2f} | {rl.get('step_s', 0) * 1e3:.0f} | "
          f"{rl.get('tokens_per_s_per_chip', 0):.0f} | - | - + - |")
      continue
    lines.append(
        f"| {_label(r)} | {_mesh(r)} | {r.get('remat', 'none')} | {t['total_bytes'] / GIB:.2f} "
        f"({t['argument_bytes'] / GIB:.2f} + {t['temp_bytes'] / GIB:.2f} + "
        f"{t['output_bytes'] / GIB:.2f} - {t['alias_bytes'] / GIB:.2f} + "
        f"{t['code_bytes'] / GIB:.3f}) | {r['chip']['hbm_bytes'] / GIB:.2f} | "
        f"{'yes' if r['fits'] else 'NO'} | {t['flops'] / 1e12:.2f} | "
        f"{rl.get('step_s', 0) * 1e3:.0f} | {rl.get('tokens_per_s_per_chip', 0):.0f} | "
        f"{dec['total_bytes'] / GIB if dec else float('nan'):.2f} | "
        f"{_secs(t)} + {_secs(dec)} |")
  lines += ["", "Roofline estimates of the paper's 400K steps (upper bounds on speed: "
            "communication between chips ignored):", "",
            "| case | fits | roofline step s | days for 400K steps | chip-hours |",
            "|---|---|---|---|---|"]
  for r in reports:
    rl = r.get("train_step", {}).get("roofline")
    if not rl or r["name"].endswith(tuple(f"_L{n}" for n in SHALLOW)):  # shallow copies: no
      continue
    hours = PAPER_STEPS * rl["step_s"] / 3600
    fits = "unknown" if r["fits"] is None else "yes" if r["fits"] else "NO"
    lines.append(f"| {_label(r)} | {fits} | {rl['step_s']:.3f} | "
                 f"{hours / 24:.1f} | {hours * r['chips']:.0f} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(RESULTS, "compile_reports.md"), "w", encoding="utf-8") as f:
    f.write(table)
  return table


def _out_of_memory(report) -> str:
  """XLA's out-of-HBM verdict on a report's train step ('' if none): from compile_check's
  report, or (parsed the same way) from the log of a run that predates that report field."""
  train = report.get("train_step")
  oom = train.get("out_of_memory") if isinstance(train, dict) else None
  if oom is None and report.get("failed") and "RESOURCE_EXHAUSTED" in report.get("log_tail", ""):
    oom = compile_check.out_of_memory_report(report["log_tail"], report.get("wall_s", 0.0))
  if not oom:
    return ""
  return (f"temporaries {oom['temp_gib']}G > {oom['available_gib']}G available"
          if oom.get("temp_gib") else oom["message"])


def _label(report) -> str:
  """The case name, with the report's `note` (what an older compile did not count)."""
  return report["name"] + (f" ({report['note']})" if report.get("note") else "")


def _mesh(report) -> str:
  axes = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
  return f"{axes} ({report.get('rule_table') or 'data/model rules'})"


def _secs(part) -> str:
  return f"{part['seconds']:.0f}" if part and part.get("seconds") is not None else "-"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="run the cases whose name contains this")
  parser.add_argument("--exact", action="store_true", help="--only names one case exactly")
  parser.add_argument("--gather", action="store_true", help="only rebuild the tables")
  parser.add_argument("--timeout_s", type=int, default=5400, help="per compile_check run")
  parser.add_argument("--redo", action="store_true", help="rerun cases that have a report")
  args = parser.parse_args()
  if not args.gather:
    for name, config, topology, overrides in cases() + extra_cases():
      if (args.only != name) if args.exact else (args.only not in name):
        continue
      if os.path.exists(os.path.join(REPORTS, f"{name}.json")) and not args.redo:
        print(f"{name}: report exists, skipped", flush=True)
        continue
      lock = os.path.join(REPORTS, f"{name}.lock")
      try:  # several drivers may share the list: each case is taken once
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
      except FileExistsError:
        print(f"{name}: running elsewhere ({lock}), skipped", flush=True)
        continue
      try:
        run_case(name, config, topology, overrides, args.timeout_s)
      finally:
        os.remove(lock)
      gather()
  print(gather())


if __name__ == "__main__":
  main()
