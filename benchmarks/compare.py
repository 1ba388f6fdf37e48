"""ARMD vs. AR vs. MDLM on tiny Shakespeare: same data, blocks, size, steps and train step.

Trains every run with `armd_jax.train.train_and_evaluate` (character level, the
`configs/shakespeare.py` data path), then reports side by side:
- validation perplexity vs. step (from each run's metrics.jsonl; PNG),
- final held-out perplexity, labelled exact or bound (`armd_jax.eval`),
- train tokens/s (median of the progress lines, compilation excluded),
- generative perplexity, per-sample unigram entropy and MAUVE under the evaluator (its
  mean last hidden states, samples against as many held-out rows) of unconditional
  samples (128 per sampler in the full mode, each figure with a bootstrap 95% interval
  over samples; each sample set scored once) for
  ARMD sequential, strided S = 2, 4, confidence-ordered decoding with k = 4, 8 per exact
  call (2 ceil(N/k) - 1 calls: 63 and 31 at N = 128, beside S = 2's 65 and S = 4's 35),
  and MDLM with the same number of reverse steps as ARMD's strided calls (N/S + S - 1),
  scored by the AR run (the evaluator),
- wall time per sample (a batch generated at once, compiled beforehand) and FLOPs per
  sample (XLA's count of the batch's whole generation program, every decoding step
  counted, `armd_jax.eval.generation_flops`): confidence order's probes each run the
  query stream over all N positions, a cost its call count hides.

Runs (all the same width, depth and steps unless stated):
  ar                   plain causal GPT from the same Blocks (also the evaluator).
  armd                 ARMD, progressive permutation scaled to the run: left to right
                       for the first 20% of steps, k ramping to rho = 8 by 80%.
  armd_sbp             armd + strided fine-tuning (S uniform in {1, 2, 4}) for 25% more
                       steps (the paper's recipe for parallel generation; extra steps).
  armd_prefix_init     ablation: query stream started by prefix aggregation only.
  armd_all_two_stream  ablation: every layer two-stream (costs more per step).
  mdlm                 masked diffusion, continuous-time ELBO with the linear schedule.

Data: tiny Shakespeare's input.txt (1.1 MB), passed as --data (required), e.g.
  curl -o /tmp/input.txt \
    https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt

Commands (from the repository root):
  python benchmarks/compare.py --data=/tmp/input.txt --smoke  # tiny sizes, minutes on 2 cores
  python benchmarks/compare.py --data=/tmp/input.txt  # the full comparison (docs/benchmarks.md)
  python benchmarks/compare.py --data=/tmp/input.txt --generation_only --workdir_root=DIR
      # re-sample and score
      # the trained runs in DIR (no training): writes compare_generation.*

Writes benchmarks/results/compare.json, compare_val_ppl.png, compare.md and the results
section of docs/benchmarks.md (the full, unmodified run only; --smoke writes compare_smoke.*,
--steps/--runs subsets compare_custom.*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from armd_jax import data as data_lib  # noqa: E402
from armd_jax import eval as ev  # noqa: E402
from armd_jax import registry, sampling, train  # noqa: E402
from armd_jax.train import observe  # noqa: E402
from armd_jax.train.defaults import base_config  # noqa: E402

DATA_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt")
DOCS = os.path.join(REPO, "docs", "benchmarks.md")
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"

# Sizes: 'full' is the calibration model (docs/benchmarks.md); 'smoke' only exercises the pipeline.
SIZES = {
    # eval_batches: held-out batches per validation in the train loop; final_batches: for
    # the final perplexities (None = the whole held-out split).
    "full": dict(d_model=128, num_layers=4, num_heads=4, mlp_dim=512, seq_len=128, batch=32,
                 steps=800, eval_every=100, eval_batches=8, lr=1e-3, warmup=100,
                 gen_samples=128, mc_samples=4, final_batches=None),
    "smoke": dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, seq_len=32, batch=8,
                  steps=20, eval_every=10, eval_batches=2, lr=3e-3, warmup=5,
                  gen_samples=4, mc_samples=1, final_batches=2),
}
RUNS = ("ar", "armd", "armd_sbp", "armd_prefix_init", "armd_all_two_stream", "mdlm")
STREAMS = (1, 2, 4)
CONFIDENCE_K = (4, 8)  # confidence-ordered decoding: positions per exact call
BOOTSTRAP = 2000  # resamples for the 95% intervals of gen. PPL and entropy
MAUVE_BOOTSTRAP = 50  # resamples for MAUVE's (each re-runs its k-means)


def run_config(name: str, size: Dict, data_path: str, workdirs: Dict[str, str]):
  """The ConfigDict of one run (see the module doc)."""
  c = base_config()
  c.model.kind = {"ar": "ar", "mdlm": "mdlm"}.get(name, "armd")
  c.model.d_model, c.model.num_layers = size["d_model"], size["num_layers"]
  c.model.num_heads, c.model.mlp_dim = size["num_heads"], size["mlp_dim"]
  c.model.max_len = size["seq_len"]
  c.model.d_pe = min(64, size["d_model"])
  if name == "armd_prefix_init":
    c.model.query_init = "prefix"
  if name == "armd_all_two_stream":
    c.model.num_two_stream_layers = size["num_layers"]
  c.data.task = "text_files"
  c.data.train_files = data_path
  c.data.eval_fraction = 0.1
  c.data.vocab = "byte"
  steps = size["steps"]
  c.order.kind = "progressive_permutation"
  c.order.i_ar, c.order.i_perm, c.order.rho = int(0.2 * steps), int(0.8 * steps), 8
  c.optim.learning_rate, c.optim.warmup_steps = size["lr"], size["warmup"]
  c.train.num_steps = steps
  c.train.global_batch_size, c.train.seq_len = size["batch"], size["seq_len"]
  c.train.log_every = max(1, size["eval_every"] // 2)
  c.train.eval_every = size["eval_every"]
  c.train.checkpoint_every = 0  # the end only
  c.train.tensorboard = False
  c.eval.num_batches = size["eval_batches"]
  c.sample.num_samples = 0  # this script samples every kind itself
  if name == "armd_sbp":  # strided fine-tuning from the armd run
    c.checkpoint.init_from = workdirs["armd"]
    c.order.kind, c.order.streams = "strided", STREAMS
    c.train.num_steps = max(4, steps // 4)
    c.train.eval_every = max(1, c.train.num_steps // 2)
    c.optim.learning_rate, c.optim.warmup_steps = size["lr"] / 3, max(1, size["warmup"] // 4)
  return c


def val_curve(workdir: str, offset: int = 0) -> List[List[float]]:
  """[[step, eval nll], ...] from metrics.jsonl (steps shifted by `offset`)."""
  return [[r["step"] + offset, r["eval/nll"]] for r in observe.read_metrics(workdir)
          if "eval/nll" in r]


def tokens_per_second(workdir: str) -> float:
  """Median train tokens/s over the progress records (compilation excluded)."""
  rates = [r["perf/tokens_per_s"] for r in observe.read_metrics(workdir)
           if "perf/tokens_per_s" in r]
  return float(statistics.median(rates)) if rates else float("nan")


def heldout_batches(trained, workdir: str):
  """A fresh iterable over the run's held-out split."""
  cfg = trained.config
  return data_lib.create_datasets(
      cfg.data, seq_len=int(cfg.train.seq_len), global_batch_size=int(cfg.train.global_batch_size),
      workdir=workdir, seed=int(cfg.train.seed), process_index=0,
      process_count=1).eval_batches()


