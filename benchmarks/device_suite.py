"""The one prepared device run: kernel checks and timings, train steps with MFU, sampling.

Run through `benchmarks/device_suite.sh` (which sets the output folder). Needs only jax,
flax, optax, numpy and this package: nothing it imports from armd_jax pulls in grain,
seqio, ml-collections, clu or TensorFlow (`--poison` makes any such import fail, as the
CPU smoke test does). Sections, in priority order, each in its own try/except so that
one failure is recorded in the json and the others still run, under a global time
budget (`--budget_s`):

  env             device, jax version, the card's peak bf16 rate used for MFU.
  kernel_check    the Pallas kernel against the jnp reference on the device, values and
                  (dq, dk, dv), bf16 and float32, for every benchmarked shape (one
                  stream and ARMD's two-stream layout); any miss fails the run (exit 1).
  attention       fwd and fwd+bwd ms of the kernel, the XLA masked reference and
                  `jax.nn.dot_product_attention(implementation='cudnn', is_causal=True)`
                  for N = 1,024 .. 8,192 (left-to-right ids: the block-id mask is then the
                  causal mask), plus the two-stream layout (kernel vs reference).
  train_step      GPT-2-small-size ARMD and AR train steps: the trainer's own
                  `make_train_step` (forward, backward, clipping, AdamW, EMA, the order
                  drawn in the step), bf16, XLA attention and the kernel: ms/step and MFU
                  (FLOPs from XLA's cost analysis of the XLA-attention program, over the
                  card's peak).
  sampling        sequential vs S=4 strided generation at N = 1,024, batch 8 and batch 1;
                  best of two runs, compile excluded.
  race            (not in the default --sections: its own run, `RACE=1` in the .sh) the
                  GPT-2-small-size ARMD and AR (Pallas attention on a GPU, byte vocabulary)
                  trained with the same step for --race_s seconds each on the same batches
                  of `benchmarks/race_corpus.npz` (the stdlib's sources, see race_corpus.py);
                  exact held-out perplexity at equal wall clock and at equal steps; ARMD's
                  S=4 strided generation time at batch 1 and 8 with the trained weights.

  python benchmarks/device_suite.py --out_dir=$OUT            # on the device
  python benchmarks/device_suite.py --smoke --poison --out_dir=/tmp/x   # CPU, interpret
  python benchmarks/device_suite.py --sections=env,race --budget_s=540 --out_dir=$OUT
  python benchmarks/device_suite.py --smoke --sections=env,race --out_dir=/tmp/x  # seconds
Writes `device_suite.json` and prints a summary table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

FORBIDDEN = ("grain", "seqio", "ml_collections", "clu", "tensorflow", "tensorflow_datasets")


class _RefuseImports:
  """A meta-path finder that makes importing any FORBIDDEN top-level module fail."""

  def find_spec(self, name, path=None, target=None):  # pylint: disable=unused-argument
    if name.split(".")[0] in FORBIDDEN:
      raise ImportError(f"device_suite: {name} must not be imported (not on the device)")
    return None


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", default=os.environ.get("OUT", "/tmp/device_suite"))
  parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, interpret mode")
  parser.add_argument("--poison", action="store_true", help="fail on grain/seqio/... imports")
  parser.add_argument("--budget_s", type=float, default=420.0)
  parser.add_argument("--sections", default="env,tile_sweep,kernel_check,attention,train_step,"
                      "sampling,train_step_ar_pallas,train_flops")
  parser.add_argument("--lengths", default="1024,2048,4096,8192")
  parser.add_argument("--block_sizes", default="128,64,64,128",
                      help="block_q,block_kv,block_q_dkv,block_kv_dkv of the kernel unless "
                      "the sweep picks others")
  parser.add_argument("--sweep64", default="128,64,64,128;64,64,64,64;128,128,64,128;"
                      "128,64,64,64", help="tile sizes timed (fwd+bwd, N=2048) for D=64; the "
                      "fastest is used for every D=64 shape")
  parser.add_argument("--sweep128", default="128,64,64,64;64,64,64,64;64,32,32,64",
                      help="the same for D=128")
  parser.add_argument("--train_batch", type=int, default=16)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--race_s", type=float, default=None,
                      help="race: training seconds of each model, compile excluded "
                      "(default 150; smoke 3)")
  parser.add_argument("--race_lr", type=float, default=3e-4, help="race: peak learning rate")
  parser.add_argument("--race_eval_batches", type=int, default=32,
                      help="race: held-out batches (of --train_batch windows) scored")
  parser.add_argument("--race_attention", default="",
                      help="race: ModelConfig.attention of both models ('' = pallas on a "
                      "GPU or TPU, xla elsewhere)")
  parser.add_argument("--race_sync_every", type=int, default=10,
                      help="race: steps between clock readings (each waits for the step)")
  parser.add_argument("--race_corpus", default=os.path.join(HERE, "race_corpus.npz"))
  return parser.parse_args()


ARGS = parse_args()
if ARGS.poison:
  sys.meta_path.insert(0, _RefuseImports())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from armd_jax import ModelConfig, build_model, orders, sampling  # noqa: E402
from armd_jax.kernels import BlockSizes, block_causal_attention_reference  # noqa: E402
from armd_jax.kernels.flash import block_causal_flash_attention  # noqa: E402
from armd_jax.train import partitioning  # noqa: E402
from armd_jax.train import state as state_lib  # noqa: E402
from armd_jax.train.settings import MeshConfig, OptimConfig, OrderConfig  # noqa: E402

sys.path.insert(0, HERE)  # after armd_jax: attention_kernel then finds the whole package
import attention_kernel  # noqa: E402  pylint: disable=g-bad-import-order
import race_corpus  # noqa: E402  pylint: disable=g-bad-import-order

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s (SXM datasheets)
START = time.time()
RESULTS = {"argv": sys.argv[1:], "sections": {}, "failed_checks": []}


def log(*parts) -> None:
  print(f"[{time.time() - START:6.1f}s]", *parts, flush=True)


def left_s() -> float:
  return ARGS.budget_s - (time.time() - START)


def save() -> None:
  os.makedirs(ARGS.out_dir, exist_ok=True)
  with open(os.path.join(ARGS.out_dir, "device_suite.json"), "w", encoding="utf-8") as f:
    json.dump(RESULTS, f, indent=1, default=str)


def section(name: str, fn, min_left_s: float) -> None:
  """Runs fn() -> dict into RESULTS['sections'][name]; failures are recorded, not raised."""
  if name not in ARGS.sections.split(","):
    return
  if left_s() < min_left_s:
    RESULTS["sections"][name] = {"ok": False, "error": f"skipped: {left_s():.0f} s of budget "
                                 f"left, needs {min_left_s:.0f}"}
    log(name, "SKIPPED (budget)")
    save()
    return
  log("==", name)
  begin = time.time()
  out = {}
  try:
    fn(out)
    out["ok"] = True
  except Exception as error:  # pylint: disable=broad-except
    out.update(ok=False, error=f"{type(error).__name__}: {str(error)[:2000]}",
               traceback=traceback.format_exc()[-4000:])
    log(name, "FAILED:", out["error"][:500])
  out["seconds"] = round(time.time() - begin, 1)
  RESULTS["sections"][name] = out
  save()


def median_ms(fn, *args, reps=None) -> float:
  """Median wall ms of fn(*args) after 2 warm-up calls (compile included there)."""
  return attention_kernel.median_ms(fn, args, 2, reps or ARGS.reps)


# -- attention ---------------------------------------------------------------------


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def block_sizes_from(spec: str) -> BlockSizes:
  return BlockSizes(*(int(x) for x in spec.split(",")))


CHOSEN = {}  # head dim -> tile spec picked by the sweep


def sizes_for(dim: int) -> BlockSizes:
  """Tiles for head dim `dim`: the sweep's pick, else --block_sizes (smoke: 8 x 8)."""
  if dim in CHOSEN:
    return block_sizes_from(CHOSEN[dim])
  return BlockSizes(8, 8) if ARGS.smoke else block_sizes_from(ARGS.block_sizes)


