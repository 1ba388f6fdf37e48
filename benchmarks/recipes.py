"""Recipes for strided generation, measured on tiny Shakespeare (docs/recipes.md).

Which training recipe brings strided (S-stream) generation closest to sequential, and at
what cost? Every point is an ARMD run at compare.py's model size (width 128, 4 layers,
N = 128; batch --batch) on the same data, seed and step budget, changing one thing:

  base             compare.py's ARMD recipe (progressive permutation, --steps steps):
                   SBP length 0, order mix 0%, two-stream depth L/2.
  sbp              base + strided fine-tuning (S uniform in {1, 2, 4}) for up to 2000
                   steps at a constant rate (a third of the peak, short warmup); its
                   checkpoints at SBP_STEPS are the SBP-length points (with a constant
                   rate, the first k steps of the long run are a k-step run).
  cont             the control: base continued as it ended (progressive permutation at
                   rho) for the same steps at the same rate, so that what SBP gains
                   beyond more training shows.
  mix_strided10/25 the base recipe with 10% / 25% of every batch's rows in strided
                   order (S uniform in {2, 4}) from step 0: strided order mixed into
                   the main run instead of after it, at equal total steps.
  mix_random25     25% of the rows in uniform random orders (what confidence-ordered
                   decoding visits).
  depth1/depth3    1 and L - 1 two-stream layers (base has L / 2), with the train step's
                   FLOPs (XLA cost analysis) beside the quality.
  rho32            up to 32 shuffled tokens instead of 8 (the paper's strided results
                   improve with rho).
  ar               the evaluator: an AR model of the same size and steps.

For each point: exact held-out perplexity left to right and strided S = 2, 4, 8 (--smoke:
S = 4; the first --eval_batches held-out batches) with the strided / left-to-right ratios;
unconditional samples (--gen_samples each) from the sequential, strided S = 2, 4, 8 and
confidence (k = 4) samplers (--smoke: sequential, S = 4 and confidence; 5 MAUVE
resamples) with generative perplexity, unigram entropy and MAUVE under the evaluator
(bootstrap 95% intervals; compare.generation_rows, which adds calls, ms and FLOPs per
sample); the train step's FLOPs (XLA) and its time, timed apart from the
training runs (median of 7 steps) so that a busy machine during a run does not colour it.

Resumable: each trained run resumes from its workdir under --root, each finished point
is kept in --root/points/<point>.json and reused. One command:

  python benchmarks/recipes.py --data=../shared/data/tinyshakespeare/input.txt \\
    --root=/tmp/armd_recipes
  python benchmarks/recipes.py --data=... --smoke   # tiny sizes: tests the pipeline

Writes benchmarks/results/recipes.json and recipes.md (recipes_smoke.* for --smoke) and
the plot docs/img/recipes.png (full mode, seed 0).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import compare  # noqa: E402  pylint: disable=wrong-import-position
import results_file  # noqa: E402  pylint: disable=wrong-import-position

import jax  # noqa: E402
import numpy as np  # noqa: E402

from armd_jax import eval as ev  # noqa: E402
from armd_jax import train  # noqa: E402
from armd_jax.train import checkpoints  # noqa: E402

REPO = compare.REPO
SBP_STEPS = (200, 800, 2000)
STRIDES = (2, 4, 8)  # strided evaluation and generation
GEN_STREAMS = (1,) + STRIDES
CONFIDENCE_K = (4,)
MIX_STREAMS = (2, 4)
SIZES = {
    "full": dict(compare.SIZES["full"], batch=16, steps=800, eval_batches=16,
                 sbp_steps=SBP_STEPS),
    # Smoke: the pipeline, not quality. compare.py's 2 layers (one two-stream: depth1 and
    # depth3 are then the base model), strided S = 4 only, in perplexity and among the
    # samplers (S = 2 and 8 run the same code), and a short MAUVE bootstrap keep the
    # compiles few and small.
    "smoke": dict(compare.SIZES["smoke"], steps=12, eval_batches=2, gen_samples=8,
                  sbp_steps=(4, 8), strides=(4,), gen_streams=(1, 4), mauve_bootstrap=5),
}
CONTINUED = ("sbp", "cont")  # runs that continue the base run, read at SBP_STEPS
# point -> (run it is read from, the step it is read at (None: the last), overrides).
RUNS = {
    "ar": dict(base="ar"),
    "base": dict(base="armd"),
    "sbp": dict(base="armd_sbp"),
    "cont": dict(base="armd_sbp", order=dict(kind="progressive_permutation", i_ar=0, i_perm=1)),
    "mix_strided10": dict(base="armd", order=dict(mix_kind="strided", mix_share=0.1,
                                                   streams=MIX_STREAMS)),
    "mix_strided25": dict(base="armd", order=dict(mix_kind="strided", mix_share=0.25,
                                                   streams=MIX_STREAMS)),
    "mix_random25": dict(base="armd", order=dict(mix_kind="random", mix_share=0.25)),
    "depth1": dict(base="armd", model=dict(num_two_stream_layers=1)),
    "depth3": dict(base="armd"),  # L - 1 two-stream layers (run_config)
    "rho32": dict(base="armd", order=dict(rho=32)),
}


def run_config(name: str, size: Dict, data_path: str, root: str, seed: int = 0):
  """The ConfigDict of one run: compare.py's, with the run's overrides and `seed`."""
  spec = RUNS[name]
  workdirs = {"armd": os.path.join(root, "base")}
  c = compare.run_config(spec["base"], size, data_path, workdirs)
  c.train.seed = seed
  c.train.eval_every = 0  # the points are scored after training
  c.train.checkpoint_every = math.gcd(*size["sbp_steps"])  # every SBP length is kept
  c.checkpoint.max_to_keep = 100
  for section in ("model", "order"):
    c[section].update(spec.get(section, {}))
  if name == "depth3":
    c.model.num_two_stream_layers = size["num_layers"] - 1
  if name in CONTINUED:  # constant rate so that every prefix is a shorter run
    c.train.num_steps = max(size["sbp_steps"])
    c.train.eval_every = 0
    c.optim.schedule = "constant"
    c.optim.learning_rate = size["lr"] / 3
    c.optim.warmup_steps = max(1, size["warmup"] // 4)
  return c


def points(size: Dict, names: List[str]) -> List[tuple]:
  """[(point name, run name, step or None)] in training order."""
  out = []
  for name in names:
    if name in CONTINUED:
      out += [(f"{name}{s}", name, s) for s in size["sbp_steps"]]
    else:
      out.append((name, name, None))
  return out


def last_step(workdir: str) -> int:
  """The newest finished checkpoint step of a workdir (-1 if none)."""
  folder = checkpoints.checkpoint_dir(workdir)
  steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
  return max(steps, default=-1)


def step_seconds(workdir: str, tokens_per_step: int) -> float:
  """Median train step time from the progress records (compilation excluded; NaN if none)."""
  return tokens_per_step / compare.tokens_per_second(workdir)


def train_step_cost(config, repeats: int = 7) -> Dict[str, float]:
  """XLA's FLOP count of one train step of `config` (the trainer's own step) and its
  median wall time over `repeats` steps after a warm-up, on random tokens."""
  import train_throughput  # pylint: disable=import-outside-toplevel
  from armd_jax import flops  # pylint: disable=import-outside-toplevel
  step, state, batch = train_throughput.build_step(config)
  compiled = step.lower(state, batch).compile()
  times = []
  for _ in range(repeats + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {"flops": flops.cost_flops(compiled.cost_analysis()),
          "seconds": statistics.median(times[1:])}


def evaluator_name(step: int) -> str:
  """How the results name the evaluator: this study's 'ar' run at `step`."""
  return f"the 'ar' run of this study, seed 0 (step {step})"


