"""Where the strided likelihood gap lives: excess NLL by offset within a stream.

Under strided order with S streams of N/S tokens, stream s > 0 starts without its left
neighbours (they are the end of stream s - 1, revealed last), while every later token of
the stream sees its own stream's left context. If the excess NLL of strided over
left-to-right order sits at the stream starts, the gap is a boundary effect of N/S: a
longer stream spreads the same excess over more tokens. This script measures, for a
trained ARMD workdir, the held-out per-token NLL under left-to-right and strided S orders
(exact, one forward pass each), the excess by offset within the stream, the share of the
excess in the first --head tokens of each stream, and what the PPL ratio would be at a
longer length if the per-stream excess stayed the same (an extrapolation, labelled so).

  python benchmarks/strided_gap.py --workdir=/tmp/armd_recipes/sbp --step=2000 \\
    --out=benchmarks/results/strided_gap.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402  pylint: disable=wrong-import-position
import results_file  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402
import numpy as np  # noqa: E402

from armd_jax import losses, orders, train  # noqa: E402


def per_token_nll(trained, tokens: np.ndarray, block_ids: np.ndarray) -> np.ndarray:
  """Exact per-token NLL [B, N] (nats) of `tokens` under the order `block_ids`, one pass."""
  apply = jax.jit(trained.model.apply)
  logits = apply(trained.params, tokens, block_ids)
  return -np.asarray(losses.token_log_probs(logits, tokens))


def gap_by_offset(nll_l2r: np.ndarray, nll_s: np.ndarray, streams: int, head: int) -> Dict:
  """The excess of strided over left-to-right NLL [B, N] by offset within a stream."""
  length = nll_l2r.shape[1]
  stride = length // streams
  excess = (nll_s - nll_l2r).mean(axis=0)  # [N]
  by_offset = excess.reshape(streams, stride)  # [S, N/S]: stream, offset
  total = float(excess.sum())  # nats per sequence
  later = by_offset[1:]  # streams that start without their left neighbours
  return {"streams": streams, "length": length, "nll_l2r": float(nll_l2r.mean()),
          "nll_strided": float(nll_s.mean()), "ppl_ratio": math.exp(excess.mean()),
          "excess_nats_per_sequence": total,
          "excess_first_stream": float(by_offset[0].sum()),
          "excess_by_offset_later_streams": later.mean(axis=0).tolist(),
          f"share_in_first_{head}_offsets": float(later[:, :head].sum() / total) if total else
          float("nan")}


def extrapolate(gap: Dict, lengths) -> Dict[str, float]:
  """PPL ratio at other lengths if each sequence's excess stayed what it is (S stream
  starts whatever the length) and the left-to-right NLL per token did too: an estimate."""
  return {str(n): math.exp(gap["excess_nats_per_sequence"] / n) for n in lengths}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a trained ARMD workdir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint (default: last)")
  parser.add_argument("--streams", default="2,4,8")
  parser.add_argument("--batches", type=int, default=16, help="held-out batches")
  parser.add_argument("--head", type=int, default=4, help="offsets counted as a stream start")
  parser.add_argument("--extrapolate_to", default="512,1024", help="lengths to estimate at")
  parser.add_argument("--out", required=True, help="results JSON")
  args = parser.parse_args(argv)
  trained = train.load_trained(args.workdir, step=args.step)
  if trained.model_config.kind != "armd":
    parser.error(f"--workdir: an ARMD run is needed, got kind {trained.model_config.kind!r}")
  batches = [b for _, b in zip(range(args.batches),
                               compare.heldout_batches(trained, args.workdir))]
  if any("mask" in b and not np.all(b["mask"]) for b in batches):
    parser.error("the held-out rows hold padding; this script compares full rows only")
  tokens = np.concatenate([b["tokens"] for b in batches]).astype(np.int32)  # [B, N]
  batch, length = tokens.shape
  nll_l2r = per_token_nll(trained, tokens, np.asarray(orders.left_to_right(batch, length)))
  gaps = {}
  for s in (int(x) for x in args.streams.split(",")):
    nll_s = per_token_nll(trained, tokens, np.asarray(orders.strided(batch, length, s)))
    gap = gap_by_offset(nll_l2r, nll_s, s, args.head)
    gap["extrapolated_ppl_ratio"] = extrapolate(
        gap, [int(n) for n in args.extrapolate_to.split(",")])
    gaps[f"S={s}"] = gap
    print(f"S={s}: PPL ratio {gap['ppl_ratio']:.3f}; excess {gap['excess_nats_per_sequence']:.2f} "
          f"nats/sequence, {gap[f'share_in_first_{args.head}_offsets']:.0%} of it in the first "
          f"{args.head} tokens of streams 2..S; if it stayed per sequence: "
          + ", ".join(f"N={n}: {r:.3f}" for n, r in gap["extrapolated_ppl_ratio"].items()),
          flush=True)
  results_file.write(args.out, args, workdir=args.workdir, step=int(trained.step),
                     rows=batch, length=length, gaps=gaps)


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  main()