def platform_backend() -> str:
  """The kernel backend named for this platform ('auto' where there is none: CPU)."""
  return "gpu" if on_gpu() else "tpu" if jax.default_backend() == "tpu" else "auto"


def kernel_fn(sizes: BlockSizes, segments=None, backend=None):
  """attention(q, k, v, q_ids, kv_ids) through the Pallas kernel for this platform."""
  if backend is None:
    backend = platform_backend()
  return lambda q, k, v, qi, ki: block_causal_flash_attention(
      q, k, v, qi, ki, block_sizes=sizes, backend=backend, interpret=ARGS.smoke,
      q_segments=segments)


def reference_fn(q, k, v, qi, ki):
  return block_causal_attention_reference(q, k, v, qi, ki)


def cudnn_fn(q, k, v, qi, ki):  # ids unused: left-to-right ids are the causal mask
  del qi, ki
  return attention_kernel.causal_attention(q, k, v)


def attention_shapes():
  """(name, batch, N, heads, D, layout) of every benchmarked shape."""
  heads, dim = (2, 16) if ARGS.smoke else (12, 64)
  lengths = [40] if ARGS.smoke else [int(n) for n in ARGS.lengths.split(",")]
  tokens = 80 if ARGS.smoke else 16384
  shapes = [(f"one_stream N={n}", max(1, tokens // n), n, heads, dim, "one") for n in lengths]
  if not ARGS.smoke:
    shapes.append(("one_stream N=2048 D=128", 8, 2048, 8, 128, "one"))
  shapes += [(f"two_stream N={n}", max(1, tokens // n), n, heads, dim, "two")
             for n in lengths[:2]]
  return shapes


def make_inputs(batch, n, heads, dim, layout, dtype, seed):
  """q, k, v, do, q_ids, kv_ids, segments for left-to-right ids in `layout`."""
  ids = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (batch, n))
  if layout == "one":
    q_ids = kv_ids = ids
    nq, nk, segments = n, n, None
  else:  # content rows (BOS id 0, then ids b) and query rows (ids b - 1); keys = content
    kv_ids = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), ids], axis=1)
    q_ids = jnp.concatenate([kv_ids, ids - 1], axis=1)
    nq, nk, segments = 2 * n + 1, n + 1, (n + 1, n)
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, nq, heads, dim), dtype)
  k = jax.random.normal(keys[1], (batch, nk, heads, dim), dtype)
  v = jax.random.normal(keys[2], (batch, nk, heads, dim), dtype)
  do = jax.random.normal(keys[3], (batch, nq, heads, dim), dtype)
  return q, k, v, do, q_ids, kv_ids, segments


