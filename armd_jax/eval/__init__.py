"""Evaluation: exact/bound perplexity, zero-shot corpora, generative perplexity.

Public API:
  EvalOrder, default_order, likelihood_label    what is measured and its label.
  evaluate_perplexity(model, params, batches)   -> PerplexityResult (exact or bound).
  sequence_nll(model, params, batch, rng, order) per-sequence NLL sums (jitted).
  zero_shot: ZERO_SHOT_SETS, load_texts, encode_batches, detokenisers.
  generative_perplexity(tokens, evaluator)      -> GenerativeResult; unigram_entropy;
  ModelEvaluator (a checkpoint of this library), HFEvaluator (a HF causal LM).
Command: `python -m armd_jax.evaluate --workdir ...` (see its --help).
"""

from armd_jax.eval import zero_shot
from armd_jax.eval.generative import (GenerativeResult, HFEvaluator, ModelEvaluator,
                                      generative_perplexity, unigram_entropy)
from armd_jax.eval.perplexity import (BOUND, EXACT, EvalOrder, PerplexityResult, default_order,
                                      evaluate_perplexity, likelihood_label, sequence_nll)

__all__ = ["BOUND", "EXACT", "EvalOrder", "GenerativeResult", "HFEvaluator", "ModelEvaluator",
           "PerplexityResult", "default_order", "evaluate_perplexity", "generative_perplexity",
           "likelihood_label", "sequence_nll", "unigram_entropy", "zero_shot"]
