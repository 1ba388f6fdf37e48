"""Compiles the Pallas kernel and a full ARMD train step for a TPU topology, on a CPU host.

Ahead-of-time proof that the Mosaic (TPU) kernels compile, inside `jax.shard_map`, and
what they cost in device memory next to the XLA masked reference. Nothing runs: the
programs are lowered and compiled by libtpu for a described topology.

Needs libtpu matching the installed jax (not a dependency of the package, because
merely installing it makes every jax process probe for a TPU):
  pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
or unpack the libtpu wheel somewhere and put that folder on PYTHONPATH. Then:
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/tpu_aot.py --topology v5e:2x2
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/tpu_aot.py --smoke   # small shapes only
  ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/tpu_aot.py --memory_scaling \
      --out=benchmarks/results/tpu_aot_memory_scaling.md
      # peak per-chip memory of the full train step (small model) at N = 8K, 16K, 32K
Writes a markdown table to --out (default benchmarks/results/tpu_aot.md), and with
--memory_scaling also a json beside it. The topology and the compile measurements are
`armd_jax.compile_check`'s, which compiles the real train step of a config
(`python -m armd_jax.compile_check`); this script isolates the kernel.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import armd_jax  # noqa: E402  pylint: disable=g-import-not-at-top
from armd_jax import kernels  # noqa: E402  pylint: disable=g-import-not-at-top
from armd_jax.compile_check import compile_program, tpu_devices  # noqa: E402  pylint: disable=g-import-not-at-top
from armd_jax.losses import cross_entropy  # noqa: E402  pylint: disable=g-import-not-at-top

MIB = 2.0 ** 20


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="v5e:2x2", help="TPU topology name, e.g. v5e:2x2")
  parser.add_argument("--smoke", action="store_true", help="one small kernel shape and a "
                      "small model only")
  parser.add_argument("--kernel_shapes", default=None,
                      help="kernel shapes 'B,N,H,D;...' (global; default: the standard table)")
  parser.add_argument("--skip_model", action="store_true", help="kernel rows only")
  parser.add_argument("--memory_scaling", action="store_true",
                      help="train-step peak memory of a small model at N = 8K..32K only")
  parser.add_argument("--prefix_scaling", action="store_true",
                      help="with --memory_scaling: the prefix aggregation alone (fwd+bwd, "
                      "chunked vs dense) instead of the whole train step")
  parser.add_argument("--lengths", default="8192,16384,32768")
  parser.add_argument("--attentions", default="pallas")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "tpu_aot.md"))
  return parser.parse_args()


def compile_stats(fn, *args):
  """`compile_check.Compiled` figures of jit(fn)(*args)."""
  return compile_program(jax.jit(fn), *args)


def kernel_rows(mesh: Mesh, shapes):
  """Kernel vs. reference, forward+backward, sharded over batch ('data') and heads ('model')."""
  qkv_spec, id_spec = P("data", None, "model", None), P("data", None)
  rows = []
  for batch, length, heads, dim in shapes:
    impls = (("pallas (Mosaic)", "pallas"), ("xla reference", "xla"))
    if length > 8192:  # the masked reference's [B, H, N, N] logits exceed any TPU's HBM
      impls = impls[:1]
    for name, impl in impls:
      def attention(q, k, v, q_ids, kv_ids, impl=impl):
        return kernels.block_causal_attention(q, k, v, q_ids, kv_ids, implementation=impl)

      sharded = jax.shard_map(attention, mesh=mesh, in_specs=(qkv_spec,) * 3 + (id_spec,) * 2,
                              out_specs=qkv_spec)

      def loss(q, k, v, q_ids, kv_ids, sharded=sharded):
        return sharded(q, k, v, q_ids, kv_ids).astype(jnp.float32).sum()

      x = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16,
                               sharding=NamedSharding(mesh, qkv_spec))
      ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=NamedSharding(mesh, id_spec))
      stats = compile_stats(jax.grad(loss, argnums=(0, 1, 2)), x, x, x, ids, ids)
      rows.append((f"attention fwd+bwd B={batch} N={length} H={heads} D={dim} bf16", name,
                   stats))
      print(rows[-1][:2], f"{stats.seconds:.1f} s, peak {stats.peak_bytes / MIB:.1f} MiB, "
            f"mosaic calls {stats.mosaic_calls}", flush=True)
  return rows


def model_rows(mesh: Mesh, smoke: bool, length: int | None = None,
               attentions=("pallas", "xla")):
  """A data-parallel AdamW train step of ARMD (loss fwd+bwd + update) in shard_map.

  With `length`: a small model (d=256, 4 layers) at that length, batch 1 per device.
  """
  if length is not None:
    fields = dict(vocab_size=256, d_model=256, num_layers=4, num_heads=4, mlp_dim=1024,
                  max_len=length, dtype="bfloat16")
    per_device_batch = 1
  elif smoke:
    fields = dict(vocab_size=256, d_model=256, num_layers=4, num_heads=4, mlp_dim=1024,
                  max_len=512, dtype="bfloat16")
    per_device_batch, length = 2, 512
  else:  # GPT-2 small shape (paper's OWT model): 12 layers, 6 two-stream, N = 1024
    fields = dict(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072,
                  max_len=1024, dtype="bfloat16")
    per_device_batch, length = 4, 1024
  data_size = mesh.devices.size
  flat = Mesh(mesh.devices.reshape(-1), ("data",))
  rows = []
  names = {"pallas": "pallas (Mosaic)", "xla": "xla reference"}
  for attention in attentions:
    name = names[attention]
    config = armd_jax.ModelConfig(attention=attention, **fields)
    model = armd_jax.build_model(config)
    optimizer = optax.adamw(3e-4)

    def init(rng, model=model, optimizer=optimizer):
      params = model.init(rng, jnp.zeros((1, length), jnp.int32),
                          armd_jax.orders.left_to_right(1, length))
      params = nn.meta.unbox(params)  # plain arrays; replicated over the data axis
      return params, optimizer.init(params)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))

    def step(state, tokens, block_ids, model=model, optimizer=optimizer):
      params, opt_state = state

      def loss_fn(params):
        logits = model.apply(params, tokens, block_ids)
        return cross_entropy(logits, tokens, block_ids)[0]

      loss, grads = jax.value_and_grad(loss_fn)(params)
      grads = jax.lax.pmean(grads, "data")
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), jax.lax.pmean(loss, "data")

    # Inside this shard_map the model calls the kernel on each device's rows directly.
    sharded_step = jax.shard_map(step, mesh=flat, in_specs=(P(), P("data"), P("data")),
                                 out_specs=(P(), P()))
    replicated = NamedSharding(flat, P())
    state = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    batch = jax.ShapeDtypeStruct((per_device_batch * data_size, length), jnp.int32,
                                 sharding=NamedSharding(flat, P("data")))
    stats = compile_stats(sharded_step, state, batch, batch)
    label = (f"ARMD train step d={config.d_model} L={config.num_layers} "
             f"({config.num_two_stream_layers} two-stream) N={length} "
             f"batch {per_device_batch}/device bf16")
    rows.append((label, name, stats))
    print(rows[-1][:2], f"{stats.seconds:.1f} s, peak {stats.peak_bytes / MIB:.1f} MiB, "
          f"mosaic calls {stats.mosaic_calls}", flush=True)
  return rows


def write_table(rows, path: str, topology: str, devices) -> str:
  lines = [f"TPU AOT compile on a CPU host: topology `{topology}` ({len(devices)} x "
           f"{devices[0].device_kind}), jax {jax.__version__}.",
           "Memory per device from `compiled.memory_analysis()`.", "",
           "| program | attention | compile s | Mosaic calls | peak MiB | temp MiB | args MiB "
           "| out MiB |",
           "|---|---|---|---|---|---|---|---|"]
  for label, name, c in rows:
    lines.append(f"| {label} | {name} | {c.seconds:.1f} | {c.mosaic_calls} | "
                 f"{c.peak_bytes / MIB:.1f} | {c.temp_bytes / MIB:.1f} | "
                 f"{c.argument_bytes / MIB:.1f} | {c.output_bytes / MIB:.1f} |")
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return text


def main() -> None:
  args = parse_args()
  devices = tpu_devices(args.topology)
  mesh = Mesh(np.array(devices).reshape(2, -1), ("data", "model"))
  print(f"{len(devices)} devices: {devices[0].device_kind}; mesh {dict(mesh.shape)}", flush=True)
  if args.memory_scaling:
    return memory_scaling(args, mesh, devices)
  shapes = [(4, 1024, 4, 128)] if args.smoke else [
      (8, n, 8, d) for n in (1024, 2048, 4096) for d in (64, 128)]
  if args.kernel_shapes:
    shapes = [tuple(int(x) for x in spec.split(",")) for spec in args.kernel_shapes.split(";")]
  rows = kernel_rows(mesh, shapes) + ([] if args.skip_model else model_rows(mesh, args.smoke))
  print(write_table(rows, args.out, args.topology, devices))


def prefix_rows(mesh: Mesh, smoke: bool, length: int, attentions=()):
  """Prefix aggregation fwd+bwd (d_pe 64, D 768, bf16, 1 sequence per device), chunked
  (the Pallas path's) and dense; `smoke` and `attentions` are unused."""
  del smoke, attentions
  from armd_jax.models import prefix  # pylint: disable=import-outside-toplevel
  flat = Mesh(mesh.devices.reshape(-1), ("data",))
  batch = flat.devices.size
  rows = []
  for name in ("chunked", "dense"):
    def aggregate(pe, x, ids, name=name):
      if name == "chunked":
        out, _ = prefix.prefix_aggregate_chunked(pe, x, ids, 256)
      else:
        out, _ = prefix.prefix_aggregate_dense(pe, ids, pe, x, ids)
      return out

    sharded = jax.shard_map(aggregate, mesh=flat, in_specs=(P("data"),) * 3,
                            out_specs=P("data"))

    def loss(pe, x, ids, sharded=sharded):
      return sharded(pe, x, ids).astype(jnp.float32).sum()

    spec = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(flat, P("data")))
    stats = compile_stats(jax.grad(loss, argnums=(0, 1)), spec(
        batch, length, 64), spec(batch, length, 768), spec(batch, length, dtype=jnp.int32))
    rows.append((f"prefix aggregation fwd+bwd N={length} d_pe=64 D=768 1/device bf16",
                 name, stats))
    print(rows[-1][:2], f"{stats.seconds:.1f} s, peak {stats.peak_bytes / MIB:.1f} MiB",
          flush=True)
  return rows


def memory_scaling(args, mesh: Mesh, devices) -> None:
  """Peak per-chip memory of the small-model train step over lengths; table + json."""
  import json  # pylint: disable=import-outside-toplevel
  rows, records = [], []
  for length in (int(n) for n in args.lengths.split(",")):
    make_rows = prefix_rows if args.prefix_scaling else model_rows
    for row in make_rows(mesh, False, length, tuple(args.attentions.split(","))):
      rows.append(row)
      _, name, stats = row
      records.append({"length": length, "attention": name, "compile_s": stats.seconds,
                      "mosaic_calls": stats.mosaic_calls, "peak_mib": stats.peak_bytes / MIB,
                      "temp_mib": stats.temp_bytes / MIB,
                      "args_mib": stats.argument_bytes / MIB})
      write_table(rows, args.out, args.topology, devices)
      with open(os.path.splitext(args.out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"topology": args.topology, "jax": jax.__version__,
                   "command": shlex.join(["python", *sys.argv]), "rows": records}, f, indent=2)
  print(open(args.out, encoding="utf-8").read())


if __name__ == "__main__":
  main()