def value_and_vjp(attention, q_ids, kv_ids):
  """(q, k, v, do) -> (out, (dq, dk, dv)) of attention(q, k, v, q_ids, kv_ids)."""

  def run(q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, q_ids, kv_ids), q, k, v)
    return out, vjp(do)

  return run


def rel_err(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  if not np.all(np.isfinite(x)):
    return float("inf")
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def check_one(sizes, batch, n, heads, dim, layout, dtype) -> dict:
  """Relative L2 errors of the kernel's out, dq, dk, dv against the float32 reference."""
  q, k, v, do, qi, ki, seg = make_inputs(batch, n, heads, dim, layout, dtype, seed=n + dim)
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  kernel = jax.jit(value_and_vjp(kernel_fn(sizes, seg), qi, ki))
  ref = jax.jit(value_and_vjp(reference_fn, qi, ki))
  with jax.default_matmul_precision("highest"):
    ref_out, ref_grads = ref(f32(q), f32(k), f32(v), f32(do))
  got_out, got_grads = kernel(q, k, v, do)
  return {key: rel_err(a, b) for key, a, b in zip(
      ("out", "dq", "dk", "dv"), (got_out,) + tuple(got_grads), (ref_out,) + tuple(ref_grads))}


def kernel_check(out: dict) -> None:
  tolerance = {"bfloat16": 2e-2, "float32": 5e-3}  # f32: Triton dots may use tf32
  rows = []
  shapes = attention_shapes()
  f32_shapes = {shapes[0][0], next(s[0] for s in shapes if s[-1] == "two")}
  for name, batch, n, heads, dim, layout in shapes:
    sizes = sizes_for(dim)
    dtypes = (jnp.bfloat16, jnp.float32) if name in f32_shapes else (jnp.bfloat16,)
    if ARGS.smoke:  # CPU: one dtype per layout
      dtypes = (jnp.bfloat16,) if layout == "one" else (jnp.float32,)
    for dtype in dtypes:
      dname = jnp.dtype(dtype).name
      try:
        errors = check_one(sizes, batch, n, heads, dim, layout, dtype)
      except Exception as error:  # pylint: disable=broad-except  (recorded, run goes on)
        errors = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
      ok = "error" not in errors and all(e <= tolerance[dname] for e in errors.values())
      rows.append(dict(shape=name, batch=batch, heads=heads, dim=dim, dtype=dname, ok=ok,
                       block_sizes=str(sizes), **{f"rel_err_{key}": e for key, e in errors.items()}))
      log(f"check {name} B={batch} {dname}: {'ok' if ok else 'MISMATCH'} {errors}")
      if not ok:
        RESULTS["failed_checks"].append(f"{name} {dname}")
  out["rows"] = rows
  out["tolerance_rel_l2"] = tolerance
  if platform_backend() == "auto":  # CPU: the checks above ran backend='auto' itself
    out["auto_backend_max_abs_diff"] = None
    return
  # backend='auto' (what the model uses: platform_dependent at lowering) on one shape.
  _, batch, n, heads, dim, layout = shapes[0]
  sizes = sizes_for(dim)
  q, k, v, do, qi, ki, seg = make_inputs(batch, n, heads, dim, layout, jnp.bfloat16, seed=3)
  auto = jax.jit(value_and_vjp(kernel_fn(sizes, seg, backend="auto"), qi, ki))(q, k, v, do)
  explicit = jax.jit(value_and_vjp(kernel_fn(sizes, seg), qi, ki))(q, k, v, do)
  out["auto_backend_max_abs_diff"] = max(
      float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
      for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(explicit)))
  log("backend='auto' vs explicit:", out["auto_backend_max_abs_diff"])


def time_attention(fn, q, k, v, do, qi, ki, prefix: str, row: dict) -> None:
  """Adds {prefix}_fwd_ms and {prefix}_fwd_bwd_ms (or {prefix}_error) to row."""
  forward, both = attention_kernel.forward_and_backward(fn)
  try:
    row[f"{prefix}_fwd_ms"] = median_ms(forward, q, k, v, qi, ki)
    row[f"{prefix}_fwd_bwd_ms"] = median_ms(both, q, k, v, qi, ki, do)
  except Exception as error:  # pylint: disable=broad-except  (e.g. OOM, no cuDNN)
    row[f"{prefix}_error"] = f"{type(error).__name__}: {str(error)[:300]}"


