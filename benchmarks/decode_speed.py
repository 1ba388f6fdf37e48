"""CPU decode speed of ARMD: no cache vs KV-cached sequential vs strided, FLOPs per call.

  python benchmarks/decode_speed.py [--settings=tiny:128,small:1024] [--streams=2,4,8] \
      [--batch_size=8] [--repeats=4] [--parts] [--one_core] \
      [--out=benchmarks/results/decode_speed.json]

For each model size and length N, with randomly initialised weights (speed does not
depend on the weights):

1. Timing (`records`), best of --repeats after one untimed compile run:
   (a) no cache: `decode(mode='recompute')`, a full one-pass forward every call. Every
       call costs the same, so only the first --nocache_calls calls are run (the rest of
       the positions in one final call) and the time is scaled to N calls
       (`extrapolated`);
   (b) cached sequential: `generate(streams=1)`, N calls;
   (c) cached strided: `generate(streams=S)`, S width-1 calls (the stream heads), then
       N/S - 1 width-S calls.
   The cached settings of one model and length are timed round-robin, so load changes
   on a shared machine hit every setting alike.
2. FLOPs (`flops`), from XLA's cost analysis of the compiled decoder
   (`decoding.decode_program`, `armd_jax.flops.compiled_flops`), which counts each
   `lax.scan` body once (`armd_jax.flops.program_flops` counts every iteration instead:
   at micro size, N = 32, S = 4, the totals below agree with it to 0.1%). The decoder runs
   the one-time cache setup (empty caches, the BOS row) and then one scan per phase of
   equal-width calls, so a program's count is `setup + sum over its phases of one call`.
   Three programs with the same caches (max width S) and phases (1, S), (1, S, 1) and
   (S, 1, S) give the width-1 call, the width-S call and the setup separately:
   call_1 = P(1,S,1) - P(1,S), call_S = P(S,1,S) - P(1,S), setup = P(1,S) - call_1 - call_S.
   The setup is counted once per decode in the totals, never inside a call. Every call
   attends over the whole cache here (`plan.SEGMENT_MIN_ROWS` raised while counting), so
   each phase is one scan.
3. With --parts (`parts`): the time of each part of one call at widths 1 and S, each
   run --part_loops times in a `lax.scan`: one layer's attention over a full cache
   (`cache.attend_on_cache`: norm, query projection, attention, output projection,
   MLP), one layer's K/V projection (`Block.keys_values`), the output head
   (`logits`), drawing and scoring (`sample_logits`, `token_log_probs`) and one cache
   write (`cache.write_cache_rows`).

--one_core pins the process to one core and XLA:CPU to one thread (set before jax
starts), as the figures in docs/sampling.md were measured. Results go to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

if "--one_core" in sys.argv:  # before jax starts its thread pools
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_cpu_multi_thread_eigen=false"
                             " intra_op_parallelism_threads=1").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_file  # noqa: E402  benchmarks/, the script's folder

from armd_jax import ModelConfig, build_model, orders, sampling  # noqa: E402
from armd_jax.flops import compiled_flops  # noqa: E402
from armd_jax.losses import token_log_probs  # noqa: E402
from armd_jax.sampling import cache as cache_lib  # noqa: E402
from armd_jax.sampling import decoding  # noqa: E402
from armd_jax.sampling import plan as plan_lib  # noqa: E402

MODELS = {  # byte-level vocabulary, as for tiny Shakespeare
    "tiny": dict(vocab_size=256, d_model=128, num_layers=4, num_heads=4, mlp_dim=512, d_pe=64),
    "small": dict(vocab_size=256, d_model=256, num_layers=8, num_heads=8, mlp_dim=1024, d_pe=64),
    # For smoke runs of this script: the fewest layers of the same structure, seconds to compile.
    "micro": dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, d_pe=16),
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


# -- timing -----------------------------------------------------------------------------------


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
  """({S: best seconds}, {S: calls}) of `generate(streams=S)` for each S in `widths`,
  timed round-robin after one untimed compile run each."""
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
  return best, calls


def nocache_seconds(model, params, batch: int, length: int, calls: int) -> float:
  """Seconds of N no-cache calls, from `calls` measured ones (the first calls - 1
  positions left to right, the rest in one final block)."""
  ids = np.broadcast_to(np.minimum(np.arange(1, length + 1), calls), (batch, length))
  zeros = np.zeros((batch, length), np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  seconds = best_time(lambda seed: sampling.decode(
      model, params, jax.random.PRNGKey(seed), zeros, zeros.astype(bool),
      ids.astype(np.int32), positions, mode="recompute")[0], 1)
  return seconds / calls * length


# -- FLOPs ------------------------------------------------------------------------------------


@contextlib.contextmanager
def whole_cache_calls():
  """Every call attends over the whole cache (no segments): one scan per phase."""
  saved = plan_lib.SEGMENT_MIN_ROWS
  plan_lib.SEGMENT_MIN_ROWS = sys.maxsize
  try:
    yield
  finally:
    plan_lib.SEGMENT_MIN_ROWS = saved


def block_ids_of(widths, batch: int) -> np.ndarray:
  """Dense block ids [B, N] whose blocks (left to right) have the given widths."""
  ids = np.repeat(np.arange(1, len(widths) + 1, dtype=np.int32), widths)
  return np.broadcast_to(ids, (batch, len(ids)))


def program_flops(model, params, block_ids: np.ndarray) -> float:
  """XLA's FLOP count of the compiled decoder of one order (each scan body once)."""
  batch, length = block_ids.shape
  zeros = np.zeros((batch, length), np.int32)
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
  with whole_cache_calls():
    run, inputs, _ = decoding.decode_program(model, zeros, zeros.astype(bool), block_ids,
                                             positions)
  return compiled_flops(run, params, jax.random.PRNGKey(0), *inputs)


