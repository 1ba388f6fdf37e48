"""Generation and scoring for ARMD: exact KV-cached decoding in any block order.

Public API:
- `SamplerConfig(temperature, top_k, top_p, greedy, noise='precise'|'fast')`.
- `generate(model, params, rng, *, batch_size, length, streams=1, prompt=None,
  infill=None, sampler=SamplerConfig(), order=None|'confidence'|block_ids, k=1,
  criterion='max_prob', stop_at_eos=False, eos_id=None, pad_id=0) -> GenerateOutput`
  (`.tokens`, `.num_calls`, `.log_probs`, `.block_ids`, `.valid`, `.drawn`).
- `score(model, params, tokens, block_ids, positions=None) -> [B, N]` log-probs.
- `decode(...)`: the engine behind both (also runs the full-recompute reference).
See `docs/sampling.md`.
"""

from armd_jax.sampling.decoding import (CRITERIA, GenerateOutput, confidence, confidence_calls,
                                        decode, generate, score, truncate_at_eos)
from armd_jax.sampling.plan import Plan, conditional_strided_order, make_plan
from armd_jax.sampling.sampler import (SamplerConfig, exponential_noise, filter_logits,
                                       sample_logits)

__all__ = ["CRITERIA", "GenerateOutput", "Plan", "SamplerConfig", "confidence",
           "confidence_calls", "decode", "exponential_noise", "filter_logits", "generate",
           "conditional_strided_order", "make_plan", "sample_logits", "score",
           "truncate_at_eos"]
