"""CPU time of the parts of one KV-cached decoding call at width W = 1 and W = 4.

  PYTHONPATH=. python benchmarks/decode_call_parts.py [--model=tiny --length=128] \
      [--out=benchmarks/results/decode_call_parts.json]

Why strided S = 4 is not ~3x faster than sequential at batch 8 on CPU (issue 13): this
times, for a randomly initialised `sampling_speed` model at batch 8, each part of a call
with W rows per batch row, 100 times in a `lax.scan` (process CPU time, XLA:CPU
single-threaded, best of --repeats, round-robin):
  attend_layer: one layer's `decoding._attend` (norm, query projection, attention over
    a full cache of N + 5 rows, output projection, MLP); a call runs 5 of them for the
    tiny model (2 lower query-stream, 2 upper, 1 content);
  keys_values: one layer's K/V projection (4 per call for tiny);
  logits: the output head;
  sample: `sample_logits` (precise noise) and `token_log_probs` of [B, W, V] logits;
  cache_write: one `_write_rows` of W rows.
Writes a JSON results file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sampling_speed import init  # noqa: E402
import results_file  # noqa: E402

from armd_jax.losses import token_log_probs  # noqa: E402
from armd_jax.sampling import decoding  # noqa: E402
from armd_jax.sampling.sampler import SamplerConfig, sample_logits  # noqa: E402

BATCH, LOOPS = 8, 100


def parts(model, width: int, length: int):
  """{part: (jitted loop f(params, carry), carry)} for one width."""
  cfg = model.config
  rows = length + 5
  cache = jax.random.normal(jax.random.PRNGKey(0), (BATCH, cfg.num_heads, rows, cfg.head_dim))
  x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, width, cfg.d_model))
  logits = jax.random.normal(jax.random.PRNGKey(2), (BATCH, width, cfg.vocab_size))
  rope = jnp.tile(jnp.arange(width)[None] + length // 2, (BATCH, 1))
  kv_ids = jnp.tile(jnp.arange(rows)[None], (BATCH, 1))
  values = jnp.ones((BATCH, width, cfg.num_heads, cfg.head_dim))

  def loop(body):
    return jax.jit(lambda p, c: jax.lax.scan(lambda c, i: (body(model.bind(p), c, i), None),
                                             c, jnp.arange(LOOPS))[0])

  def sample(m, c, i):
    del m
    drawn = sample_logits(jax.random.fold_in(jax.random.PRNGKey(0), i), c, SamplerConfig())
    return c + token_log_probs(c, drawn)[..., None]

  return {
      "attend_layer": (loop(lambda m, c, i: decoding._attend(  # pylint: disable=protected-access
          m.layers[0], c, rope, rope, cache, cache, kv_ids)), x),
      "keys_values": (loop(lambda m, c, i: c + sum(
          t.sum() for t in m.layers[0].keys_values(c, rope))), x),
      "logits": (loop(lambda m, c, i: c + m.logits(c).mean(-1, keepdims=True)), x),
      "sample": (loop(sample), logits),
      "cache_write": (loop(lambda m, c, i: decoding._write_rows(  # pylint: disable=protected-access
          c, values, jnp.full((BATCH,), i), None, True)), cache),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny")
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--widths", default="1,4")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/decode_call_parts.json")
  args = parser.parse_args()
  model, params, _ = init(args.model, args.length)
  loops = {}
  for width in (int(w) for w in args.widths.split(",")):
    for name, (f, carry) in parts(model, width, args.length).items():
      jax.block_until_ready(f(params, carry))  # compile
      loops[(name, width)] = (f, carry)
  best = {key: float("inf") for key in loops}
  for _ in range(args.repeats):  # round-robin
    for key, (f, carry) in loops.items():
      start = time.process_time()
      jax.block_until_ready(f(params, carry))
      best[key] = min(best[key], time.process_time() - start)
  records = [{"part": n, "width": w, "cpu_us": best[(n, w)] / LOOPS * 1e6} for n, w in loops]
  for r in records:
    print(json.dumps(r), flush=True)
  results_file.write(args.out, args, batch=BATCH, records=records)


if __name__ == "__main__":
  main()
