"""Generation and scoring for ARMD: exact KV-cached decoding in any block order.

Public API:
- `SamplerConfig(temperature, top_k, top_p, greedy)`.
- `generate(model, params, rng, *, batch_size, length, streams=1, prompt=None,
  infill=None, sampler=SamplerConfig()) -> GenerateOutput` (`.tokens`, `.num_calls`).
- `score(model, params, tokens, block_ids, positions=None) -> [B, N]` log-probs.
- `decode(...)`: the engine behind both (also runs the full-recompute reference).
See `docs/sampling.md`.
"""

from armd_jax.sampling.decoding import GenerateOutput, decode, generate, score
from armd_jax.sampling.plan import Plan, conditional_strided_order, make_plan
from armd_jax.sampling.sampler import SamplerConfig, filter_logits, sample_logits

__all__ = ["GenerateOutput", "Plan", "SamplerConfig", "decode", "filter_logits", "generate",
           "conditional_strided_order", "make_plan", "sample_logits", "score"]
