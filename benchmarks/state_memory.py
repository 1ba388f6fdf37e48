"""Train-state memory per chip (params, Adam moments, EMA) of the paper configs on TPU slices.

Exact from the shardings the trainer gives each array on the slice's mesh (no compile:
seconds, where a full `compile_check` of these steps takes an hour on a loaded 2-core
host). It is the floor of the step's memory: activations and temporaries come on top
(`python -m armd_jax.compile_check` measures those).

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/state_memory.py \
      [--configs=owt_small,owt_medium] [--topologies=v5e:8x8,v5p:4x4x8] \
      [--out=benchmarks/results/state_memory]
Writes <out>.json and <out>.md.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top,wrong-import-position
from armd_jax import compile_check  # noqa: E402
from armd_jax.models import build_model  # noqa: E402
from armd_jax.train import partitioning  # noqa: E402
from armd_jax.train import state as state_lib  # noqa: E402
from armd_jax.train.defaults import config_from_file  # noqa: E402
from armd_jax.train.settings import model_config_from, settings_from  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GIB = 2.0 ** 30
MESHES = {  # name -> (mesh.shape, rule_table); None = the config's own
    "config": None,
    "data_parallel": ((-1, 1, 1), "data_parallel"),
    "fsdp": ((1, -1, 1), "fsdp"),
    "fsdp x tensor 4": ((1, -1, 4), "fsdp_tensor"),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="owt_small,owt_medium",
                      help="comma-separated config names under configs/")
  parser.add_argument("--topologies", default="v5e:8x8,v5p:4x4x8")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "state_memory"),
                      help="path without extension")
  args = parser.parse_args(argv)
  rows = []
  for topology in args.topologies.split(","):
    devices = compile_check.tpu_devices(topology)
    chip = compile_check.CHIPS[devices[0].device_kind]
    for name in args.configs.split(","):
      for mesh_name, mesh in MESHES.items():
        config = config_from_file(os.path.join(ROOT, "configs", f"{name}.py"))
        config.model.vocab_size = compile_check.default_vocab_size(config)
        if mesh:
          config.mesh.shape, config.mesh.rule_table = mesh
        settings = settings_from(config)
        model = build_model(model_config_from(config))
        grid = partitioning.make_mesh(settings.mesh, devices)
        rules = partitioning.rules_of(settings.mesh)
        _, abstract, _ = state_lib.train_state_layout(
            model, settings.optim, settings.train.num_steps, settings.train.seq_len,
            settings.train.seed, grid, rules)
        state = compile_check.state_bytes_per_chip(abstract)
        params = sum(int(x.size) for x in __import__("jax").tree.leaves(abstract.params))
        rows.append(dict(config=name, topology=topology, chips=len(devices), chip=chip.name,
                         mesh=dict(grid.shape), rule_table=settings.mesh.rule_table,
                         mesh_choice=mesh_name, params=params, state_bytes=state,
                         hbm_bytes=chip.hbm_bytes))
        print(f"{name} {topology} {mesh_name} {dict(grid.shape)}: {params / 1e6:.1f}M params, "
              f"state {state / GIB:.3f} GiB per chip of {chip.hbm_bytes / GIB:.2f}", flush=True)
  out = args.out
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  lines = ["| config | slice | mesh (rule table) | params | state GiB/chip | HBM GiB | state / HBM |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    axes = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
    lines.append(f"| {r['config']} | {r['topology']} ({r['chips']} x {r['chip']}) | {axes} "
                 f"({r['rule_table']}{', as shipped' if r['mesh_choice'] == 'config' else ''}) "
                 f"| {r['params'] / 1e6:.1f}M | {r['state_bytes'] / GIB:.3f} | "
                 f"{r['hbm_bytes'] / GIB:.2f} | {r['state_bytes'] / r['hbm_bytes']:.1%} |")
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
