"""The value of adapting ARMD from a pretrained AR model, at tiny size on CPU.

Three runs on tiny Shakespeare (configs/shakespeare.py shrunk: width --d_model, --layers
layers, N = --seq_len), same data, seeds and batch:
  ar       an AR model trained for K = --ar_steps steps;
  adapted  ARMD initialised from it (`convert.adapt_ar_params` through
           config.checkpoint.init_from) and fine-tuned for M = --adapt_steps steps
           (configs/adapt_from_ar.py's order schedule, scaled to M);
  scratch  ARMD from scratch for K + M steps (configs/shakespeare.py's schedule, scaled).
Each is scored on the held-out split (the final parameters: these runs keep no EMA),
the first --eval_batches batches: exact left-to-right perplexity, and for the ARMDs the
exact strided S = 4 perplexity (per byte). --adapt_lr varies the adaptation's peak
learning rate (its run gets its own folder; the finished AR and scratch runs are reused).

  python benchmarks/adapt_from_ar.py --root=/tmp/adapt_from_ar \\
    --out=benchmarks/results/adapt_from_ar.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_file  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(args, kind: str, steps: int, init_from: str = ""):
  """configs/shakespeare.py at the benchmark's size as `kind`, for `steps` steps."""
  from armd_jax.train.defaults import config_from_file  # pylint: disable=g-import-not-at-top
  c = config_from_file(os.path.join(REPO, "configs", "shakespeare.py"))
  c.model.kind = kind
  c.model.d_model, c.model.num_layers = args.d_model, args.layers
  c.model.num_heads, c.model.mlp_dim = 4, 4 * args.d_model
  c.model.max_len = c.train.seq_len = args.seq_len
  c.model.d_pe = 32
  c.train.global_batch_size = args.batch
  c.train.num_steps = steps
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.train.log_every = 100
  c.eval.num_batches = 4
  c.sample.num_samples = 0
  c.checkpoint.init_from = init_from
  if init_from:  # configs/adapt_from_ar.py's schedule, scaled to `steps`
    c.order.i_ar, c.order.i_perm = steps // 6, (2 * steps) // 3
    c.optim.learning_rate, c.optim.warmup_steps = args.adapt_lr, max(steps // 12, 1)
  else:  # configs/shakespeare.py's schedule (300 / 1200 of 1500 steps), scaled
    c.order.i_ar, c.order.i_perm = steps // 5, (4 * steps) // 5
    c.optim.warmup_steps = max(steps // 15, 1)
  c.order.rho = 8
  return c


def score(workdir: str, kind: str, max_batches: int):
  """Held-out exact perplexities of a workdir (left-to-right; strided S = 4 for ARMD)."""
  from armd_jax import evaluate  # pylint: disable=g-import-not-at-top
  out = {}
  orders = [("left_to_right", 1)] + ([("strided", 4)] if kind == "armd" else [])
  for order, streams in orders:
    result = evaluate.evaluate_workdir(workdir, order=order, streams=streams,
                                       max_batches=max_batches, log=lambda *_: None)
    out[f"{order}_S{streams}"] = result["heldout"]
  return out


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="folder for the three workdirs")
  parser.add_argument("--out", default="benchmarks/results/adapt_from_ar.json")
  parser.add_argument("--ar_steps", type=int, default=600)
  parser.add_argument("--adapt_steps", type=int, default=300)
  parser.add_argument("--d_model", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--adapt_lr", type=float, default=5e-4,
                      help="peak learning rate of the adaptation (configs/adapt_from_ar.py)")
  parser.add_argument("--eval_batches", type=int, default=20)
  parser.add_argument("--note", default="")
  args = parser.parse_args()
  from armd_jax import train  # pylint: disable=g-import-not-at-top

  k, m = args.ar_steps, args.adapt_steps
  dirs = {name: os.path.join(args.root, name) for name in ("ar", "scratch")}
  # Finished runs resume as done: another --adapt_lr reuses the AR and scratch runs.
  dirs["adapted"] = os.path.join(args.root, f"adapted_lr{args.adapt_lr:g}")
  train.train_and_evaluate(run_config(args, "ar", k), dirs["ar"])
  train.train_and_evaluate(run_config(args, "armd", m, init_from=dirs["ar"]), dirs["adapted"])
  train.train_and_evaluate(run_config(args, "armd", k + m), dirs["scratch"])
  runs = {"ar": {"kind": "ar", "steps": k, **score(dirs["ar"], "ar", args.eval_batches)},
          "adapted": {"kind": "armd", "steps": f"{k} AR + {m} ARMD",
                      **score(dirs["adapted"], "armd", args.eval_batches)},
          "scratch": {"kind": "armd", "steps": k + m,
                      **score(dirs["scratch"], "armd", args.eval_batches)}}
  for name, run in runs.items():
    line = ", ".join(f"{key} ppl {value['ppl']:.3f}" for key, value in run.items()
                     if isinstance(value, dict))
    print(f"{name}: {line}", flush=True)
  results_file.write(args.out, args, runs=runs)
  return 0


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  sys.exit(main())
