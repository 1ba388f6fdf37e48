"""Block-id flash attention (Pallas) vs. the XLA masked reference vs. cuDNN causal attention.

Runs with only jax installed (`armd_jax.kernels` is imported without the package's
`__init__`, so neither flax nor the rest of armd_jax is loaded). The ids are a left-to-right order, i.e.
tokens already gathered into generation order: the block-id mask is then exactly the
causal mask, so `jax.nn.dot_product_attention(..., is_causal=True)` (cuDNN on GPU) does
the same work and is the bar to meet. Times are medians over --reps timed runs after
--warmup runs, in milliseconds, for the forward pass and for forward+backward (the VJP
for dq, dk, dv).

  python benchmarks/attention_kernel.py                       # on a GPU: full table
  python benchmarks/attention_kernel.py --block-sizes 64,64 128,64 128,128
  python benchmarks/attention_kernel.py --smoke               # CPU: interpret mode, tiny
Writes a markdown table to --out (default benchmarks/results/attention_kernel.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(HERE, "..", "armd_jax")


def import_kernels():
  """`armd_jax.kernels` without running `armd_jax/__init__.py` (which imports flax).

  Registers a bare `armd_jax` package whose path is the source folder, so that only the
  kernels subpackage (jax alone) is executed.
  """
  if "armd_jax" not in sys.modules:
    package = types.ModuleType("armd_jax")
    package.__path__ = [os.path.abspath(PACKAGE)]
    sys.modules["armd_jax"] = package
  import armd_jax.kernels  # pylint: disable=g-import-not-at-top
  return armd_jax.kernels


kernels = import_kernels()
flash = sys.modules["armd_jax.kernels.flash"]
reference = sys.modules["armd_jax.kernels.reference"]


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--block-sizes", nargs="+", default=["128,64"],
                      help="kernel tiles as block_q,block_kv; several values are swept")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--smoke", action="store_true",
                      help="tiny shapes, Pallas interpreter, one rep (runs on CPU)")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "attention_kernel.md"))
  args = parser.parse_args(argv)
  if args.smoke:
    args.lengths, args.head_dims, args.batch, args.heads = [64], [16], 1, 2
    args.block_sizes, args.warmup, args.reps = ["16,16"], 1, 1
  return args


def median_ms(fn, args, warmup: int, reps: int) -> float:
  """Median wall time of fn(*args) in ms, after warm-up (compilation included there)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def implementations(block_sizes, smoke: bool):
  """name -> attention(q, k, v, ids) for every contender."""
  impls = {}
  for bq, bk in block_sizes:
    sizes = flash.BlockSizes(bq, bk)
    impls[f"pallas {bq}x{bk}"] = (
        lambda q, k, v, ids, sizes=sizes: flash.block_causal_flash_attention(
            q, k, v, ids, ids, block_sizes=sizes, interpret=smoke))
  impls["xla masked reference"] = (
      lambda q, k, v, ids: reference.block_causal_attention_reference(q, k, v, ids, ids))
  name = "cudnn causal" if jax.default_backend() == "gpu" else "xla causal (dot_product_attention)"
  impls[name] = lambda q, k, v, ids: causal_attention(q, k, v)
  return impls


def causal_attention(q, k, v):
  """`jax.nn.dot_product_attention(is_causal=True)`: cuDNN on GPU, XLA elsewhere. With
  left-to-right ids it does the work of the block-id kernel: the bar to meet."""
  return jax.nn.dot_product_attention(
      q, k, v, is_causal=True, implementation="cudnn" if jax.default_backend() == "gpu" else None)


def forward_and_backward(attention):
  """jit(fwd) and jit(fwd+bwd) of `attention(q, k, v, *ids)`.

  `forward(q, k, v, *ids)`; `both(q, k, v, *ids, do)` returns the output and the VJP
  w.r.t. q, k, v of the cotangent `do`.
  """
  forward = jax.jit(attention)

  @jax.jit
  def both(q, k, v, *ids_and_do):
    *ids, do = ids_and_do
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, *ids), q, k, v)
    return out, vjp(do)

  return forward, both


def main(argv=None) -> None:
  args = parse_args(argv)
  block_sizes = [tuple(int(x) for x in spec.split(",")) for spec in args.block_sizes]
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}",
        flush=True)
  impls = implementations(block_sizes, args.smoke)
  rows = []
  for dim in args.head_dims:
    for length in args.lengths:
      keys = jax.random.split(jax.random.PRNGKey(length + dim), 4)
      shape = (args.batch, length, args.heads, dim)
      q, k, v, do = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
      ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (args.batch, length))
      for name, attention in impls.items():
        forward, both = forward_and_backward(attention)
        try:
          fwd_ms = median_ms(forward, (q, k, v, ids), args.warmup, args.reps)
          bwd_ms = median_ms(both, (q, k, v, ids, do), args.warmup, args.reps)
        except Exception as error:  # pylint: disable=broad-except  (e.g. OOM, no cuDNN)
          print(f"  {name}: failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
          fwd_ms = bwd_ms = float("nan")
        rows.append((dim, length, name, fwd_ms, bwd_ms))
        print(f"D={dim} N={length} {name:36s} fwd {fwd_ms:9.3f} ms  fwd+bwd {bwd_ms:9.3f} ms",
              flush=True)
  text = table(rows, args, device)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)
  print(text)


def table(rows, args, device) -> str:
  """Markdown: one row per (D, N, implementation), with ratios to the reference and cuDNN."""
  base = {(d, n, name): (f, b) for d, n, name, f, b in rows}
  ref_name = "xla masked reference"
  fast_name = next(name for _, _, name, _, _ in rows if "causal" in name)
  lines = [f"Device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
           f"bf16, batch {args.batch}, {args.heads} heads, left-to-right ids; median of "
           f"{args.reps} runs after {args.warmup} warm-up runs"
           + (" (SMOKE: Pallas interpreter on CPU, not a timing)" if args.smoke else "") + ".",
           "",
           f"| D | N | implementation | fwd ms | fwd+bwd ms | ref / this (fwd+bwd) | "
           f"this / {fast_name} (fwd+bwd) |",
           "|---|---|---|---|---|---|---|"]
  for d, n, name, fwd_ms, bwd_ms in rows:
    ref = base[(d, n, ref_name)][1]
    fast = base[(d, n, fast_name)][1]
    lines.append(f"| {d} | {n} | {name} | {fwd_ms:.3f} | {bwd_ms:.3f} | {ref / bwd_ms:.2f}x | "
                 f"{bwd_ms / fast:.2f}x |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  main()
