"""The evaluate command: labelled perplexities, zero-shot sets, generative perplexity.

  python -m armd_jax.evaluate --workdir=DIR [--order=left_to_right|strided|random|
      masked_diffusion|elbo] [--streams=S] [--num_steps=T] [--mc_samples=K]
      [--max_batches=M] [--zero_shot=ptb,wikitext2,lambada,lm1b,text]
      [--zero_shot_files=ptb=/data/ptb.test.txt,text=/data/book.txt]
      [--gen_samples=16 --gen_length=128 --gen_streams=4 --gen_num_steps=T
       --evaluator=AR_WORKDIR | --evaluator=hf:gpt2-large --mauve_bootstrap=50]
      [--noheldout]
      [--output=results.json]

Every perplexity line says whether it is exact or a bound and under which order: an
'ar' or 'armd' model defaults to the exact left-to-right likelihood, an 'mdlm' model to
its ELBO bound; `--order=random` / `masked_diffusion` give ARMD's bounds and
`--order=strided --streams=S` the exact likelihood of its strided sampler. Held-out
data is the run's own validation split (`config.data`); zero-shot sets are read from
`--zero_shot_files` when given, else through Hugging Face / TFDS (see
`armd_jax.eval.zero_shot` for the detokenisation conventions). Generative perplexity
samples from the workdir's model and scores the samples with `--evaluator` (default:
the workdir itself when it is an 'ar' or 'armd' model; pass an AR workdir to follow
the usual protocol); the evaluator is named in the output. Beside it: the samples'
unigram entropy and MAUVE under our evaluator (its mean last hidden states of the
samples against as many held-out rows of the run's validation split, cropped to
--gen_length; bootstrap 95% interval; `armd_jax.eval.mauve_score`), since generative
PPL alone rewards degenerate text. An hf: evaluator gets no MAUVE (the line says so).
"""

from __future__ import annotations

import functools
import json
from typing import Dict, List, Optional

from absl import app, flags, logging

from armd_jax import storage



def define_flags() -> None:
  """Defines the command's flags (only when run as a command: importing stays side-effect
  free, so this module can be used as a library next to the other commands)."""
  flags.DEFINE_string("workdir", None, "Training workdir with checkpoints (a folder or a URL "
                      "such as gs://BUCKET/RUN).")
  flags.DEFINE_string("order", None, "Evaluation order (default: left_to_right for "
                      "ar/armd, elbo for mdlm).")
  flags.DEFINE_integer("streams", 1, "S for --order=strided.")
  flags.DEFINE_integer("num_steps", 128, "T for --order=masked_diffusion.")
  flags.DEFINE_integer("mc_samples", 1, "Monte Carlo draws per sequence for bounds.")
  flags.DEFINE_integer("max_batches", None, "Evaluate at most this many batches.")
  flags.DEFINE_integer("batch_size", 16, "Zero-shot batch size.")
  flags.DEFINE_integer("seq_len", None, "Zero-shot sequence length (default: the "
                       "run's train.seq_len).")
  flags.DEFINE_list("zero_shot", [], "Zero-shot sets to evaluate.")
  flags.DEFINE_list("zero_shot_files", [], "name=path pairs of local files.")
  flags.DEFINE_bool("heldout", True, "Evaluate the run's validation split.")
  flags.DEFINE_integer("gen_samples", 0, "Samples for generative perplexity (0 = off).")
  flags.DEFINE_integer("gen_length", 128, "Tokens per sample.")
  flags.DEFINE_integer("gen_streams", 1, "ARMD strided streams S.")
  flags.DEFINE_integer("gen_num_steps", None, "MDLM reverse steps (default: N/S + S - 1 "
                       "with N = gen_length, S = gen_streams: ARMD's call count; "
                       "armd_jax.registry.matched_mdlm_steps).")
  flags.DEFINE_string("evaluator", None, "An ar/armd workdir, or hf:NAME.")
  flags.DEFINE_integer("mauve_bootstrap", 50, "Bootstrap resamples for MAUVE's 95% "
                       "interval (0: none).")
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
  flags.DEFINE_integer("seed", 0, "Seed for random orders, ELBO draws and samples.")
  flags.DEFINE_bool("use_ema", True, "Use EMA parameters when present.")
  flags.DEFINE_string("output", None, "Write all results to this JSON file (path or URL).")
  flags.mark_flags_as_required(["workdir"])