def perplexities(trained, workdir: str, size: Dict) -> Dict[str, Dict]:
  """Exact held-out perplexities left to right and strided (first eval_batches)."""
  out = {}
  strides = size.get("strides", STRIDES)
  for order in [ev.EvalOrder("left_to_right")] + [ev.EvalOrder("strided", streams=s)
                                                  for s in strides if s <= size["seq_len"]]:
    result = ev.evaluate_perplexity(trained.model, trained.params,
                                    compare.heldout_batches(trained, workdir), order=order,
                                    max_batches=size["eval_batches"])
    out[order.describe()] = result.as_dict()
  l2r = out["left_to_right"]["ppl"]
  for key in list(out):
    out[key]["over_left_to_right"] = out[key]["ppl"] / l2r
  return out


def _step_cost(workdir: str, step_costs: Dict) -> Dict[str, float]:
  """The train step cost of a run's config, computed once per distinct model and order."""
  config = checkpoints.load_config(workdir)
  key = json.dumps({"model": config.model.to_dict(), "order": config.order.to_dict()},
                   sort_keys=True, default=str)
  if key not in step_costs:
    step_costs[key] = train_step_cost(config)
  return step_costs[key]


def add_step_cost(point: Dict, root: str, path: str, step_costs: Dict) -> Dict:
  """A point scored before the step was timed apart: its in-run time kept under
  'train_step_seconds_in_run', the separately timed step and FLOPs added (file updated)."""
  if "train_step_seconds_in_run" in point:
    return point
  cost = _step_cost(os.path.join(root, point["run"]), step_costs)
  point["train_step_seconds_in_run"] = point["train_step_seconds"]
  point["train_step_seconds"], point["train_gflop_per_step"] = cost["seconds"], cost["flops"] / 1e9
  with open(path, "w", encoding="utf-8") as f:
    json.dump(point, f, indent=1)
  return point


