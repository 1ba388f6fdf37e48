"""Train-step throughput: ARMD vs. a same-depth causal transformer (not a test).

Times the real jitted, donated `make_train_step` (forward, backward, AdamW, EMA off) on a
1-device mesh for, at each size:
  armd          ARMD as configured (lower half two-stream, progressive-permutation
                order with 16 shuffled tokens),
  ar            the 'ar' baseline (plain causal GPT from the same `Block`s),
  armd_l2r_1s   ARMD with left-to-right order and no two-stream layers (the stand-in
                for a causal transformer that shares every ARMD code path).
Trials interleave the models (`--steps` steps of each in turn) so that load from other
processes affects them alike. Step times are medians over trials; the ARMD/AR ratio is
the median over trials of the ratio *within* a trial (adjacent in time, so a load burst
mostly cancels). Per-trial times are kept in the results file. XLA's
own FLOP count of each compiled step (`cost_analysis`) is reported beside it: unlike
times on a shared CPU, it does not depend on load.
The physical expectation for ARMD/AR is ~1.5x (the two-stream lower half runs the
layer twice over half the depth), plus the prefix aggregation.

  python benchmarks/train_throughput.py                 # two CPU sizes, ~5 minutes
  python benchmarks/train_throughput.py --trials=2 --sizes=micro   # smoke
  python benchmarks/train_throughput.py --flops_only --sizes=d256_l8_n512   # FLOP ratio only
      (compiles, no timing: deterministic; writes train_throughput_flops.{json,md})

The layer-work floor of ARMD / AR is (1.5 L - 1) / L with L/2 two-stream layers (the
last two-stream layer runs only the query stream plus the content K/V).

Writes benchmarks/results/train_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from armd_jax.flops import cost_flops  # noqa: E402
from armd_jax.models import build_model  # noqa: E402
from armd_jax.train import partitioning  # noqa: E402
from armd_jax.train import state as state_lib  # noqa: E402
from armd_jax.train.defaults import base_config  # noqa: E402
from armd_jax.train.settings import MeshConfig, model_config_from, settings_from  # noqa: E402

SIZES = {  # name: (d_model, num_layers, num_heads, mlp_dim, seq_len, batch)
    "small": (128, 4, 4, 512, 128, 16),
    "medium": (256, 6, 4, 1024, 256, 8),
    "d256_l8_n512": (256, 8, 4, 1024, 512, 4),  # the FLOP-ratio configuration
    "micro": (32, 2, 2, 64, 16, 2),  # smoke runs of this script (seconds)
}
VARIANTS = {  # name: (model overrides, order overrides)
    "armd": ({}, {"kind": "progressive_permutation", "i_ar": 0, "i_perm": 1, "rho": 16}),
    "ar": ({"kind": "ar"}, {"kind": "left_to_right"}),
    "armd_l2r_1s": ({"num_two_stream_layers": 0}, {"kind": "left_to_right"}),
}
VOCAB = 259  # byte level


def make_config(size: str, variant: str):
  d, layers, heads, mlp, seq_len, batch = SIZES[size]
  c = base_config()
  c.model.update(dict(vocab_size=VOCAB, d_model=d, num_layers=layers, num_heads=heads,
                      mlp_dim=mlp, max_len=seq_len))
  model_overrides, order_overrides = VARIANTS[variant]
  c.model.update(model_overrides)
  c.order.update(order_overrides)
  c.train.seq_len, c.train.global_batch_size = seq_len, batch
  return c


def build_step(config):
  """(step_fn, state, batch) for a config on a 1-device mesh."""
  settings = settings_from(config)
  model = build_model(model_config_from(config))
  one_device = MeshConfig(shape=(1,) * len(partitioning.MESH_AXES))
  mesh = partitioning.make_mesh(one_device, jax.devices()[:1])
  rules = partitioning.DEFAULT_RULES
  tc = settings.train
  state, shardings = state_lib.create_train_state(model, settings.optim, 10_000, tc.seq_len,
                                                  0, mesh, rules)
  batch_shard = partitioning.batch_sharding(mesh, rules)
  step = state_lib.make_train_step(model, settings.order, settings.optim, 10_000, shardings,
                                   batch_shard)
  rng = np.random.default_rng(0)
  local = {"tokens": rng.integers(0, VOCAB, (tc.global_batch_size, tc.seq_len), np.int32),
           "mask": np.ones((tc.global_batch_size, tc.seq_len), np.int32)}
  return step, state, partitioning.global_batch(local, batch_shard)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="small,medium")
  parser.add_argument("--steps", type=int, default=1, help="steps per timed trial")
  parser.add_argument("--trials", type=int, default=15, help="interleaved trials per model")
  parser.add_argument("--flops_only", action="store_true",
                      help="compile and report XLA FLOP counts only (no timing)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = os.path.join(HERE, "results", "train_throughput" + (
        "_flops" if args.flops_only else ""))
  sizes = args.sizes.split(",")
  for s in sizes:
    if s not in SIZES:
      parser.error(f"--sizes: unknown size {s!r}; known: {sorted(SIZES)}")

  results, flops = [], {}
  for size in sizes:
    runs = {}
    for variant in VARIANTS:
      t0 = time.perf_counter()
      step, state, batch = build_step(make_config(size, variant))
      step = step.lower(state, batch).compile()
      flops[size, variant] = cost_flops(step.cost_analysis())
      if args.flops_only:
        print(f"[{size}] {variant}: {flops[size, variant] / 1e9:.2f} GFLOP "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        del step, state, batch
        continue
      state, metrics = step(state, batch)  # warm
      jax.block_until_ready(metrics)
      runs[variant] = [step, state, batch, []]
      print(f"[{size}] {variant}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.flops_only:
      continue
    for trial in range(args.trials):
      for variant, run in runs.items():
        step, state, batch, times = run
        t0 = time.perf_counter()
        for _ in range(args.steps):
          state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) / args.steps)
        run[1] = state
      print(f"[{size}] trial {trial + 1}/{args.trials}: " + ", ".join(
          f"{v} {r[3][-1] * 1e3:.0f} ms" for v, r in runs.items()), flush=True)
    _, _, _, _, seq_len, batch_size = SIZES[size]
    for variant, run in runs.items():
      ms = statistics.median(run[3]) * 1e3
      results.append({"size": size, "model": variant, "step_ms": ms,
                      "min_step_ms": min(run[3]) * 1e3,
                      "xla_gflop_per_step": flops[size, variant] / 1e9,
                      "tokens_per_s": batch_size * seq_len / (ms / 1e3),
                      "trial_ms": [t * 1e3 for t in run[3]],
                      "shape": dict(zip(("d_model", "num_layers", "num_heads", "mlp_dim",
                                         "seq_len", "batch"), SIZES[size]))})
    del runs

  if args.flops_only:
    return write_flops(args, sizes, flops)
  by = {(r["size"], r["model"]): r for r in results}

  def ratio(size, a, b):  # median over trials of the within-trial ratio
    return statistics.median(x / y for x, y in zip(by[size, a]["trial_ms"],
                                                   by[size, b]["trial_ms"]))

  summary = {size: {"armd_over_ar": ratio(size, "armd", "ar"),
                    "armd_over_ar_flops": flops[size, "armd"] / flops[size, "ar"],
                    "armd_over_l2r_1s": ratio(size, "armd", "armd_l2r_1s")} for size in sizes}
  meta = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": platform.python_version(),
          "steps_per_trial": args.steps, "trials": args.trials,
          "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "results": results, "ratios": summary}, f, indent=2)
  lines = [f"# Train-step throughput ({meta['backend']}, {meta['cpu_count']} cores, "
           f"{meta['date_utc']} UTC)", "",
           "| size | model | step (ms, median) | step (ms, min) | tokens/s (median) | "
           "XLA GFLOP/step |", "|---|---|---|---|---|---|"]
  lines += [f"| {r['size']} | {r['model']} | {r['step_ms']:.0f} | {r['min_step_ms']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['xla_gflop_per_step']:.1f} |" for r in results]
  lines += ["", "| size | ARMD / AR step time (median of per-trial ratios) | ARMD / AR FLOPs "
            "| ARMD / ARMD-l2r-no-two-stream step time |", "|---|---|---|---|"]
  lines += [f"| {s} | {v['armd_over_ar']:.2f}x | {v['armd_over_ar_flops']:.2f}x | "
            f"{v['armd_over_l2r_1s']:.2f}x |" for s, v in summary.items()]
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def write_flops(args, sizes, flops) -> None:
  """Writes the XLA FLOP counts and the ARMD / AR ratio beside its layer-work floor."""
  rows = []
  for size in sizes:
    layers = SIZES[size][1]
    rows.append({"size": size, "shape": dict(zip(("d_model", "num_layers", "num_heads",
                                                  "mlp_dim", "seq_len", "batch"), SIZES[size])),
                 "xla_gflop_per_step": {v: flops[size, v] / 1e9 for v in VARIANTS},
                 "armd_over_ar_flops": flops[size, "armd"] / flops[size, "ar"],
                 "layer_floor": (1.5 * layers - 1) / layers})
  meta = {"backend": jax.default_backend(), "jax": jax.__version__,
          "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
          "command": "python benchmarks/train_throughput.py --flops_only --sizes="
                     + ",".join(sizes)}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "results": rows}, f, indent=2)
  lines = [f"# Train-step XLA FLOPs ({meta['backend']}, {meta['date_utc']} UTC)", "",
           f"`{meta['command']}`", "",
           "| size (d, L, N) | ARMD GFLOP | AR GFLOP | ARMD / AR | floor (1.5L-1)/L |",
           "|---|---|---|---|---|"]
  lines += [f"| {r['size']} ({r['shape']['d_model']}, {r['shape']['num_layers']}, "
            f"{r['shape']['seq_len']}) | {r['xla_gflop_per_step']['armd']:.1f} | "
            f"{r['xla_gflop_per_step']['ar']:.1f} | {r['armd_over_ar_flops']:.3f}x | "
            f"{r['layer_floor']:.3f}x |" for r in rows]
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  main()