def parse_files(pairs: List[str]) -> Dict[str, List[str]]:
  """['ptb=/a.txt', 'ptb=/b.txt'] -> {'ptb': ['/a.txt', '/b.txt']}; ValueError if malformed."""
  out: Dict[str, List[str]] = {}
  for pair in pairs:
    if "=" not in pair:
      raise ValueError(f"--zero_shot_files entries must be name=path, got {pair!r}.")
    name, path = pair.split("=", 1)
    out.setdefault(name, []).append(path)
  return out


def make_evaluator(spec: Optional[str], workdir: str, trained, use_ema: bool = True):
  """The generative-perplexity evaluator named by --evaluator (see the module doc)."""
  from armd_jax import eval as ev  # pylint: disable=g-import-not-at-top
  if spec and spec.startswith("hf:"):
    return ev.HFEvaluator.from_pretrained(spec[3:])
  if spec:
    return ev.ModelEvaluator.from_workdir(spec, use_ema=use_ema)
  from armd_jax import registry  # pylint: disable=g-import-not-at-top
  kind = trained.model_config.kind
  if not registry.get_kind(kind).exact_scorer:
    raise ValueError(f"an {kind!r} workdir cannot score its own samples: pass --evaluator="
                     "AR_WORKDIR (or hf:NAME).")
  return ev.ModelEvaluator(trained.model, trained.params, trained.vocab,
                           name=f"checkpoint {workdir} (step {trained.step}; the generator "
                           "itself)")


