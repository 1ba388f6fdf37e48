"""How much faster strided decoding can be than sequential on one CPU core, from FLOPs.

  python benchmarks/strided_bound.py [--settings=tiny:128,small:1024] [--streams=4] \
      [--batch_size=8] [--repeats=5] [--out=benchmarks/results/strided_bound.json]

Issue 13 asks for strided S = 4 >= 3x sequential at batch 8 on CPU. Sequential and
strided decoding push the same N tokens through the same layers, so they do about the
same FLOPs; strided only makes fewer, wider calls. Its speed-up can therefore come only
from what a call costs beyond its FLOPs. This script measures that, per model and length,
on one pinned core (XLA:CPU, Eigen single-threaded), for randomly initialised
`sampling_speed` models, every call attending over the whole cache (no segments):

  1. FLOPs of one decode call of width 1 and of width S, from XLA's cost analysis of the
     compiled decoder (it counts each scan body once: the S = 1 program gives
     init + call(1), the strided one init + call(1) + call(S)).
  2. Decode time of `generate(streams=1)` and `generate(streams=S)`
     (`sampling_speed.cached_seconds`: best of --repeats, round-robin, compile excluded), hence seconds per call: t1 = T1 / N and
     tS = (T_S - n1 t1) / nS for the strided plan's n1 width-1 and nS width-S calls.
  3. This core's matmul rate at the call's widest matmul, [B S, d] @ [d, mlp] (the MLP
     input projection), best of 3 in a jitted loop.
  4. The FLOP rate a width-S call needs for T_S <= T1 / 3, and the speed-up bound if every
     FLOP of a width-S call ran at the rate of (3) with no other cost, while width-1 calls
     stay as measured.

Writes a JSON results file; `docs/sampling.md` summarises it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, before jax starts
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampling_speed import MODELS, cached_seconds, init  # noqa: E402
import results_file  # noqa: E402

from armd_jax import orders, sampling  # noqa: E402
from armd_jax.sampling import decoding  # noqa: E402
from armd_jax.sampling import plan as plan_lib  # noqa: E402

# Every call attends over the whole cache here (no `Plan.segments`), so that each phase
# is one scan body, whose FLOPs XLA's cost analysis counts once.
plan_lib.SEGMENT_MIN_ROWS = sys.maxsize

TARGET = 3.0  # issue 13: strided S = 4 >= 3x sequential


def program_flops(model, params, batch: int, length: int, streams: int) -> float:
  """XLA's FLOP count of the compiled strided decoder (each scan body counted once)."""
  ids = np.asarray(orders.strided(batch, length, streams))
  zeros = np.zeros((batch, length), np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  run, inputs, _ = decoding.decode_program(model, zeros, zeros.astype(bool), ids, positions)
  cost = jax.jit(run).lower(params, jax.random.PRNGKey(0), *inputs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def matmul_rate(rows: int, d_in: int, d_out: int) -> float:
  """FLOP/s of a jitted loop of [rows, d_in] @ [d_in, d_out] matmuls on this core."""
  a, b = jnp.ones((rows, d_in)), jnp.ones((d_in, d_out))
  reps = max(8, int(1e9 / (2 * rows * d_in * d_out)))

  @jax.jit
  def loop(a, b):  # each product depends on the last, so none is optimised away
    step = lambda _, acc: acc + (a + acc[:1, :1] * 0) @ b  # noqa: E731
    return jax.lax.fori_loop(0, reps, step, jnp.zeros((rows, d_out)))

  jax.block_until_ready(loop(a, b))
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(loop(a, b))
    best = min(best, time.perf_counter() - start)
  return 2 * rows * d_in * d_out * reps / best


def analyse(name: str, length: int, streams: int, batch: int, repeats: int) -> dict:
  """The record of one model and length (see the module docstring for the steps)."""
  model, params, count = init(name, length)
  print(f"model {name}: {count:,} parameters, N = {length}, S = {streams}", flush=True)
  flops_1 = program_flops(model, params, batch, length, 1)
  flops_s = program_flops(model, params, batch, length, streams) - flops_1  # one width-S call
  seconds, calls = cached_seconds(model, params, batch, length, (1, streams), repeats)
  n1 = streams  # the strided plan: S width-1 calls (the stream heads), then width-S calls
  ns = calls[streams] - n1
  if calls[1] != length or n1 + ns * streams != length:
    raise RuntimeError(f"unexpected plans: {calls} calls for N = {length}, S = {streams}")
  t1 = seconds[1] / length
  ts = (seconds[streams] - n1 * t1) / ns
  config = MODELS[name]
  rate = matmul_rate(batch * streams, config["d_model"], config["mlp_dim"])
  needed_ts = (seconds[1] / TARGET - n1 * t1) / ns  # width-S call time for T_S = T1 / 3
  bound = seconds[1] / (n1 * t1 + ns * flops_s / rate)
  return dict(
      model=name, params=count, length=length, batch=batch, streams=streams,
      calls={"sequential": calls[1], "strided": calls[streams], "strided_width_1": n1,
             f"strided_width_{streams}": ns},
      flops_per_call={"width_1": flops_1, f"width_{streams}": flops_s},
      flops_total={"sequential": length * flops_1, "strided": n1 * flops_1 + ns * flops_s},
      seconds={"sequential": seconds[1], "strided": seconds[streams]},
      seconds_per_call={"width_1": t1, f"width_{streams}": ts},
      gflops_per_s={"width_1": flops_1 / t1 / 1e9, f"width_{streams}": flops_s / ts / 1e9,
                    f"matmul_{batch * streams}x{config['d_model']}x{config['mlp_dim']}":
                        rate / 1e9,
                    f"needed_width_{streams}_for_{TARGET:g}x": flops_s / needed_ts / 1e9
                    if needed_ts > 0 else float("inf")},
      speedup={"measured": seconds[1] / seconds[streams],
               "bound_width_s_at_matmul_rate": bound})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--settings", default="tiny:128,small:1024",
                      help="comma-separated model:length pairs")
  parser.add_argument("--streams", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/strided_bound.json")
  args = parser.parse_args()
  records = []
  for setting in args.settings.split(","):
    name, length = setting.split(":")
    if name not in MODELS:
      raise SystemExit(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    record = analyse(name, int(length), args.streams, args.batch_size, args.repeats)
    print(json.dumps(record, indent=1), flush=True)
    records.append(record)
  results_file.write(args.out, args, records=records)


if __name__ == "__main__":
  main()