def final_perplexities(name: str, trained, workdir: str, size: Dict) -> Dict[str, Dict]:
  """Held-out perplexities of one run, each labelled exact or bound."""
  kind = trained.model_config.kind
  orders_ = [ev.default_order(kind)]
  if name in ("armd", "armd_sbp"):
    orders_ += [ev.EvalOrder("strided", streams=s) for s in STREAMS[1:]]
    orders_ += [ev.EvalOrder("random")]
  out = {}
  max_batches = size["final_batches"]
  for order in orders_:
    result = ev.evaluate_perplexity(trained.model, trained.params,
                                    heldout_batches(trained, workdir), order=order,
                                    rng=jax.random.PRNGKey(1), num_samples=size["mc_samples"],
                                    max_batches=max_batches)
    print(f"  {name}: {result}", flush=True)
    out[order.describe()] = result.as_dict()
  return out


def bootstrap_interval(nll: np.ndarray, counts: np.ndarray, entropy: np.ndarray,
                       seed: int = 0) -> Dict[str, List[float]]:
  """Bootstrap 95% intervals over samples of gen. PPL (exp of pooled NLL per token) and of
  mean unigram entropy; nll/counts/entropy are per-sample [B]."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(nll), size=(BOOTSTRAP, len(nll)))
  ppl = np.exp(nll[idx].sum(axis=1) / counts[idx].sum(axis=1))
  ent = entropy[idx].mean(axis=1)
  return {"gen_ppl_ci95": np.percentile(ppl, [2.5, 97.5]).tolist(),
          "entropy_nats_ci95": np.percentile(ent, [2.5, 97.5]).tolist()}


def _armd_samples(trained, key, batch: int, length: int, k: int):
  """Confidence-ordered ARMD samples (timed after a warm-up), through the registry."""
  generate = registry.get_kind(trained.model_config.kind).generate

  def run(rng):
    return generate(trained.model, trained.params, rng, batch_size=batch, length=length,
                    order="confidence", k=k)
  jax.block_until_ready(run(jax.random.fold_in(key, 1)).tokens)
  start = time.perf_counter()
  out = run(key)
  tokens = np.asarray(jax.block_until_ready(out.tokens))
  return ev.Samples(tokens, int(out.num_calls), time.perf_counter() - start)


_FLOPS: Dict[tuple, float] = {}  # FLOPs depend on the shapes only: armd_sbp reuses armd's


def flops_per_sample(trained, batch: int, length: int, how: str, s: int) -> float:
  """`ev.generation_flops` of one sampler ('streams' S = s, or 'confidence' k = s)."""
  key = (trained.model.config, batch, length, how, s)
  if key not in _FLOPS:
    setting = (dict(order="confidence", k=s) if how == "confidence"
               else dict(streams=s, sampler=sampling.SamplerConfig()))
    _FLOPS[key] = ev.generation_flops(trained.model, trained.params, batch_size=batch,
                                      length=length, **setting)
  return _FLOPS[key]


def generation_rows(name: str, trained, evaluator, reference: np.ndarray, size: Dict,
                    streams=None, confidence_k=None) -> List[Dict]:
  """Generative PPL / entropy / MAUVE against `reference` features [M, D] (each with a
  bootstrap 95% interval) / calls / seconds and FLOPs per sample for the run's samplers
  (S in `streams`, default STREAMS; confidence order with k in `confidence_k`, default
  CONFIDENCE_K, for ARMD); every sample set
  is scored once. FLOPs: `ev.generation_flops`, XLA's count of the whole generation
  program of the batch, every loop iteration counted, divided by the batch size. MAUVE's
  interval: size['mauve_bootstrap'] resamples if given, else MAUVE_BOOTSTRAP."""
  kind = trained.model_config.kind
  length, batch = size["seq_len"], size["gen_samples"]
  spec = registry.get_kind(kind)
  streams = STREAMS if streams is None else streams  # read at call time
  confidence_k = CONFIDENCE_K if confidence_k is None else confidence_k
  settings = [("streams", s) for s in (streams if spec.parallel_streams else (1,))]
  if kind == "armd":
    settings += [("confidence", k) for k in confidence_k if k <= length]
  rows = []
  for how, s in settings:
    key = jax.random.PRNGKey(100 + s + (1000 if how == "confidence" else 0))
    if how == "confidence":
      samples = _armd_samples(trained, key, batch, length, s)
    else:  # 'mdlm' runs the registry's matched step count for S.
      samples = ev.generate_samples(trained.model, trained.params, key, batch_size=batch,
                                    length=length, streams=s, sampler=sampling.SamplerConfig())
    flops = flops_per_sample(trained, batch, length, how, s)
    scores = ev.score_samples(samples.tokens, evaluator)
    result = scores.result()
    mauve = ev.mauve_score(ev.evaluator_features(samples.tokens, evaluator), reference,
                           evaluator=evaluator.name,
                           num_bootstrap=size.get("mauve_bootstrap", MAUVE_BOOTSTRAP))
    name_ = (f"confidence k={s} (max prob)" if how == "confidence"
             else _sampler_name(name, kind, s, length))
    row = {"run": name, "sampler": name_, "streams": s if how == "streams" else None,
           "per_call": s if how == "confidence" else None,
           "num_calls": samples.num_calls, "seconds_per_sample": samples.seconds / batch,
           "flops_per_sample": flops,
           **result.as_dict(), **bootstrap_interval(scores.nll, scores.counts, scores.entropy),
           **mauve.as_dict(), "example": trained.vocab.decode(samples.tokens[0].tolist())}
    print(f"  {name} {row['sampler']}: {result}; 95% CI {row['gen_ppl_ci95']}; {mauve}; "
          f"{samples.num_calls} calls, {row['seconds_per_sample'] * 1e3:.1f} ms/sample, "
          f"{flops / 1e6:,.2f} MFLOP/sample", flush=True)
    rows.append(row)
  return rows


def _sampler_name(run: str, kind: str, s: int, length: int) -> str:
  name = registry.get_kind(kind).sampler_name(length, s)
  return f"{name} (self-scored)" if run == "ar" else name  # the 'ar' run is the evaluator


def plot(results: Dict, path: str) -> None:
  """Validation perplexity vs. step for every run (bounds dashed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, run in results["runs"].items():
    curve = np.asarray(run["val_curve"])
    if not len(curve):
      continue
    bound = not registry.get_kind(run["kind"]).default_is_exact
    ax.plot(curve[:, 0], np.exp(curve[:, 1]), "--" if bound else "-", marker="o", ms=3,
            label=f"{name} ({'ELBO bound' if bound else 'exact, left to right'})")
  ax.set_xlabel("training step")
  ax.set_ylabel("validation perplexity (per character)")
  ax.set_yscale("log")
  ax.set_title(f"tiny Shakespeare, {results['mode']} mode")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def flop_unit(rows: List[Dict]) -> Tuple[str, float, int]:
  """(unit, scale, decimals) for the rows' FLOPs per sample: GFLOP when the largest
  reaches 1e9, else MFLOP."""
  largest = max([r.get("flops_per_sample", 0.0) for r in rows] + [0.0])
  return ("GFLOP", 1e9, 2) if largest >= 1e9 else ("MFLOP", 1e6, 1)


def markdown(results: Dict) -> str:
  """The results tables (markdown)."""
  size = results["size"]
  unit, scale, digits = flop_unit(results["generation"])
  lines = [f"Mode `{results['mode']}`: d_model {size['d_model']}, {size['num_layers']} layers, "
           f"N = {size['seq_len']}, batch {size['batch']}, {size['steps']} steps; "
           f"{results['device']}; total wall time {results['wall_seconds'] / 60:.1f} min.", "",
           "| run | kind | final held-out PPL | label | other orders | train tokens/s | "
           "train wall s |", "|---|---|---|---|---|---|---|"]
  for name, run in results["runs"].items():
    ppls = run["final"]
    main_key = next(iter(ppls))
    main = ppls[main_key]
    others = "; ".join(f"{k}: {v['ppl']:.3f} ({v['label']})" for k, v in ppls.items()
                       if k != main_key) or "-"
    lines.append(f"| {name} | {run['kind']} | {main['ppl']:.3f} | {main['label']} "
                 f"({main_key}) | {others} | {run['tokens_per_s']:,.0f} | "
                 f"{run['train_seconds']:.0f} |")
  lines += ["", f"Generative perplexity and MAUVE under the evaluator: {results['evaluator']}; "
            f"{size['gen_samples']} samples of {size['seq_len']} characters, temperature 1; "
            "MAUVE on the evaluator's mean last hidden states against as many held-out rows "
            "(not comparable to GPT-2-large MAUVE). FLOPs: XLA's count of the whole "
            "generation program of the batch (every decoding step counted), per sample.", "",
            "| run | sampler | network calls | gen. PPL [95% CI] | entropy (nats) [95% CI] | "
            f"MAUVE [95% CI] | ms / sample | {unit} / sample |",
            "|---|---|---|---|---|---|---|---|"]
  for row in results["generation"]:
    ci = row.get("gen_ppl_ci95", [float("nan")] * 2)
    eci = row.get("entropy_nats_ci95", [float("nan")] * 2)
    mci = row.get("mauve_ci95", [float("nan")] * 2)
    lines.append(f"| {row['run']} | {row['sampler']} | {row['num_calls']} | "
                 f"{row['gen_ppl']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                 f"{row['entropy_nats']:.3f} [{eci[0]:.3f}, {eci[1]:.3f}] | "
                 f"{row.get('mauve', float('nan')):.3f} [{mci[0]:.3f}, {mci[1]:.3f}] | "
                 f"{row['seconds_per_sample'] * 1e3:.1f} | "
                 f"{row.get('flops_per_sample', float('nan')) / scale:,.{digits}f} |")
  return "\n".join(lines) + "\n"


def update_docs(table: str, png_name: str) -> None:
  """Replaces the results section of docs/benchmarks.md (between the markers)."""
  with open(DOCS, encoding="utf-8") as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise ValueError(f"{DOCS} lacks the {BEGIN} / {END} markers.")
  section = f"{BEGIN}\n{table}\n![validation PPL](../benchmarks/results/{png_name})\n{END}"
  head, rest = text.split(BEGIN, 1)
  with open(DOCS, "w", encoding="utf-8") as f:
    f.write(head + section + rest.split(END, 1)[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes: tests the pipeline")
  parser.add_argument("--data", default=None, help=f"tiny Shakespeare input.txt "
                      f"(required; download {DATA_URL})")
  parser.add_argument("--workdir_root", default=None, help="where the runs train "
                      "(default /tmp/armd_compare[_smoke]; emptied first)")
  parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset")
  parser.add_argument("--steps", type=int, default=None, help="override the step count")
  parser.add_argument("--gen_samples", type=int, default=None, help="samples per sampler")
  parser.add_argument("--generation_only", action="store_true",
                      help="no training: load the runs already trained under --workdir_root "
                      "and only sample and score them (writes compare_generation.*)")
  args = parser.parse_args()

  mode = "smoke" if args.smoke else "full"
  size = dict(SIZES[mode])
  if args.steps:
    size["steps"] = args.steps
    size["eval_every"] = max(1, args.steps // 4)
  if args.gen_samples:
    size["gen_samples"] = args.gen_samples
  if args.data is None:
    raise SystemExit(f"error: pass --data=PATH, tiny Shakespeare's input.txt (download "
                     f"{DATA_URL}).")
  data_path = os.path.normpath(args.data)
  if not os.path.isfile(data_path):
    raise SystemExit(f"error: no tiny Shakespeare file at {data_path} (pass --data); get "
                     f"it from {DATA_URL}.")
  runs = [r for r in args.runs.split(",") if r]
  unknown = sorted(set(runs) - set(RUNS))
  if unknown or "ar" not in runs:
    raise SystemExit(f"error: --runs must include 'ar' (the evaluator) and only {RUNS}; "
                     f"unknown: {unknown}.")
  if "armd_sbp" in runs and "armd" not in runs:
    raise SystemExit("error: armd_sbp fine-tunes the armd run: include 'armd'.")
  runs = [r for r in RUNS if r in runs]  # ar first, armd before armd_sbp
  root = args.workdir_root or f"/tmp/armd_compare{'_smoke' if args.smoke else ''}"
  start = time.time()
  results = {"mode": mode, "size": size, "data": data_path, "device": str(jax.devices()[0]),
             "runs": {}, "generation": []}
  workdirs: Dict[str, str] = {}
  trained_runs = {}
  for i, name in enumerate(runs):
    workdir = workdirs[name] = os.path.join(root, name)
    if args.generation_only:
      trained_runs[name] = train.load_trained(workdir)
      print(f"[{time.time() - start:6.0f}s] loaded {name} (step {trained_runs[name].step}) from "
            f"{workdir}", flush=True)
      continue
    shutil.rmtree(workdir, ignore_errors=True)
    config = run_config(name, size, data_path, workdirs)
    print(f"[{time.time() - start:6.0f}s] training {name} ({i + 1}/{len(runs)}, "
          f"{config.train.num_steps} steps) in {workdir}", flush=True)
    t0 = time.time()
    train.train_and_evaluate(config, workdir)
    train_seconds = time.time() - t0
    trained = trained_runs[name] = train.load_trained(workdir)
    offset = size["steps"] if name == "armd_sbp" else 0
    results["runs"][name] = {
        "kind": trained.model_config.kind, "workdir": workdir, "steps": config.train.num_steps,
        "val_curve": val_curve(workdir, offset), "tokens_per_s": tokens_per_second(workdir),
        "train_seconds": train_seconds,
        "final": final_perplexities(name, trained, workdir, size)}

  ar = trained_runs["ar"]
  evaluator = ev.ModelEvaluator(ar.model, ar.params, ar.vocab,
                                name=f"the 'ar' run of this benchmark (step {ar.step})")
  results["evaluator"] = evaluator.name
  ref_tokens, ref_mask = ev.take_rows(heldout_batches(ar, workdirs["ar"]),
                                      size["gen_samples"], size["seq_len"])
  reference = ev.evaluator_features(ref_tokens, evaluator, mask=ref_mask)  # [M, D]
  for name in runs:
    if name in ("armd_prefix_init", "armd_all_two_stream"):
      continue  # ablations report perplexity and speed only
    print(f"[{time.time() - start:6.0f}s] sampling {name}", flush=True)
    results["generation"] += generation_rows(name, trained_runs[name], evaluator, reference,
                                             size)
  results["wall_seconds"] = time.time() - start

  out_dir = os.path.join(HERE, "results")
  os.makedirs(out_dir, exist_ok=True)
  canonical = (mode == "full" and not args.steps and len(runs) == len(RUNS) and
               not args.generation_only and not args.gen_samples)
  stem = "compare" if canonical else ("compare_smoke" if args.smoke else "compare_custom")
  if args.generation_only:
    stem += "_generation"
  results["command"] = "python benchmarks/compare.py " + " ".join(sys.argv[1:])
  with open(os.path.join(out_dir, f"{stem}.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  if not args.generation_only:
    plot(results, os.path.join(out_dir, f"{stem}_val_ppl.png"))
  table = markdown(results)
  with open(os.path.join(out_dir, f"{stem}.md"), "w", encoding="utf-8") as f:
    f.write(table)
  if canonical:  # only the full, unmodified comparison updates the docs
    update_docs(table, f"{stem}_val_ppl.png")
  print(table)
  print(f"done in {results['wall_seconds'] / 60:.1f} min; wrote {out_dir}/{stem}.*", flush=True)


if __name__ == "__main__":
  from armd_jax.platforms import skip_absent_tpu  # pylint: disable=g-import-not-at-top
  skip_absent_tpu()  # a CPU host with libtpu installed: no TPU start-up errors
  main()