def tile_sweep(out: dict) -> None:
  """Times the kernel's tile choices at N=2048 (fwd+bwd) and keeps the fastest per D."""
  rows = []
  n, batch = (40, 2) if ARGS.smoke else (2048, 8)
  sweeps = (((16, 2, "16,8"),) if ARGS.smoke else
            ((64, 12, ARGS.sweep64), (128, 8, ARGS.sweep128)))
  for dim, heads, specs in sweeps:
    q, k, v, do, qi, ki, _ = make_inputs(batch, n, heads, dim, "one", jnp.bfloat16, seed=9)
    best = None
    for spec in [s for s in specs.split(";") if s]:
      if left_s() < 300:
        break
      row = dict(dim=dim, n=n, batch=batch, heads=heads, block_sizes=spec)
      time_attention(kernel_fn(block_sizes_from(spec)), q, k, v, do, qi, ki, "kernel", row)
      rows.append(row)
      log("sweep", row)
      if "kernel_fwd_bwd_ms" in row and (best is None or row["kernel_fwd_bwd_ms"] < best[0]):
        best = (row["kernel_fwd_bwd_ms"], spec)
    if best:
      CHOSEN[dim] = best[1]
  out.update(rows=rows, chosen={str(k): v for k, v in CHOSEN.items()},
             note="block_q,block_kv,block_q_dkv,block_kv_dkv; the fastest fwd+bwd is used for "
             "every shape of that head dim (checks and timings)")


def attention(out: dict) -> None:
  rows = []
  cudnn_name = "cudnn_causal" if on_gpu() else "xla_causal_dpa"
  for name, batch, n, heads, dim, layout in attention_shapes()[:1 if ARGS.smoke else None]:
    if left_s() < 60:
      rows.append(dict(shape=name, skipped="budget"))
      continue
    q, k, v, do, qi, ki, seg = make_inputs(batch, n, heads, dim, layout, jnp.bfloat16, seed=7)
    sizes = sizes_for(dim)
    row = dict(shape=name, batch=batch, n=n, heads=heads, dim=dim, layout=layout,
               block_sizes=str(sizes))
    time_attention(kernel_fn(sizes, seg), q, k, v, do, qi, ki, "kernel", row)
    time_attention(reference_fn, q, k, v, do, qi, ki, "xla_reference", row)
    if layout == "one":
      time_attention(cudnn_fn, q, k, v, do, qi, ki, cudnn_name, row)
    for other in ("xla_reference", cudnn_name):
      for kind in ("fwd", "fwd_bwd"):
        if f"{other}_{kind}_ms" in row and f"kernel_{kind}_ms" in row:
          row[f"kernel_over_{other}_{kind}"] = row[f"kernel_{kind}_ms"] / row[f"{other}_{kind}_ms"]
    log(name, {key: round(val, 3) if isinstance(val, float) else val for key, val in row.items()
               if key.endswith("ms") or key.startswith("kernel_over") or key.endswith("error")})
    rows.append(row)
  out["rows"] = rows
  out["dtype"] = "bfloat16"
  out["ids"] = "left-to-right (block-id mask == causal mask)"
  out["ratios"] = "kernel_over_X = kernel ms / X ms (below 1: the kernel is faster)"


# -- train steps -------------------------------------------------------------------


def gpt2_small(kind: str, attention_impl: str) -> ModelConfig:
  if ARGS.smoke:
    return ModelConfig(vocab_size=64, kind=kind, d_model=32, num_layers=2, num_heads=2,
                       mlp_dim=64, max_len=32, dtype="bfloat16", attention=attention_impl,
                       pallas_block_q=8, pallas_block_kv=8, pallas_interpret=True)
  return ModelConfig(vocab_size=50257, kind=kind, d_model=768, num_layers=12, num_heads=12,
                     mlp_dim=3072, max_len=1024, dtype="bfloat16", attention=attention_impl,
                     pallas_block_q=sizes_for(64).block_q, pallas_block_kv=sizes_for(64).block_kv)


def train_order(kind: str) -> OrderConfig:
  """The order drawn in the step: ARMD a progressive permutation with 16 shuffled tokens
  from the first step, AR left to right."""
  if kind == "armd":
    return OrderConfig(kind="progressive_permutation", i_ar=0, i_perm=1, rho=16)
  return OrderConfig(kind="left_to_right")


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The trainer's step for one model on a one-device mesh, and what feeds it."""

  model: Any
  step: Any  # jitted train_step(state, batch) -> (state, metrics); the state is donated
  state: Any  # the initial TrainState
  shardings: Any  # TrainState of NamedShardings
  batch_shard: Any  # NamedSharding of a [B, N] batch


def train_setup(config: ModelConfig, length: int, optim: OptimConfig,
                num_steps: int) -> TrainSetup:
  """`armd_jax.train.state.make_train_step` as `python -m armd_jax.main` runs it (forward,
  backward, clipping, AdamW, the parameter EMA when optim keeps one, the order of
  `train_order` drawn inside the step), on a one-device mesh, with a fresh state (seed 0).
  """
  model = build_model(config)
  mesh = partitioning.make_mesh(MeshConfig(shape=(1,) * len(partitioning.MESH_AXES)),
                                jax.devices()[:1])
  rules = partitioning.DEFAULT_RULES
  state, shardings = state_lib.create_train_state(model, optim, num_steps, length, 0, mesh,
                                                  rules)
  batch_shard = partitioning.batch_sharding(mesh, rules)
  step = state_lib.make_train_step(model, train_order(config.kind), optim, num_steps,
                                   shardings, batch_shard, rules)
  return TrainSetup(model, step, state, shardings, batch_shard)


