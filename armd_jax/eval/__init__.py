"""Evaluation: exact/bound perplexity, zero-shot corpora, generative perplexity.

Public API:
  EvalOrder, default_order, likelihood_label    what is measured and its label.
  evaluate_perplexity(model, params, batches)   -> PerplexityResult (exact or bound).
  sequence_nll(model, params, batch, rng, order) per-sequence NLL sums (jitted).
  zero_shot: ZERO_SHOT_SETS, load_texts, encode_batches, detokenisers.
  generative_perplexity(tokens, evaluator)      -> GenerativeResult; unigram_entropy;
  score_samples(tokens, evaluator)              -> SampleScores (per sample, scored once);
  sample_features, evaluator_features, mauve_score -> MauveResult (MAUVE under our
                                                evaluator, bootstrap 95% CI); take_rows;
  ModelEvaluator (a checkpoint of this library), HFEvaluator (a HF causal LM);
  generate_samples(model, params, rng, ...)     any kind, timed, matched call counts;
  generation_flops(model, params, ...)          FLOPs per sample of that generation.
Command: `python -m armd_jax.evaluate --workdir ...` (see its --help).
"""

from armd_jax.eval import mauve, zero_shot
from armd_jax.eval.generative import (GenerativeResult, HFEvaluator, ModelEvaluator, Samples,
                                      SampleScores, evaluator_features, generate_samples,
                                      generation_flops, generative_perplexity,
                                      sample_features, score_samples, take_rows,
                                      unigram_entropy)
from armd_jax.eval.mauve import MauveResult, mauve_score
from armd_jax.eval.perplexity import (BOUND, EXACT, EvalOrder, PerplexityResult, default_order,
                                      evaluate_perplexity, likelihood_label, sequence_nll)

__all__ = ["BOUND", "EXACT", "EvalOrder", "GenerativeResult", "HFEvaluator", "MauveResult",
           "ModelEvaluator", "PerplexityResult", "SampleScores", "Samples", "default_order",
           "evaluate_perplexity", "evaluator_features", "generate_samples", "generation_flops",
           "generative_perplexity", "likelihood_label", "mauve_score", "sample_features",
           "mauve", "score_samples", "sequence_nll", "take_rows", "unigram_entropy", "zero_shot"]