def evaluate_workdir(workdir: str, *, order: Optional[str] = None, streams: int = 1,
                     num_steps: int = 128, mc_samples: int = 1,
                     max_batches: Optional[int] = None, heldout: bool = True,
                     zero_shot: Optional[List[str]] = None,
                     zero_shot_files: Optional[Dict[str, List[str]]] = None,
                     batch_size: int = 16, seq_len: Optional[int] = None,
                     gen_samples: int = 0, gen_length: int = 128, gen_streams: int = 1,
                     gen_num_steps: Optional[int] = None, evaluator: Optional[str] = None,
                     mauve_bootstrap: int = 50, temperature: float = 1.0, seed: int = 0,
                     use_ema: bool = True,
                     log=print) -> Dict[str, object]:
  """Runs every requested evaluation of a workdir; returns a JSON-ready dict.

  Raises:
    FileNotFoundError: no checkpoint in the workdir.
    ValueError: an order the model kind does not support, unknown zero-shot sets, bad
      files.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from armd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from armd_jax import eval as ev  # pylint: disable=g-import-not-at-top
  from armd_jax import train  # pylint: disable=g-import-not-at-top

  trained = train.load_trained(workdir, use_ema=use_ema)
  kind = trained.model_config.kind
  eval_order = (ev.default_order(kind) if order is None else
                ev.EvalOrder(order, streams=streams, num_steps=num_steps))
  ev.likelihood_label(kind, eval_order)  # fail early on an unsupported order
  rng = jax.random.PRNGKey(seed)
  seq_len = seq_len or int(trained.config.train.seq_len)
  results: Dict[str, object] = {"workdir": workdir, "step": trained.step, "model_kind": kind}
  log(f"{workdir}: {kind} model at step {trained.step}")

  @functools.cache  # built once, whether held-out perplexity, MAUVE or both read it
  def datasets():
    return data_lib.create_datasets(
        trained.config.data, seq_len=int(trained.config.train.seq_len),
        global_batch_size=int(trained.config.train.global_batch_size), workdir=workdir,
        seed=int(trained.config.train.seed), process_index=0, process_count=1)

  if heldout:
    result = ev.evaluate_perplexity(trained.model, trained.params, datasets().eval_batches(),
                                    order=eval_order, rng=rng, num_samples=mc_samples,
                                    max_batches=max_batches, log=log)
    log(f"held-out: {result}")
    results["heldout"] = result.as_dict()

  files = zero_shot_files or {}
  for name in (zero_shot or []):
    texts = ev.zero_shot.load_texts(name, paths=files.get(name))
    batches = ev.zero_shot.encode_batches(texts, trained.vocab, seq_len=seq_len,
                                          batch_size=batch_size,
                                          packing=ev.zero_shot.PACKING[name])
    result = ev.evaluate_perplexity(trained.model, trained.params, batches, order=eval_order,
                                    rng=rng, num_samples=mc_samples,
                                    max_batches=max_batches, log=log)
    log(f"zero-shot {name}: {result}")
    results[f"zero_shot/{name}"] = result.as_dict()

  if gen_samples:
    from armd_jax import sampling  # pylint: disable=g-import-not-at-top
    scorer = make_evaluator(evaluator, workdir, trained, use_ema)
    out = ev.generate_samples(trained.model, trained.params, jax.random.fold_in(rng, 7),
                              batch_size=gen_samples, length=gen_length, streams=gen_streams,
                              num_steps=gen_num_steps, warmup=False,
                              sampler=sampling.SamplerConfig(temperature=temperature))
    result = ev.generative_perplexity(out.tokens, scorer, vocab=trained.vocab)
    quality = {**result.as_dict()}
    if not isinstance(scorer, ev.ModelEvaluator):
      mauve_text = ("MAUVE not computed (its features come from one of our models: "
                    "--evaluator=WORKDIR)")
    elif gen_samples < 2:
      mauve_text = "MAUVE not computed (needs --gen_samples >= 2)"
    else:
      ref_tokens, ref_mask = ev.take_rows(datasets().eval_batches(), gen_samples, gen_length)
      mauve = ev.mauve_score(
          ev.evaluator_features(out.tokens, scorer, vocab=trained.vocab),
          ev.evaluator_features(ref_tokens, scorer, vocab=trained.vocab, mask=ref_mask),
          evaluator=scorer.name, num_bootstrap=mauve_bootstrap, seed=seed)
      quality.update(mauve.as_dict())
      mauve_text = str(mauve)
    log(f"samples ({gen_samples} x {gen_length}, streams {gen_streams}, {out.num_calls} "
        f"network calls, {out.seconds / gen_samples:.3f} s/sample): {result}; {mauve_text}")
    results["generative"] = {**quality, "num_calls": out.num_calls,
                             "seconds_per_sample": out.seconds / gen_samples,
                             "streams": gen_streams, "length": gen_length}
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  from armd_jax import platforms  # pylint: disable=g-import-not-at-top
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a host without a TPU
  f = flags.FLAGS
  try:
    results = evaluate_workdir(
        f.workdir, order=f.order, streams=f.streams, num_steps=f.num_steps,
        mc_samples=f.mc_samples, max_batches=f.max_batches, heldout=f.heldout,
        zero_shot=f.zero_shot, zero_shot_files=parse_files(f.zero_shot_files),
        batch_size=f.batch_size, seq_len=f.seq_len, gen_samples=f.gen_samples,
        gen_length=f.gen_length, gen_streams=f.gen_streams, gen_num_steps=f.gen_num_steps,
        evaluator=f.evaluator, mauve_bootstrap=f.mauve_bootstrap, temperature=f.temperature,
        seed=f.seed, use_ema=f.use_ema)
  except (FileNotFoundError, ValueError, ImportError) as e:
    raise SystemExit(f"error: {e}") from None
  if f.output:  # a local file or URL, like the workdir
    storage.write_atomic(f.output, json.dumps(results, indent=2))
    print(f"wrote {f.output}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
