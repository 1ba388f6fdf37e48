"""An lm-evaluation-harness backend for any workdir of ours (ARMD, AR or MDLM).

  python -m armd_jax.lm_eval --workdir=DIR --tasks=lambada_openai,piqa
      [--include_path=DIR [--noinclude_defaults]]
      [--order=left_to_right|strided --streams=S]
      [--generation=order|confidence --k=K] [--limit=N] [--batch_size=B]
      [--num_fewshot=F] [--mdlm_samples=M] [--output=FILE.json]

`ArmdLM` is an `lm_eval.api.model.TemplateLM` registered with the harness's model
registry as "armd_jax" (importing this module registers it), so the harness's own
`simple_evaluate(model="armd_jax", model_args={"workdir": DIR}, tasks=[...])` runs it;
the command above is a thin wrapper around that call and its `TaskManager`.

What each request type returns:
- `loglikelihood` (context, continuation): log p(continuation | context) and whether
  greedy decoding would reproduce it. 'armd' and 'ar': exact, one network pass per
  batch of requests (right padded, padding moved to a last block), the context as earlier
  singleton blocks and the continuation scored left to right, or, for ARMD with
  `order='strided'`, in S contiguous streams (`orders.strided_ids`), the exact likelihood of
  the strided sampler. Inputs longer than the model's max_len keep their rightmost tokens.
  'mdlm': minus a Monte Carlo negative ELBO of the continuation given the (unmasked)
  context: a bound in expectation, never exact; a warning says so and `describe()`
  labels it.
- `loglikelihood_rolling` (text): the document's log-likelihood given one EOS token,
  windowed with the harness's `get_rolling_token_windows` / `make_disjoint_window` so
  that every token is scored exactly once with as much context as max_len allows.
- `generate_until` (context, gen_kwargs): the workdir kind's generator
  (`armd_jax.registry`, for ARMD `armd_jax.sampling.generate`) with the context as the
  prompt: sequential (S = 1), strided (S streams) or confidence-ordered
  (`generation='confidence'`), greedy unless `do_sample`; `max_gen_toks` tokens are
  drawn and the text is cut at the first EOS and the first `until` string.

Tokenisation is the workdir's own vocabulary (`armd_jax.data.load_vocab`: bytes,
SentencePiece or a Hugging Face tokenizer); the harness's `TemplateLM` splits
(context, continuation) by encoding context + continuation, as its Hugging Face model does.

Files: `model.py` (`ArmdLM`, `BackendConfig`: the harness adapter), `scoring.py` (the
requests scored by our networks: batches, block ids, rolling windows), `cli.py` (`run`
and the command's flags).
"""

from __future__ import annotations

try:
  import lm_eval as _harness  # noqa: F401  (only checks the install)
except ImportError as e:  # pragma: no cover - depends on the install
  raise ImportError("armd_jax.lm_eval needs the lm-evaluation-harness: "
                    "pip install -e '.[eval]'.") from e

# pylint: disable=g-import-not-at-top
from armd_jax.lm_eval.cli import define_flags, main, run
from armd_jax.lm_eval.model import (GENERATIONS, MODEL_NAME, SCORING_ORDERS, ArmdLM,
                                    BackendConfig, cut_at_stops)
from armd_jax.lm_eval.scoring import (bucket_length, fit_pair, pair_block_ids,
                                      rolling_windows, score_mdlm, score_ordered)
from armd_jax.orders import strided_ids

__all__ = ["ArmdLM", "BackendConfig", "GENERATIONS", "MODEL_NAME", "SCORING_ORDERS",
           "bucket_length", "cut_at_stops", "define_flags", "fit_pair", "main",
           "pair_block_ids", "rolling_windows", "run", "score_mdlm", "score_ordered",
           "strided_ids"]
