"""Bar chart of the AR -> ARMD adaptation study (benchmarks/adapt_from_ar.py results).

  python benchmarks/plot_adapt_from_ar.py \
      --results=benchmarks/results/adapt_from_ar.json,benchmarks/results/adapt_from_ar_lr1e-3.json \
      --out=docs/img/adapt_from_ar.png

Exact held-out perplexity, left to right and strided S = 4, of each run in the files
(the AR run has no strided order); the labels name the file's run and its steps.
"""

from __future__ import annotations

import argparse
import json
import os


def bars(paths):
  """[(label, left-to-right ppl, strided S=4 ppl or None)] from the results files."""
  rows, seen_ar = [], False
  for path in paths:
    with open(path, encoding="utf-8") as f:
      runs = json.load(f)["runs"]
    tag = os.path.splitext(os.path.basename(path))[0].replace("adapt_from_ar", "") or "lr 5e-4"
    for name, run in runs.items():
      if run["kind"] == "ar":
        if seen_ar:
          continue
        seen_ar = True
        label = f"AR\n{run['steps']} steps"
      elif name == "adapted":
        label = f"ARMD adapted\n({tag.strip('_').replace('lr', 'lr ')})\n{run['steps']}"
      else:
        if any(r[0].startswith("ARMD scratch") for r in rows):
          continue
        label = f"ARMD scratch\n{run['steps']} steps"
      strided = run.get("strided_S4", {}).get("ppl")
      rows.append((label, run["left_to_right_S1"]["ppl"], strided))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--results", required=True, help="comma-separated results files")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = bars(args.results.split(","))
  fig, ax = plt.subplots(figsize=(7, 3.6))
  xs = range(len(rows))
  ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="left to right (exact)")
  ax.bar([x + 0.2 for x in xs], [r[2] or 0 for r in rows], 0.4, label="strided S=4 (exact)")
  ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
  ax.set_ylabel("held-out perplexity per token")
  ax.set_title("ARMD adapted from AR vs. from scratch (tiny Shakespeare, CPU)", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