def call_flops(model, params, batch: int, length: int, streams: int) -> dict:
  """FLOPs of the one-time setup and of one width-1 and one width-S call (module doc)."""
  s = streams
  if length < 3 * s or length % s:
    raise ValueError(f"FLOPs per call need S | N and N >= 3 S, got N = {length}, S = {s}")
  strided = np.asarray(orders.strided(batch, length, s))  # phases (1, S)
  one_s_one = block_ids_of([1] * s + [s] * (length // s - 2) + [1] * s, batch)
  s_one_s = block_ids_of([s] + [1] * s + [s] * (length // s - 2), batch)
  base = program_flops(model, params, strided)
  width_1 = program_flops(model, params, one_s_one) - base
  width_s = program_flops(model, params, s_one_s) - base
  return {"setup": base - width_1 - width_s, "width_1": width_1, f"width_{s}": width_s}


# -- parts of one call ------------------------------------------------------------------------


def parts(model, batch: int, width: int, length: int, loops: int):
  """{part: (jitted loop f(params, carry), carry)} of one call of `width` rows."""
  cfg = model.config
  rows = length + width + 1  # the content cache: BOS, N positions, a width of tail rows
  cache = jax.random.normal(jax.random.PRNGKey(0), (batch, cfg.num_heads, rows, cfg.head_dim))
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, width, cfg.d_model))
  logits = jax.random.normal(jax.random.PRNGKey(2), (batch, width, cfg.vocab_size))
  rope = jnp.tile(jnp.arange(width)[None] + length // 2, (batch, 1))
  kv_ids = jnp.tile(jnp.arange(rows)[None], (batch, 1))
  values = jnp.ones((batch, width, cfg.num_heads, cfg.head_dim))

  def loop(body):
    return jax.jit(lambda p, c: jax.lax.scan(lambda c, i: (body(model.bind(p), c, i), None),
                                             c, jnp.arange(loops))[0])

  def sample(m, c, i):
    del m
    drawn = sampling.sample_logits(jax.random.fold_in(jax.random.PRNGKey(0), i), c,
                                   sampling.SamplerConfig())
    return c + token_log_probs(c, drawn)[..., None]

  return {
      "attend_layer": (loop(lambda m, c, i: cache_lib.attend_on_cache(
          m.layers[0], c, rope, rope, cache, cache, kv_ids)), x),
      "keys_values": (loop(lambda m, c, i: c + sum(
          t.sum() for t in m.layers[0].keys_values(c, rope))), x),
      "logits": (loop(lambda m, c, i: c + m.logits(c).mean(-1, keepdims=True)), x),
      "sample": (loop(sample), logits),
      "cache_write": (loop(lambda m, c, i: cache_lib.write_cache_rows(
          c, values, jnp.full((batch,), i), None, True)), cache),
  }


def time_parts(model, params, batch: int, length: int, widths, loops: int,
               repeats: int) -> list:
  """Microseconds per part and width, best of `repeats` round-robin runs of `loops`."""
  runs = {}
  for width in widths:
    for name, (f, carry) in parts(model, batch, width, length, loops).items():
      jax.block_until_ready(f(params, carry))  # compile
      runs[(name, width)] = (f, carry)
  best = {key: float("inf") for key in runs}
  for _ in range(repeats):
    for key, (f, carry) in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(f(params, carry))
      best[key] = min(best[key], time.perf_counter() - start)
  return [{"part": name, "width": width, "us": best[(name, width)] / loops * 1e6}
          for name, width in runs]


# -- main -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--settings", default="tiny:128,small:1024",
                      help="comma-separated model:length pairs")
  parser.add_argument("--streams", default="2,4,8", help="strided widths S to time")
  parser.add_argument("--flops_streams", type=int, default=4,
                      help="S of the FLOPs-per-call analysis (0 = skip it)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=4)
  parser.add_argument("--nocache_calls", type=int, default=32,
                      help="no-cache calls actually run per length (then scaled to N)")
  parser.add_argument("--parts", action="store_true", help="also time the parts of a call")
  parser.add_argument("--part_loops", type=int, default=100)
  parser.add_argument("--one_core", action="store_true",
                      help="one pinned core, single-threaded XLA:CPU")
  parser.add_argument("--note", default="", help="free text stored in the results file")
  parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
  args = parser.parse_args(argv)
  for name, _ in settings_of(args):
    if name not in MODELS:
      parser.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
  return args


def settings_of(args):
  """[(model name, length)] of --settings."""
  return [(m, int(n)) for m, n in (x.split(":") for x in args.settings.split(","))]


def analyse(name: str, length: int, args) -> dict:
  """Timing, FLOPs and (with --parts) call parts of one model and length."""
  batch, s = args.batch_size, args.flops_streams
  model, params, count = init(name, length)
  print(f"model {name}: {count:,} parameters, N = {length}", flush=True)
  out = {"model": name, "params": count, "length": length, "batch": batch}
  calls = min(args.nocache_calls, length)
  timing = [dict(method="no_cache", streams=1, calls=length,
                 seconds=nocache_seconds(model, params, batch, length, calls),
                 measured_calls=calls, extrapolated=calls < length)]
  streams = [int(w) for w in args.streams.split(",")]
  widths = sorted({1, *(w for w in streams if length % w == 0)})
  best, num_calls = cached_seconds(model, params, batch, length, widths, args.repeats)
  timing += [dict(method="cached" if w == 1 else "strided", streams=w, calls=num_calls[w],
                  seconds=best[w], measured_calls=num_calls[w], extrapolated=False)
             for w in widths]
  for row in timing:
    row["tokens_per_second"] = batch * length / row["seconds"]
  out["timing"] = timing
  seconds = {row["streams"]: row["seconds"] for row in timing if row["method"] != "no_cache"}
  out["speedup"] = {"cached_vs_no_cache": timing[0]["seconds"] / seconds[1],
                    **{f"strided_S{w}_vs_cached": seconds[1] / seconds[w]
                       for w in widths if w > 1}}
  if s:
    flops = call_flops(model, params, batch, length, s)
    n1, ns = s, length // s - 1  # the strided plan: S heads, then width-S calls
    out["flops"] = {
        "streams": s, "per_call": flops, "width_ratio": flops[f"width_{s}"] / flops["width_1"],
        "calls": {"sequential": length, "strided_width_1": n1, f"strided_width_{s}": ns},
        "total": {"sequential": flops["setup"] + length * flops["width_1"],
                  "strided": flops["setup"] + n1 * flops["width_1"] + ns * flops[f"width_{s}"]}}
    if s in seconds:
      t1 = seconds[1] / length  # the setup's time is in both; it is not separated here
      ts = (seconds[s] - n1 * t1) / ns
      out["flops"]["gflops_per_s"] = {"width_1": flops["width_1"] / t1 / 1e9,
                                      f"width_{s}": flops[f"width_{s}"] / ts / 1e9
                                      if ts > 0 else None}
  if args.parts:
    out["parts"] = time_parts(model, params, batch, length, sorted({1, s or 4}),
                              args.part_loops, args.repeats)
  return out


def main(argv=None):
  args = parse_args(argv)
  records = []
  for name, length in settings_of(args):
    record = analyse(name, length, args)
    print(json.dumps(record, indent=1), flush=True)
    records.append(record)
  results_file.write(args.out, args, note=args.note, records=records)


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  main()