def score_point(point: str, run: str, step: Optional[int], root: str, size: Dict,
                evaluator, reference, step_costs: Dict) -> Dict:
  """Everything measured for one point (see the module doc)."""
  workdir = os.path.join(root, run)
  trained = train.load_trained(workdir, step=step)
  config = checkpoints.load_config(workdir)
  depth = int(trained.model_config.num_two_stream_layers)
  cost = _step_cost(workdir, step_costs)
  tokens_per_step = size["batch"] * size["seq_len"]
  out = {"point": point, "run": run, "step": int(trained.step),
         "kind": trained.model_config.kind, "two_stream_layers": depth,
         "order": {k: config.order[k] for k in ("kind", "mix_kind", "mix_share")},
         "train_step_seconds_in_run": step_seconds(workdir, tokens_per_step),
         "train_step_seconds": cost["seconds"], "train_gflop_per_step": cost["flops"] / 1e9}
  if trained.model_config.kind == "armd":
    out["perplexity"] = perplexities(trained, workdir, size)
  else:  # the evaluator: left to right, and its own (self-scored) samples for speed
    out["perplexity"] = {"left_to_right": ev.evaluate_perplexity(
        trained.model, trained.params, compare.heldout_batches(trained, workdir),
        max_batches=size["eval_batches"]).as_dict()}
  out["generation"] = compare.generation_rows(point, trained, evaluator, reference, size,
                                              streams=size.get("gen_streams", GEN_STREAMS),
                                              confidence_k=CONFIDENCE_K)
  for row in out["generation"]:
    row.pop("example", None)
  return out


def markdown(results: Dict) -> str:
  """The results tables (markdown)."""
  size = results["size"]
  lines = [f"d_model {size['d_model']}, {size['num_layers']} layers, N = {size['seq_len']}, "
           f"batch {size['batch']}, {size['steps']} steps per run (SBP after them); "
           f"held-out: the first {size['eval_batches']} batches; {size['gen_samples']} "
           f"samples per sampler; evaluator: {results['evaluator']}; {results['device']}.",
           "", "| point | step (SBP: after base) | two-stream layers | l2r PPL | S=2 / l2r | S=4 / l2r | "
           "S=8 / l2r | step ms | GFLOP / step |", "|---|---|---|---|---|---|---|---|---|"]
  for p in results["points"].values():
    ppl = p["perplexity"]
    ratios = [ppl.get(f"strided S={s}", {}).get("over_left_to_right") for s in STRIDES]
    lines.append(f"| {p['point']} | {p['step']} | {p['two_stream_layers']} | "
                 f"{ppl['left_to_right']['ppl']:.3f} | "
                 + " | ".join("-" if r is None else f"{r:.3f}" for r in ratios)
                 + f" | {p['train_step_seconds'] * 1e3:.0f} | {p['train_gflop_per_step']:.1f} |")
  lines += ["", "| point | sampler | calls | gen. PPL [95% CI] | vs sequential | entropy | "
            "MAUVE [95% CI] | ms / sample | MFLOP / sample |",
            "|---|---|---|---|---|---|---|---|---|"]
  for p in results["points"].values():
    rows = p.get("generation", [])
    seq = next((r["gen_ppl"] for r in rows if r["streams"] == 1), float("nan"))
    for r in rows:
      ci, mci = r["gen_ppl_ci95"], r["mauve_ci95"]
      lines.append(f"| {p['point']} | {r['sampler']} | {r['num_calls']} | {r['gen_ppl']:.2f} "
                   f"[{ci[0]:.2f}, {ci[1]:.2f}] | {r['gen_ppl'] / seq - 1:+.1%} | "
                   f"{r['entropy_nats']:.3f} | {r['mauve']:.3f} [{mci[0]:.3f}, {mci[1]:.3f}] | "
                   f"{r['seconds_per_sample'] * 1e3:.1f} | "
                   + (f"{r['flops_per_sample'] / 1e6:,.0f} |" if "flops_per_sample" in r
                      else "- |"))
  return "\n".join(lines) + "\n"