def device_batch(tokens: np.ndarray, batch_shard) -> dict:
  """{'tokens', 'mask'} int32 [B, N] on the mesh from host tokens [B, N] (no padding)."""
  tokens = np.asarray(tokens, np.int32)
  return partitioning.global_batch({"tokens": tokens, "mask": np.ones_like(tokens)},
                                   batch_shard)


def train_step_fn(config: ModelConfig, batch: int, length: int):
  """(jitted step, initial TrainState, batch) of the trainer's own train step.

  `train_setup` with AdamW at 3e-4, weight decay 0.1, EMA 0.999, cosine over 10,000
  steps, and a batch of uniform random tokens [batch, length].
  """
  optim = OptimConfig(learning_rate=3e-4, weight_decay=0.1, ema_decay=0.999)
  setup = train_setup(config, length, optim, num_steps=10_000)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (batch, length), 0,
                                         config.vocab_size), np.int32)
  return setup.step, setup.state, device_batch(tokens, setup.batch_shard)


def lowered_flops(lowered) -> float:
  """FLOPs of XLA's cost analysis of the lowered (not yet optimised) step.

  The same on every platform. The compiled program's own analysis is not used: on the
  H200 (jax 0.11.2) it gave ARMD and AR the same FLOPs to 0.2%, about half of either,
  i.e. it misses the cuBLAS matrix products.
  """
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def train_flops(out: dict) -> None:
  """Model FLOPs of the ARMD and AR steps (lowered HLO only: runs on any host); the
  train_step section's count of the same lowered step where it has one."""
  length = 32 if ARGS.smoke else 1024
  batch = 2 if ARGS.smoke else ARGS.train_batch
  rows, source = {}, {}
  for kind in ("armd", "ar"):
    timed = TRAIN_ROWS.get(f"{kind}_xla", {})
    if "xla_flops" in timed:  # the same config, batch and length, lowered there
      rows[kind], source[kind] = timed["xla_flops"], "train_step"
    else:
      step, state, data = train_step_fn(gpt2_small(kind, "xla"), batch, length)
      rows[kind], source[kind] = lowered_flops(step.lower(state, data)), "lowered here"
    log("flops", kind, rows[kind], source[kind])
  out.update(flops=rows, source=source, ratio_armd_over_ar=rows["armd"] / rows["ar"],
             batch=batch, length=length)


def time_train_step(config, batch, length, reps):
  step, state, data = train_step_fn(config, batch, length)
  begin = time.time()
  lowered = step.lower(state, data)
  model_flops = lowered_flops(lowered)
  compiled = lowered.compile()
  compile_s = time.time() - begin
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  state, metrics = compiled(state, data)
  first_loss = float(metrics["loss"])
  state, metrics = compiled(state, data)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(reps):
    begin = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - begin) * 1e3)
  return dict(ms=statistics.median(times), xla_flops=model_flops, compiled_xla_flops=flops,
              compile_s=round(compile_s, 1), first_loss=first_loss,
              loss=float(metrics["loss"]))


TRAIN_ROWS = {}


def train_variants(out: dict, variants) -> None:
  """Times (kind, attention) train steps into TRAIN_ROWS; ratios and MFU into out."""
  length = 32 if ARGS.smoke else 1024
  batch = 2 if ARGS.smoke else ARGS.train_batch
  reps = 2 if ARGS.smoke else 5
  peak = RESULTS["sections"].get("env", {}).get("peak_bf16_flops")
  for kind, impl in variants:
    if left_s() < 45:
      TRAIN_ROWS[f"{kind}_{impl}"] = dict(skipped="budget")
      continue
    try:
      TRAIN_ROWS[f"{kind}_{impl}"] = time_train_step(gpt2_small(kind, impl), batch, length,
                                                     reps)
    except Exception as error:  # pylint: disable=broad-except
      TRAIN_ROWS[f"{kind}_{impl}"] = dict(error=f"{type(error).__name__}: {str(error)[:500]}")
    log(kind, impl, TRAIN_ROWS[f"{kind}_{impl}"])
  for kind in ("armd", "ar"):  # model FLOPs of the XLA-attention program for both impls
    flops = TRAIN_ROWS.get(f"{kind}_xla", {}).get("xla_flops")
    for impl in ("xla", "pallas"):
      row = TRAIN_ROWS.get(f"{kind}_{impl}", {})
      if flops and "ms" in row and peak:
        row["mfu"] = flops / (row["ms"] * 1e-3) / peak
  armd, ar = TRAIN_ROWS.get("armd_xla", {}), TRAIN_ROWS.get("ar_xla", {})
  if armd.get("xla_flops") and ar.get("xla_flops"):
    out["flop_ratio_armd_over_ar"] = armd["xla_flops"] / ar["xla_flops"]
    for impl in ("xla", "pallas"):
      a, b = TRAIN_ROWS.get(f"armd_{impl}", {}), TRAIN_ROWS.get(f"ar_{impl}", {})
      if "ms" in a and "ms" in b:
        out[f"time_ratio_armd_over_ar_{impl}"] = a["ms"] / b["ms"]
  out.update(rows=TRAIN_ROWS, batch=batch, length=length, model="GPT-2-small size: 12 layers "
             "(6 two-stream for ARMD), d=768, 12 heads, MLP 3072, vocab 50257, bf16 compute, "
             "f32 params; the trainer's make_train_step: AdamW, clipping, EMA 0.999, order "
             "drawn in the step (ARMD: progressive permutation with 16 shuffled tokens; AR: "
             "left to right)", pallas_tiles=str(sizes_for(64)),
             flops_source="XLA cost_analysis of the XLA-attention step (the masked reference "
             "computes full N x N attention; Pallas calls are not counted by XLA, so the same "
             "model FLOPs serve both implementations)")


