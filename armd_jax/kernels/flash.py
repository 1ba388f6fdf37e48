"""Block-id flash attention in Pallas: the public entry, dispatch and custom VJP.

Query n sees key i iff `kv_ids[i] <= q_ids[n]` (ARMD's masks; the strict mask is the
same call with query ids lowered by one). The kernels never build the [Nq, Nk] mask.

Control structure ('ranges' schedule, the default), as in splash attention and jax's
flash kernels: XLA computes, from the per-tile min / max ids, for every query tile the
range of key tiles it must visit, split into the fully visible ones (every key visible
to every query of the tile: no mask arithmetic at all) and the partial ones (mask
computed in-tile), and the same for every key tile over query tiles (backward). The
kernels only loop over (GPU) or step through (TPU) those ranges:

- forward and dq, per query tile i: unmasked key tiles [lo, full_end), masked
  [full_end, hi);
- dk/dv, per key tile j: up to two runs of query tiles (one per sorted query stream),
  each masked [lo, c) then unmasked [c, end).

The ranges are exact for any ids (a tile inside a range that turns out dead is computed
under its mask and contributes exactly nothing); they are tight when the key ids are
non-decreasing (tokens in generation order) and the query ids form at most two
non-decreasing runs (ARMD's content rows with ids b and query rows with ids b - 1,
concatenated), each padded to a tile boundary (`q_segments`).

The kernels live beside this file, split as jax's own Pallas ops are:

- `tiles.py`: tile sizes, tile ranges, cost estimates and the tile math every kernel
  shares (float32 softmax statistics and accumulators);
- `tpu.py`: backend 'tpu' (Mosaic), a tiled grid stepping through the ranges;
- `gpu.py`: backend 'gpu' (Triton), loops over the ranges on the native layout;
- `fallback.py`: the 'per_tile' schedule (whole-row residency, a skip test per tile),
  for ids with no useful order;
- here: `block_causal_flash_attention` (checks, padding), `live_tiles` / `tile_plan`,
  the backend dispatch and the custom VJP. Backend 'auto': `jax.lax.platform_dependent`
  picks 'tpu' on TPU, 'gpu' on CUDA/ROCm and the Pallas interpreter elsewhere (CPU), at
  lowering time. `interpret=True` runs the chosen kernel under the Pallas interpreter on
  any platform.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from armd_jax.kernels.fallback import _per_tile_backward, _per_tile_forward
from armd_jax.kernels.gpu import _gpu_backward, _gpu_forward
from armd_jax.kernels.reference import check_attention_inputs
from armd_jax.kernels.tiles import (_KV_PAD_ID, _Q_PAD_ID, BlockSizes, _Options,
                                    default_block_sizes, query_tile_ranges)
from armd_jax.kernels.tpu import _tpu_backward, _tpu_forward

BACKENDS = ("auto", "tpu", "gpu")
SCHEDULES = ("ranges", "per_tile")
_DEFAULT_PAD = 128  # what inputs are padded to when the tiles are chosen per platform


# -- the forward tile plan, as a call pads its ids -------------------------------------


def live_tiles(q_ids: jax.Array, kv_ids: jax.Array,
               block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
  """Which (query tile, key tile) pairs the forward kernel computes, per batch row.

  Pads exactly as `block_causal_flash_attention` does (one query segment). Returns bool
  [B, nq, nk]; `~live_tiles(...)` are the tiles never loaded nor computed.
  """
  computed, _ = tile_plan(q_ids, kv_ids, block_sizes)
  return computed


def tile_plan(q_ids: jax.Array, kv_ids: jax.Array,
              block_sizes: BlockSizes = BlockSizes()) -> Tuple[jax.Array, jax.Array]:
  """(computed, masked) bool [B, nq, nk] of the forward kernel's 'ranges' schedule.

  computed: the key tiles each query tile visits; masked: those among them that run the
  mask arithmetic (the rest are fully visible and run without it).
  """
  bq, bk = block_sizes.block_q, block_sizes.block_kv
  q_ids = _pad_axis(q_ids.astype(jnp.int32), 1, bq, _Q_PAD_ID)
  kv_ids = _pad_axis(kv_ids.astype(jnp.int32), 1, bk, _KV_PAD_ID)
  ranges = query_tile_ranges(q_ids, kv_ids, bq, bk)
  j = jnp.arange(kv_ids.shape[1] // bk)
  lo, full_end, hi = (ranges[..., n:n + 1] for n in range(3))
  return (j >= lo) & (j < hi), (j >= full_end) & (j < hi)


# -- dispatch and custom VJP -------------------------------------------------------------


def _forward(opts: _Options, backend: str, *args):
  if opts.schedule == "per_tile":
    return _per_tile_forward(opts, backend, *args)
  return (_tpu_forward if backend == "tpu" else _gpu_forward)(opts, *args)


def _backward(opts: _Options, backend: str, *args):
  if opts.schedule == "per_tile":
    return _per_tile_backward(opts, backend, *args)
  return (_tpu_backward if backend == "tpu" else _gpu_backward)(opts, *args)


def _on_platform(opts: _Options, fn, *args):
  """Runs fn(opts, backend, *args) for the backend the options (or the platform) pick,
  with that backend's default tiles where the options leave them to the platform."""
  head_dim = args[0].shape[-1]

  def run(run_opts: _Options, backend: str):
    if run_opts.block_sizes is None:
      run_opts = dataclasses.replace(run_opts,
                                     block_sizes=default_block_sizes(backend, head_dim))
    return lambda *a: fn(run_opts, backend, *a)

  if opts.backend != "auto":
    return run(opts, opts.backend)(*args)
  if opts.interpret:
    return run(opts, "tpu")(*args)
  interpreted = dataclasses.replace(opts, interpret=True)
  return lax.platform_dependent(
      *args, tpu=run(opts, "tpu"), cuda=run(opts, "gpu"), rocm=run(opts, "gpu"),
      default=run(interpreted, "tpu"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(opts: _Options, q, k, v, q_ids, kv_ids):
  return _on_platform(opts, _forward, q, k, v, q_ids, kv_ids)[0]


def _flash_fwd(opts, q, k, v, q_ids, kv_ids):
  out, lse = _on_platform(opts, _forward, q, k, v, q_ids, kv_ids)
  return out, (q, k, v, q_ids, kv_ids, out, lse)


def _flash_bwd(opts, residuals, do):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  delta = jnp.einsum("bnhd,bnhd->bhn", out.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = _on_platform(opts, _backward, q, k, v, q_ids, kv_ids, lse, delta,
                            do.astype(q.dtype))
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- public wrapper -------------------------------------------------------------------


def _pad_axis(x: jax.Array, axis: int, multiple: int, value) -> jax.Array:
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _pad_segments(x: jax.Array, segments: Sequence[int], multiple: int, value) -> jax.Array:
  """Pads each segment of axis 1 to a multiple of `multiple` (then concatenates)."""
  if len(segments) == 1:
    return _pad_axis(x, 1, multiple, value)
  parts, start = [], 0
  for length in segments:
    parts.append(_pad_axis(x[:, start:start + length], 1, multiple, value))
    start += length
  return jnp.concatenate(parts, axis=1)


def _unpad_segments(x: jax.Array, segments: Sequence[int], multiple: int) -> jax.Array:
  """Inverse of `_pad_segments` along axis 1."""
  parts, start = [], 0
  for length in segments:
    parts.append(x[:, start:start + length])
    start += length + (-length % multiple)
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _tile_rules(backend: str, interpret: bool) -> str:
  """Which tile constraints apply: 'tpu', 'gpu' or 'interpret'.

  For backend 'auto' the platform is only known at lowering time; the default
  backend is the best guess (ahead-of-time compiles for another platform are checked
  by that platform's compiler instead).
  """
  if interpret:
    return "interpret"
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  return "tpu" if platform == "tpu" else "gpu" if platform in ("gpu", "cuda", "rocm") else (
      "interpret")


def _check_block(name: str, value: int, rules: str) -> None:
  if rules == "tpu" and value % 128:
    raise ValueError(f"BlockSizes.{name}={value} must be a multiple of 128 for the TPU kernel.")
  if rules == "gpu" and (value < 16 or value & (value - 1)):
    raise ValueError(f"BlockSizes.{name}={value} must be a power of two >= 16 for the GPU "
                     "kernel.")
  if value % 8:
    raise ValueError(f"BlockSizes.{name}={value} must be a multiple of 8.")


@functools.partial(jax.jit, static_argnames=("block_sizes", "backend", "interpret", "sm_scale",
                                             "schedule", "q_segments"))
def block_causal_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_ids: jax.Array,
                                 kv_ids: jax.Array, *, block_sizes: BlockSizes | None = None,
                                 backend: str = "auto", interpret: bool = False,
                                 sm_scale: float | None = None, schedule: str = "ranges",
                                 q_segments: Tuple[int, ...] | None = None) -> jax.Array:
  """Pallas flash attention where query n sees key i iff kv_ids[i] <= q_ids[n].

  Args:
    q: [B, Nq, H, D] queries; k, v: [B, Nk, H, D] (Nq may differ from Nk).
    q_ids: [B, Nq] int block ids (any order; best as one or two non-decreasing runs,
      e.g. ARMD's two streams concatenated).
    kv_ids: [B, Nk] int block ids; tiles are skipped best when non-decreasing.
      All ids must lie strictly between -2**30 and 2**30 (padding sentinels).
    block_sizes: tile sizes; None: per platform (`default_block_sizes`: 128 x 128 on
      TPU and in the interpreter, 64-wide tiles on GPU).
    backend: 'auto' (by platform at lowering time), 'tpu' (Mosaic) or 'gpu' (Triton).
    interpret: run the kernel under the Pallas interpreter (any platform, slow).
    sm_scale: logit scale; defaults to 1/sqrt(D).
    schedule: 'ranges' (default: per-tile ranges from XLA, tiled grid on TPU, unmasked
      and masked loops on GPU) or 'per_tile' (the fallback: whole-row residency and a
      per-tile skip test).
    q_segments: lengths of the query runs along Nq (summing to Nq), e.g. (N + 1, N) for
      ARMD's content and query streams; each is padded to a tile boundary on its own so
      that no tile straddles two runs. None: one run.

  Returns:
    [B, Nq, H, D] in q.dtype; rows with no visible key are zeros. Differentiable in
    q, k, v through Pallas backward kernels (custom VJP).
  """
  if backend not in BACKENDS:
    raise ValueError(f"block_causal_flash_attention: backend must be one of {BACKENDS}, "
                     f"got {backend!r}.")
  if schedule not in SCHEDULES:
    raise ValueError(f"block_causal_flash_attention: schedule must be one of {SCHEDULES}, "
                     f"got {schedule!r}.")
  check_attention_inputs("block_causal_flash_attention", q, k, v, q_ids, kv_ids)
  nq_len, d = q.shape[1], q.shape[-1]
  segments = (nq_len,) if q_segments is None else tuple(int(s) for s in q_segments)
  if sum(segments) != nq_len or min(segments) <= 0:
    raise ValueError(f"block_causal_flash_attention: q_segments {q_segments} must be positive "
                     f"and sum to Nq={nq_len}.")
  if block_sizes is None and backend != "auto":
    block_sizes = default_block_sizes(backend, d)
  if block_sizes is None:  # chosen per platform when lowered; valid by construction
    bq = bk = _DEFAULT_PAD
  else:
    rules = _tile_rules(backend, interpret)
    for name, value in zip(("block_q", "block_kv", "block_q_dkv", "block_kv_dkv"),
                           (block_sizes.block_q, block_sizes.block_kv) + block_sizes.dkv):
      _check_block(name, value, rules)
    bq = int(np.lcm(block_sizes.block_q, block_sizes.dkv[0]))
    bk = int(np.lcm(block_sizes.block_kv, block_sizes.dkv[1]))
  sm_scale = d ** -0.5 if sm_scale is None else float(sm_scale)
  opts = _Options(block_sizes, backend, interpret, sm_scale, schedule, segments, bq,
                  k.shape[1])
  # GPU: tl.dot wants power-of-two head dims >= 16; zero columns change nothing.
  d_pad = max(16, 1 << (d - 1).bit_length()) if backend in ("gpu", "auto") else d
  pad_d = lambda x: _pad_axis(x, 3, d_pad, 0)  # noqa: E731
  out = _flash(opts, pad_d(_pad_segments(q, segments, bq, 0)),
               pad_d(_pad_axis(k, 1, bk, 0)), pad_d(_pad_axis(v, 1, bk, 0)),
               _pad_segments(q_ids.astype(jnp.int32), segments, bq, _Q_PAD_ID),
               _pad_axis(kv_ids.astype(jnp.int32), 1, bk, _KV_PAD_ID))
  return _unpad_segments(out, segments, bq)[..., :d]
