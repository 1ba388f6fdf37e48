"""Generation and scoring for ARMD: exact KV-cached decoding in any block order.

Public API:
- `SamplerConfig(temperature, top_k, top_p, greedy, noise='precise'|'fast')`.
- `generate(model, params, rng, *, batch_size, length, streams=1, prompt=None,
  infill=None, sampler=SamplerConfig(), order=None|'confidence'|block_ids, k=1,
  criterion='max_prob', stop_at_eos=False, eos_id=None, pad_id=0) -> GenerateOutput`
  (`.tokens`, `.num_calls`, `.log_probs`, `.block_ids`, `.valid`, `.drawn`).
- `score(model, params, tokens, block_ids, positions=None) -> [B, N]` log-probs.
- `decode(...)`: the engine behind both (also runs the full-recompute reference).

Files: `generation.py` (`generate`), `decoding.py` (the decode driver: `decode`,
`score`), `cache.py` (one network call against the KV caches), `confidence_order.py`
(`order='confidence'`), `plan.py` (which positions each call handles), `sampler.py`
(drawing a token); `ar.py` and `mdlm.py` sample the baselines. See `docs/sampling.md`.
"""

from armd_jax.sampling.confidence_order import CRITERIA, confidence, confidence_calls
from armd_jax.sampling.decoding import decode, score
from armd_jax.sampling.generation import GenerateOutput, generate, truncate_at_eos
from armd_jax.sampling.plan import Plan, conditional_strided_order, make_plan
from armd_jax.sampling.sampler import (SamplerConfig, exponential_noise, filter_logits,
                                       sample_logits)

__all__ = ["CRITERIA", "GenerateOutput", "Plan", "SamplerConfig", "confidence",
           "confidence_calls", "decode", "exponential_noise", "filter_logits", "generate",
           "conditional_strided_order", "make_plan", "sample_logits", "score",
           "truncate_at_eos"]