def train_step(out: dict) -> None:
  variants = (("armd", "xla"), ("ar", "xla"), ("armd", "pallas"))
  train_variants(out, variants[:2] if ARGS.smoke else variants)  # CPU: no interpreted model


def train_step_ar_pallas(out: dict) -> None:
  if ARGS.smoke:  # CPU: the interpreted kernel inside a model is tested in tests/
    out["skipped"] = "smoke"
    return
  train_variants(out, (("ar", "pallas"),))


# -- sampling -----------------------------------------------------------------------


def time_generation(model, params, batch: int, length: int, streams: int) -> dict:
  """Wall seconds of `sampling.generate` (best of two timed runs after one that compiles),
  its network calls and tokens per second."""

  def run(seed):
    result = sampling.generate(model, params, jax.random.PRNGKey(seed), batch_size=batch,
                               length=length, streams=streams)
    return result.tokens, result.num_calls

  begin = time.time()
  jax.block_until_ready(run(0)[0])
  first_s = time.time() - begin
  seconds = float("inf")
  for seed in (1, 2):
    begin = time.perf_counter()
    tokens, calls = run(seed)
    jax.block_until_ready(tokens)
    seconds = min(seconds, time.perf_counter() - begin)
  return dict(seconds=seconds, calls=int(calls), first_run_s=round(first_s, 1),
              tokens_per_second=batch * length / seconds)


def sampling_speed(out: dict) -> None:
  """Sequential vs S = 4 strided generation at batch 8 and batch 1."""
  length = 16 if ARGS.smoke else 1024
  config = gpt2_small("armd", "xla")
  model = build_model(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                               orders.left_to_right(1, 8))
  rows = {}
  for batch in (8, 1):
    for streams in (1, 4):
      key = f"B={batch},S={streams}"
      rows[key] = time_generation(model, params, batch, length, streams)
      log("sampling", key, rows[key])
  out.update(rows=rows, length=length, model="GPT-2-small size ARMD (bf16, random "
             "weights), KV cache",
             speedup_s4={f"B={b}": rows[f"B={b},S=1"]["seconds"] / rows[f"B={b},S=4"]["seconds"]
                         for b in (8, 1)})


# -- training race ------------------------------------------------------------------


def race_config(kind: str, vocab_size: int, length: int) -> ModelConfig:
  """GPT-2-small size (smoke: tiny) over the byte vocabulary; `--race_attention`, by
  default the Pallas kernel on a GPU or TPU (its default tiles) and XLA elsewhere."""
  attention = ARGS.race_attention or ("xla" if jax.default_backend() == "cpu" else "pallas")
  if ARGS.smoke:
    return ModelConfig(vocab_size=vocab_size, kind=kind, d_model=32, num_layers=2,
                       num_heads=2, mlp_dim=64, max_len=length, dtype="bfloat16",
                       attention=attention, pallas_block_q=8, pallas_block_kv=8,
                       pallas_interpret=True)
  return ModelConfig(vocab_size=vocab_size, kind=kind, d_model=768, num_layers=12,
                     num_heads=12, mlp_dim=3072, max_len=length, dtype="bfloat16",
                     attention=attention)


def race_batch() -> int:
  """Sequences per race step (smoke: 2)."""
  return 2 if ARGS.smoke else ARGS.train_batch


def race_seconds() -> float:
  """Training seconds of each racer: --race_s, else 150 (smoke: 3)."""
  if ARGS.race_s is not None:
    return ARGS.race_s
  return 3.0 if ARGS.smoke else 150.0


def race_needs_s() -> float:
  """Budget the race section needs: both runs, compiles, scoring and decoding."""
  return 2 * race_seconds() + (20.0 if ARGS.smoke else 150.0)


def copy_tree(tree):
  """A device copy of every array (what a later donating step cannot overwrite)."""
  return jax.tree.map(jnp.copy, tree)


def race_data(setup: TrainSetup, train_windows: np.ndarray, step: int):
  """(row indices [B], device batch [B, N]) that race step `step` trains on."""
  rows = race_corpus.batch_rows(step, train_windows.shape[0], race_batch())
  return rows, device_batch(train_windows[rows], setup.batch_shard)


def race_compile(setup: TrainSetup, train_windows: np.ndarray):
  """(compiled step, seconds) of setup's train step for the race's batches."""
  begin = time.time()
  compiled = setup.step.lower(setup.state, race_data(setup, train_windows, 0)[1]).compile()
  return compiled, time.time() - begin


