"""CPU time of one decoding call's attention over a KV cache: cache layouts compared.

  python benchmarks/decode_attention.py [--heads=4 --rows=133] \
      [--out=benchmarks/results/decode_attention.json]

Why a strided call of width W cost about W width-1 calls (issue 13): the decoder kept
its caches as [B, H, R, Dh] and transposed them to the [B, R, H, Dh] that
`Block.attend` / the kernels' reference take, and XLA:CPU then ran the W > 1 score and
mixing products as a slow batched product. This times, for B = 8, H = 4, R = 133 (the
quickstart model at N = 128; --heads=8 --rows=1029 is the small model at N = 1,024),
Dh = 32 and W = 1, 2, 4, 8 queries, --loops attentions in a `lax.scan`:
  old_transposed: cache [B, H, R, Dh] transposed into the reference (the old decoder);
  reference_BRHD: a cache already [B, R, H, Dh] into the reference;
  cache_layout:   `decoding`'s own attention math on [B, H, R, Dh] as stored (one
                  batched einsum; what the decoder runs on GPU/TPU);
  split_queries:  the same math as W one-query attentions (the decoder on XLA:CPU).
Process CPU time (not wall time, so a shared machine's load matters less), XLA:CPU
single-threaded, best of --repeats, per attention, and the rate at which that streams
the K and V caches (2 B H R Dh float32 per attention). Writes a JSON results file.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from armd_jax.kernels.reference import block_causal_attention_reference  # noqa: E402
from armd_jax.sampling import decoding  # noqa: E402  pylint: disable=protected-access

import results_file  # noqa: E402  benchmarks/, the script's folder

B, D = 8, 32


def cache_layout(q, k, v, q_ids, kv_ids):
  """The decoder's attention math on a [B, H, R, Dh] cache (as `decoding._attend`)."""
  qt = jnp.swapaxes(q, 1, 2)  # [B, H, W, Dh]
  s = jnp.einsum("bhwd,bhrd->bhwr", qt, k, preferred_element_type=jnp.float32) * D ** -0.5
  mask = (kv_ids[:, None, :] <= q_ids[:, :, None])[:, None]
  s = jnp.where(mask, s, -1e30)
  w = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
  p = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-30)
  return jnp.einsum("bhwr,bhrd->bwhd", p, v, preferred_element_type=jnp.float32)


def old_transposed(q, k, v, q_ids, kv_ids):
  """The old decoder: cache [B, H, R, Dh] transposed into the reference every call."""
  return block_causal_attention_reference(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2),
                                          q_ids, kv_ids)


def split_queries(q, k, v, q_ids, kv_ids):
  """The decoder on XLA:CPU (`decoding._attend`, 2 <= W <= 8): W one-query attentions."""
  qt = jnp.swapaxes(q, 1, 2)  # [B, H, W, Dh]
  return jnp.concatenate([decoding._attention(qt[:, :, w:w + 1], q_ids[:, w:w + 1], k, v,
                                              kv_ids) for w in range(q.shape[1])], axis=1)


VARIANTS = {"old_transposed": (old_transposed, True),
            "reference_BRHD": (block_causal_attention_reference, False),
            "cache_layout": (cache_layout, True),
            "split_queries": (split_queries, True)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="1,2,4,8")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--rows", type=int, default=133, help="cache rows R")
  parser.add_argument("--loops", type=int, default=200, help="attentions per timed scan")
  parser.add_argument("--out", default="benchmarks/results/decode_attention.json")
  args = parser.parse_args()
  heads, rows, n = args.heads, args.rows, args.loops
  loops = {}
  for name, (fn, heads_first) in VARIANTS.items():
    for width in (int(w) for w in args.widths.split(",")):
      shape = (B, heads, rows, D) if heads_first else (B, rows, heads, D)
      k = jax.random.normal(jax.random.PRNGKey(0), shape)
      v = jax.random.normal(jax.random.PRNGKey(2), shape)
      q = jax.random.normal(jax.random.PRNGKey(1), (B, width, heads, D))
      q_ids = jnp.full((B, width), rows // 2)
      kv_ids = jnp.tile(jnp.arange(rows)[None], (B, 1))
      f = jax.jit(lambda q, k, v, fn=fn, q_ids=q_ids, kv_ids=kv_ids: jax.lax.scan(
          lambda c, _: (fn(c, k, v, q_ids, kv_ids).astype(c.dtype), None), q, None,
          length=n)[0])
      f(q, k, v).block_until_ready()  # compile
      loops[(name, width)] = (f, q, k, v)
  best = {key: float("inf") for key in loops}
  for _ in range(args.repeats):  # round-robin
    for key, (f, q, k, v) in loops.items():
      start = time.process_time()
      f(q, k, v).block_until_ready()
      best[key] = min(best[key], time.process_time() - start)
  cache_bytes = 2 * B * heads * rows * D * 4
  records = [{"variant": name, "width": width, "cpu_us_per_attention": best[(name, width)] / n * 1e6,
              "cache_gb_per_s": cache_bytes / (best[(name, width)] / n) / 1e9}
             for name, width in loops]
  for r in records:
    print(json.dumps(r), flush=True)
  results_file.write(args.out, args, shape={"B": B, "H": heads, "R": rows, "Dh": D},
                     records=records)


if __name__ == "__main__":
  main()
