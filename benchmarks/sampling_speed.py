"""Sampling speed of ARMD on this machine: no cache vs KV cache vs strided streams.

  python benchmarks/sampling_speed.py [--settings=tiny:128,small:1024] [--streams=2,4,8] \
      [--batch_size=8] [--out=benchmarks/results/sampling_speed.json]

Targets (issue 13): at batch 8, strided S = 4 >= 3x cached sequential for tiny (the
quickstart model) at N = 128 and small at N = 1024, and cached >= 5x no cache.

For each model size and length N, with randomly initialised weights (speed does not
depend on the weights), it times:
  (a) no cache: `decode(mode='recompute')`, the full one-pass forward every call
      (N calls). Every call costs the same, so for long runs only the first
      --nocache_calls calls are run (the remaining positions in one final call) and the
      wall time is scaled to N calls; the record says `extrapolated`.
  (b) cached sequential: `generate(streams=1)`, N calls.
  (c) cached strided: `generate(streams=S)`, N/S + S - 1 calls.
Each timing excludes compilation (one untimed warm-up run of the same shapes) and is
the best of --repeats runs; the cached settings of one model and length are timed
round-robin, so load changes on a shared machine affect their ratios less. Results go to a JSON file; `docs/sampling.md` summarises them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np

from armd_jax import ModelConfig, build_model, orders, sampling

import results_file  # benchmarks/ (the script's folder) is on sys.path

MODELS = {  # byte-level vocabulary, as for tiny Shakespeare
    "tiny": dict(vocab_size=256, d_model=128, num_layers=4, num_heads=4, mlp_dim=512, d_pe=64),
    "small": dict(vocab_size=256, d_model=256, num_layers=8, num_heads=8, mlp_dim=1024, d_pe=64),
}


def init(name: str, max_len: int):
  """(model, params, parameter count) of a randomly initialised model."""
  config = ModelConfig(max_len=max_len, **MODELS[name])
  model = build_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32),
                               orders.left_to_right(1, 8))
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  count = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  return model, params, count


def best_time(run, repeats: int) -> float:
  """Best wall time of `run(seed)` over `repeats` runs, after one untimed warm-up."""
  jax.block_until_ready(run(0))
  times = []
  for seed in range(1, repeats + 1):
    start = time.perf_counter()
    jax.block_until_ready(run(seed))
    times.append(time.perf_counter() - start)
  return min(times)


def cached_seconds(model, params, batch: int, length: int, widths, repeats: int):
  """({S: best seconds}, {S: calls}) of `generate(streams=S)` for each S in `widths`.

  One untimed compile run each, then --repeats rounds timed round-robin, so that changes
  in the load of a shared machine hit every setting alike.
  """
  runs, calls = {}, {}
  for s in widths:
    def run(seed, s=s):
      result = sampling.generate(model, params, jax.random.PRNGKey(seed), batch_size=batch,
                                 length=length, streams=s)
      calls[s] = result.num_calls
      return result.tokens
    runs[s] = run
    jax.block_until_ready(run(0))  # compile
  best = {s: float("inf") for s in widths}
  for seed in range(1, repeats + 1):
    for s in widths:
      start = time.perf_counter()
      jax.block_until_ready(runs[s](seed))
      best[s] = min(best[s], time.perf_counter() - start)
    print(f"  repeat {seed}/{repeats}: best so far {best}", flush=True)
  return best, calls


def nocache_order(batch: int, length: int, calls: int) -> np.ndarray:
  """Left-to-right for the first `calls - 1` positions, the rest in one final block."""
  ids = np.minimum(np.arange(1, length + 1), calls)
  return np.broadcast_to(ids, (batch, length)).astype(np.int32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--settings", default="tiny:128,small:1024",
                      help="comma-separated model:length pairs")
  parser.add_argument("--streams", default="2,4,8")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=4)
  parser.add_argument("--nocache_calls", type=int, default=32,
                      help="no-cache calls actually run per length (then scaled to N)")
  parser.add_argument("--out", default="benchmarks/results/sampling_speed.json")
  args = parser.parse_args()
  settings = [(m, int(n)) for m, n in (x.split(":") for x in args.settings.split(","))]
  streams = [int(s) for s in args.streams.split(",")]
  batch = args.batch_size
  records = []

  def record(**fields):
    records.append(fields)
    print(json.dumps(fields), flush=True)

  for name, length in settings:
    model, params, count = init(name, length)
    print(f"model {name}: {count:,} parameters, N = {length}", flush=True)
    # (a) no cache: full forward per call.
    calls = min(args.nocache_calls, length)
    ids = nocache_order(batch, length, calls)
    zeros = np.zeros((batch, length), np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    known = np.zeros((batch, length), bool)
    seconds = best_time(lambda seed: sampling.decode(
        model, params, jax.random.PRNGKey(seed), zeros, known, ids, positions,
        mode="recompute")[0], 1)
    per_call = seconds / calls
    record(model=name, params=count, length=length, batch=batch, method="no_cache",
           streams=1, calls=length, seconds=per_call * length,
           tokens_per_second=batch * length / (per_call * length),
           measured_calls=calls, extrapolated=calls < length)
    # (b) cached sequential and (c) cached strided, timed round-robin so that changes
    # in the load of the shared machine hit every setting alike.
    widths = [st for st in [1] + streams if length % st == 0]
    best, calls = cached_seconds(model, params, batch, length, widths, args.repeats)
    for st in widths:
      record(model=name, params=count, length=length, batch=batch,
             method="cached" if st == 1 else "strided", streams=st, calls=calls[st],
             seconds=best[st], tokens_per_second=batch * length / best[st],
             measured_calls=calls[st], extrapolated=False)

  ratios = {}
  for name, length in settings:
    rows = {(r["method"], r["streams"]): r["seconds"] for r in records
            if r["model"] == name and r["length"] == length}
    key = f"{name}/N={length}"
    ratios[key] = {"cached_vs_no_cache": rows[("no_cache", 1)] / rows[("cached", 1)]}
    for s in streams:
      if ("strided", s) in rows:
        ratios[key][f"strided_S{s}_vs_cached"] = rows[("cached", 1)] / rows[("strided", s)]
  print(json.dumps(ratios, indent=1), flush=True)
  results_file.write(args.out, args, records=records, ratios=ratios)


if __name__ == "__main__":
  main()