def race_run(setup: TrainSetup, compiled, train_windows: np.ndarray, budget_s: float,
             equal_step: int = 0) -> dict:
  """Trains from setup.state (donated) on the race's batches for `budget_s` seconds.

  The clock is read every --race_sync_every steps, after waiting for the step; the
  first reading at or past `budget_s` ends the timed run ('wall': its step, seconds,
  parameters, last loss). With `equal_step` > 0 the parameters after that many steps
  are kept too ('equal'), training on past the budget if needed. Step i reads
  `race_corpus.batch_rows(i, ...)`; 'digest' is a sha256 of every row index read so far.

  Returns:
    {'wall': {...}, 'equal': {...} or None, 'curve': [[step, seconds, loss]],
     'total_steps'}.
  """
  state, digest, curve = setup.state, hashlib.sha256(), []
  wall, equal, step = None, None, 0
  begin = time.perf_counter()
  while wall is None or (equal_step and equal is None):
    rows, tokens = race_data(setup, train_windows, step)
    digest.update(rows.tobytes())
    state, metrics = compiled(state, tokens)
    step += 1
    if step == equal_step:
      equal = dict(step=step, params=copy_tree(state.params), digest=digest.hexdigest())
    if wall is None and step % ARGS.race_sync_every == 0:
      loss = float(metrics["loss"])  # waits for the step
      seconds = time.perf_counter() - begin
      curve.append([step, round(seconds, 3), loss])
      if not np.isfinite(loss):
        raise FloatingPointError(f"loss {loss} at step {step}")
      if seconds >= budget_s:
        wall = dict(step=step, seconds=seconds, params=copy_tree(state.params),
                    digest=digest.hexdigest(), loss=loss)
  jax.block_until_ready(state.params)
  return dict(wall=wall, equal=equal, curve=curve, total_steps=step)


def held_out_nll(eval_step, setup: TrainSetup, params, eval_windows: np.ndarray) -> dict:
  """Exact held-out NLL (left to right; nats per byte token) of params over eval_windows
  [E, N] through the trainer's eval step (`state_lib.make_eval_step`), B at a time."""
  batch = race_batch()
  nll, tokens = 0.0, 0.0
  for start in range(0, eval_windows.shape[0] - batch + 1, batch):
    sums = eval_step(params, device_batch(eval_windows[start:start + batch],
                                          setup.batch_shard), jax.random.PRNGKey(0))
    nll, tokens = nll + float(sums["nll_sum"]), tokens + float(sums["num_tokens"])
  return dict(nll=nll / tokens, ppl=float(np.exp(nll / tokens)),
              bits_per_byte=float(nll / tokens / np.log(2.0)), tokens=int(tokens))


def race_racer(kind: str, vocab_size: int, length: int, optim: OptimConfig,
               train_windows: np.ndarray):
  """(setup, compiled step, compile seconds, error) of one racer; a Pallas model that
  fails to compile is built again with XLA attention (its error returned)."""
  config = race_config(kind, vocab_size, length)
  setup = train_setup(config, length, optim, num_steps=1_000_000)
  try:
    return (setup,) + race_compile(setup, train_windows) + (None,)
  except Exception as error:  # pylint: disable=broad-except
    if config.attention_implementation != "pallas":
      raise
    message = f"{type(error).__name__}: {str(error)[:500]}"
    log("race", kind, "Pallas step failed to compile; XLA attention instead:", message)
    setup = train_setup(config.replace(attention="xla"), length, optim, num_steps=1_000_000)
    return (setup,) + race_compile(setup, train_windows) + (message,)