def plot(results: Dict, path: str) -> None:
  """Left: exact strided/l2r perplexity ratio against steps after the base run (SBP and
  its control); right: every point's strided generative perplexity over its sequential
  one (95% interval of the strided figure, scaled)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  pts = results["points"]
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for run, style in (("sbp", "-"), ("cont", "--")):  # SBP, and its control
    line = [pts["base"]] + [p for p in pts.values() if p["run"] == run]
    if len(line) < 2:
      continue
    steps = [0] + [p["step"] for p in line[1:]]  # steps after the base run
    for s, color in zip(STRIDES, ("C0", "C1", "C2")):
      left.plot(steps, [p["perplexity"].get(f"strided S={s}", {}).get("over_left_to_right",
                                                                       np.nan) for p in line],
                style, color=color, marker="o", ms=3, label=f"S={s} / l2r, {run}")
  left.set_xscale("symlog", linthresh=100)
  left.set_xlabel("steps after the base run (sbp: strided; cont: the base order)")
  left.set_ylabel("held-out perplexity ratio")
  left.grid(True, alpha=0.3)
  left.legend(fontsize=8)
  armd = [p for p in pts.values() if p["kind"] == "armd"]
  samplers = [f"strided S={s}" for s in STRIDES]  # confidence order: see the tables
  width = 0.8 / len(samplers)
  for j, name in enumerate(samplers):
    ys, lo, hi = [], [], []
    for p in armd:
      rows = {r["sampler"]: r for r in p["generation"]}
      seq, r = rows["sequential"]["gen_ppl"], rows[name]
      ys.append(r["gen_ppl"] / seq)
      lo.append((r["gen_ppl"] - r["gen_ppl_ci95"][0]) / seq)
      hi.append((r["gen_ppl_ci95"][1] - r["gen_ppl"]) / seq)
    x = np.arange(len(armd)) + (j - len(samplers) / 2 + 0.5) * width
    right.errorbar(x, ys, yerr=[lo, hi], fmt="o", ms=3, label=name)
  right.set_xticks(np.arange(len(armd)))
  right.set_xticklabels([p["point"] for p in armd], rotation=30, fontsize=8)
  right.set_ylabel("generative PPL / sequential's (AR evaluator)")
  right.grid(True, alpha=0.3)
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _mean_sd(values: List[float], percent: bool = False) -> str:
  """'mean ± sample sd' of `values` (as signed percentages if `percent`)."""
  if percent:
    values = [100 * v for v in values]
  fmt = "{:+.1f}%" if percent else "{:.3f}"
  if len(values) < 2:
    return fmt.format(values[0]) if values else "-"
  spread = ("{:.1f}%" if percent else "{:.3f}").format(statistics.stdev(values))
  return f"{fmt.format(statistics.mean(values))} ± {spread}"


def combine_seeds(folder: str) -> None:
  """recipes_seeds.md: every point's figures as mean ± sd over the seeds run (seed 0 is
  recipes.json, seed N recipes_seed<N>.json), for the points every seed has."""
  files = [os.path.join(folder, "recipes.json")] + sorted(
      os.path.join(folder, f) for f in os.listdir(folder)
      if f.startswith("recipes_seed") and f.endswith(".json"))
  runs = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      runs.append(json.load(f))
  common = [p for p in runs[0]["points"] if all(p in r["points"] for r in runs)
            and runs[0]["points"][p].get("generation")]
  seeds = [r.get("seed", 0) for r in runs]
  lines = [f"Mean ± standard deviation over seeds {seeds} (training seed: init, orders, data "
           f"order; the same evaluator and sampling keys), from "
           + ", ".join(os.path.basename(f) for f in files) + ".", "",
           "| point | l2r PPL | S=2 / l2r | S=4 / l2r | S=8 / l2r | gen. PPL sequential | "
           "S=4 gen. PPL vs sequential | S=8 gen. PPL vs sequential | "
           "confidence k=4 vs sequential |", "|---|---|---|---|---|---|---|---|---|"]
  for p in common:
    pts = [r["points"][p] for r in runs]
    cells = [_mean_sd([q["perplexity"]["left_to_right"]["ppl"] for q in pts])]
    cells += [_mean_sd([q["perplexity"][f"strided S={s}"]["over_left_to_right"] for q in pts])
              for s in STRIDES]
    gen = [{r["sampler"]: r["gen_ppl"] for r in q["generation"]} for q in pts]
    cells.append(_mean_sd([g["sequential"] for g in gen]))
    for name in ("strided S=4", "strided S=8", "confidence k=4 (max prob)"):
      cells.append(_mean_sd([g[name] / g["sequential"] - 1 for g in gen], percent=True))
    lines.append(f"| {p} | " + " | ".join(cells) + " |")
  out = os.path.join(folder, "recipes_seeds.md")
  with open(out, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  print(f"wrote {out}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help="tiny Shakespeare's input.txt")
  parser.add_argument("--root", default="/tmp/armd_recipes", help="runs and points (resumed)")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: tests the pipeline")
  parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset "
                      "(always with 'ar', the evaluator, and 'base' before 'sbp')")
  parser.add_argument("--seed", type=int, default=0, help="training seed of every run "
                      "(init, orders and data order); results go to recipes_seed<N>.*")
  parser.add_argument("--evaluator", default=None, help="the AR workdir that scores samples "
                      "(default: this study's 'ar' run; pass seed 0's for other seeds)")
  parser.add_argument("--out", default=None, help="results stem (default "
                      "benchmarks/results/recipes[_seed<N>][_smoke])")
  parser.add_argument("--sbp_steps", default=None, help="comma-separated SBP lengths "
                      f"(default {','.join(map(str, SBP_STEPS))}; the run trains to the "
                      "largest)")
  parser.add_argument("--combine", action="store_true", help="no runs: summarise "
                      "benchmarks/results/recipes.json and recipes_seed*.json over seeds")
  args = parser.parse_args(argv)
  if args.combine:
    return combine_seeds(os.path.join(HERE, "results"))
  mode = "smoke" if args.smoke else "full"
  size = dict(SIZES[mode])
  if args.sbp_steps:
    size["sbp_steps"] = tuple(sorted(int(x) for x in args.sbp_steps.split(",")))
  names = [n for n in RUNS if n in args.runs.split(",")]
  unknown = sorted(set(args.runs.split(",")) - set(RUNS))
  if unknown or ("ar" not in names and not args.evaluator) or (
      set(CONTINUED) & set(names) and "base" not in names):
    parser.error(f"--runs: known runs are {list(RUNS)}; 'ar' is required without "
                 f"--evaluator and {CONTINUED} need 'base' (unknown: {unknown}).")
  if not os.path.isfile(args.data):
    parser.error(f"--data: no file at {args.data}")
  data_path = os.path.abspath(args.data)
  os.makedirs(os.path.join(args.root, "points"), exist_ok=True)
  start = time.time()

  def log(msg):
    print(f"[{time.time() - start:7.0f}s] {msg}", flush=True)

  for name in names:  # train (each resumes from its workdir; a finished run is skipped)
    workdir = os.path.join(args.root, name)
    config = run_config(name, size, data_path, args.root, args.seed)
    if last_step(workdir) >= config.train.num_steps:
      continue
    log(f"training {name} ({config.train.num_steps} steps) in {workdir}")
    train.train_and_evaluate(config, workdir)

  ar_dir = args.evaluator or os.path.join(args.root, "ar")
  @functools.cache
  def evaluator_and_reference():  # loaded once, when the first point needs scoring
    ar = train.load_trained(ar_dir)
    evaluator = ev.ModelEvaluator(ar.model, ar.params, ar.vocab, name=evaluator_name(ar.step))
    ref_tokens, ref_mask = ev.take_rows(compare.heldout_batches(ar, ar_dir),
                                        size["gen_samples"], size["seq_len"])
    return evaluator, ev.evaluator_features(ref_tokens, evaluator, mask=ref_mask)

  results = {"mode": mode, "size": size, "seed": args.seed, "data": data_path,
             "device": str(jax.devices()[0]), "evaluator": evaluator_name(last_step(ar_dir)),
             "points": {}}
  step_costs: Dict[str, Dict[str, float]] = {}
  for point, run, step in points(size, names):
    path = os.path.join(args.root, "points", f"{point}.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        results["points"][point] = add_step_cost(json.load(f), args.root, path, step_costs)
      continue
    log(f"scoring {point}")
    result = score_point(point, run, step, args.root, size, *evaluator_and_reference(),
                         step_costs)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    results["points"][point] = result
  results["wall_seconds_this_invocation"] = time.time() - start

  stem = args.out or os.path.join(HERE, "results", "recipes" + (
      f"_seed{args.seed}" if args.seed else "") + ("_smoke" if args.smoke else ""))
  results_file.write(stem + ".json", args, **results)
  table = markdown(results)
  with open(stem + ".md", "w", encoding="utf-8") as f:
    f.write(table)
  if not args.smoke and not args.out and not args.seed:
    plot(results, os.path.join(REPO, "docs", "img", "recipes.png"))
  print(table)
  log(f"wrote {stem}.json and .md")


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  main()