def race(out: dict) -> None:
  """AR and ARMD trained for the same seconds on the same batches, then scored.

  ARMD trains first for `race_seconds()`; AR then trains as long, keeping its parameters
  at the step ARMD reached (training on past its budget if it is the slower). Both are
  scored by the exact left-to-right held-out NLL at equal wall clock (each one's last
  timed step) and at equal steps (ARMD's last step), and ARMD's S = 4 strided generation
  of N tokens is timed at batch 1 and batch 8 with its trained weights.
  """
  corpus = race_corpus.load(ARGS.race_corpus)
  length, batch, budget_s = (32 if ARGS.smoke else 1024), race_batch(), race_seconds()
  train_windows = race_corpus.windows(corpus.train, length)
  eval_windows = race_corpus.windows(corpus.held_out, length)
  eval_windows = eval_windows[race_corpus.eval_rows(
      eval_windows.shape[0], (2 if ARGS.smoke else ARGS.race_eval_batches) * batch)]
  optim = OptimConfig(learning_rate=ARGS.race_lr * (10 if ARGS.smoke else 1),
                      warmup_steps=5 if ARGS.smoke else 100, schedule="constant",
                      weight_decay=0.1, ema_decay=0.0)
  out.update(length=length, batch=batch, budget_s_each=budget_s,
             sync_every=ARGS.race_sync_every, optim=dataclasses.asdict(optim), models={},
             corpus=dict(path=os.path.relpath(ARGS.race_corpus, os.path.dirname(HERE)),
                         train_tokens=int(corpus.split), train_windows=train_windows.shape[0],
                         eval_windows=eval_windows.shape[0], **corpus.meta))
  runs, setups = {}, {}
  for kind in ("armd", "ar"):
    setup, compiled, compile_s, error = race_racer(
        kind, int(corpus.meta["vocab_size"]), length, optim, train_windows)
    setups[kind] = setup
    equal_step = runs["armd"]["wall"]["step"] if kind == "ar" else 0
    runs[kind] = run = race_run(setup, compiled, train_windows, budget_s, equal_step)
    wall = run["wall"]
    out["models"][kind] = dict(
        attention=setup.model.config.attention_implementation, pallas_error=error,
        order=dataclasses.asdict(train_order(kind)), compile_s=round(compile_s, 1),
        steps=wall["step"], train_s=wall["seconds"],
        ms_per_step=1e3 * wall["seconds"] / wall["step"], last_loss=wall["loss"],
        tokens_seen=wall["step"] * batch * length,
        epochs=wall["step"] * batch * length / corpus.split, data_digest=wall["digest"],
        total_steps=run["total_steps"], curve=run["curve"])
    log("race", kind, {k: v for k, v in out["models"][kind].items() if k != "curve"})
    RESULTS["sections"]["race"] = out
    save()
  begin = time.time()
  evals = {kind: state_lib.make_eval_step(setups[kind].model, setups[kind].shardings.params,
                                          setups[kind].batch_shard) for kind in setups}
  score = lambda kind, params: held_out_nll(evals[kind], setups[kind], params,  # noqa: E731
                                            eval_windows)
  armd = score("armd", runs["armd"]["wall"]["params"])
  out["equal_wall_clock"] = dict(armd=armd, ar=score("ar", runs["ar"]["wall"]["params"]))
  equal = runs["ar"]["equal"]
  out["equal_steps"] = dict(step=equal["step"], armd=armd, ar=score("ar", equal["params"]),
                            ar_data_digest=equal["digest"],
                            same_batches=equal["digest"] == runs["armd"]["wall"]["digest"])
  out["eval_s"] = round(time.time() - begin, 1)
  log("race equal wall clock", out["equal_wall_clock"])
  log("race equal steps", out["equal_steps"])
  out["armd_decode"] = {}
  for decode_batch in (1, 8):
    key = f"B={decode_batch},S=4"
    out["armd_decode"][key] = time_generation(setups["armd"].model,
                                              runs["armd"]["wall"]["params"], decode_batch,
                                              length, 4)
    log("race decode", key, out["armd_decode"][key])
  out["note"] = ("held-out NLL: exact, left to right, nats per byte token over eval_windows "
                 "windows of the held-out files; decode: strided S = 4, N tokens, the trained "
                 "ARMD weights, best of two runs after a compiling one")


def env(out: dict) -> None:
  device = jax.devices()[0]
  kind = device.device_kind
  out.update(device_kind=kind, backend=jax.default_backend(), jax=jax.__version__,
             smoke=ARGS.smoke, budget_s=ARGS.budget_s,
             peak_bf16_flops=next((v for k, v in PEAK_BF16.items() if k in kind), None),
             forbidden_modules_loaded=sorted({m.split(".")[0] for m in sys.modules}
                                             & set(FORBIDDEN)))
  log("device", kind, jax.default_backend(), "jax", jax.__version__)


def main() -> int:
  section("env", env, 0)
  section("tile_sweep", tile_sweep, 300)
  section("kernel_check", kernel_check, 30)
  section("attention", attention, 60)
  section("train_step", train_step, 60)
  section("sampling", sampling_speed, 75)
  section("train_step_ar_pallas", train_step_ar_pallas, 45)
  section("train_flops", train_flops, 30)
  section("race", race, race_needs_s())
  RESULTS["total_seconds"] = round(time.time() - START, 1)
  save()
  summary()
  failed = [name for name, sec in RESULTS["sections"].items() if not sec.get("ok")]
  if RESULTS["failed_checks"]:
    log("KERNEL != REFERENCE on the device:", RESULTS["failed_checks"])
  if failed:
    log("sections not ok:", failed)
  return 1 if RESULTS["failed_checks"] or failed else 0


def summary() -> None:
  """A short table last (the device reply carries the end of the output)."""
  sections = RESULTS["sections"]
  print("\n== summary", {k: v.get("ok") for k, v in sections.items()})
  for row in sections.get("attention", {}).get("rows", []):
    print("  ", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                 if k.endswith("ms") or "speedup" in k or k in ("shape", "block_sizes")})
  print("   tiles:", sections.get("tile_sweep", {}).get("chosen"))
  train = sections.get("train_step_ar_pallas", sections.get("train_step", {}))
  for name, row in train.get("rows", {}).items():
    print("  ", name, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
  print("  ", {k: v for k, v in train.items() if "ratio" in k})
  print("  ", {k: v for k, v in sections.get("sampling", {}).items() if k != "rows"})
  race_results = sections.get("race", {})
  for kind, row in race_results.get("models", {}).items():
    print("   race", kind, {k: v for k, v in row.items() if k in (
        "attention", "steps", "train_s", "ms_per_step", "last_loss", "epochs")})
  for name in ("equal_wall_clock", "equal_steps", "armd_decode"):
    if name in race_results:
      print("   race", name, race_results[name])


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  sys.exit(main())
