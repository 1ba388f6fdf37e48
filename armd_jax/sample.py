"""The sample command: decoded text from a trained workdir.

  python -m armd_jax.sample --workdir=DIR --num_samples=4 --length=256 --streams=4 \
      [--prompt="ROMEO:"] [--temperature=0.8] [--top_k=0] [--top_p=1.0] [--greedy]

Loads the latest checkpoint (EMA parameters when the run kept them, unless
--nouse_ema), generates with `armd_jax.sampling.generate` (KV-cached, S strided
streams: N/S + S - 1 network calls, plus one per prompt token) and prints each sample,
the number of network calls and tokens/s. tokens/s is measured on a second, timed run
after a warm-up run that compiles the decoder (--nowarmup times the first run,
compilation included). A workdir without a checkpoint, a length beyond the model's
max_len, or S not dividing the generated length is a clear error.

Baselines trained by the same code sample through the same command (each kind's
generator comes from `armd_jax.registry`): kind 'ar' decodes one token per call
(--streams must be 1); kind 'mdlm' runs --num_steps ancestral steps, by default
N/S + S - 1 for N generated tokens (ARMD's call count at the same S).
"""

from __future__ import annotations

import dataclasses
import time
from typing import List, Optional

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Number of samples (batch size).")
_LENGTH = flags.DEFINE_integer("length", 256, "Tokens per sample (<= model max_len).")
_STREAMS = flags.DEFINE_integer("streams", 1, "Strided parallel streams S (1 = sequential).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text placed at the start of every sample.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0 = off).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Argmax decoding.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Use EMA parameters when present.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "MDLM only: reverse steps (default: "
                                  "N/S + S - 1, ARMD's call count at S = --streams).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile with an untimed run before timing.")
flags.mark_flags_as_required(["workdir"])


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """Samples from a workdir: decoded `texts`, `tokens` [B, N], `num_calls`, timing."""

  texts: List[str]
  tokens: object
  num_calls: int
  seconds: float
  tokens_per_second: float
  step: int


def sample_from_workdir(workdir: str, *, num_samples: int = 4, length: int = 256,
                        streams: int = 1, prompt: Optional[str] = None, sampler=None,
                        seed: int = 0, use_ema: bool = True, step: Optional[int] = None,
                        num_steps: Optional[int] = None, warmup: bool = True) -> SampleResult:
  """Loads a trained workdir and generates `num_samples` sequences of `length` tokens.

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    ValueError: bad length (> max_len), streams, prompt or sampler settings.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from armd_jax import sampling, train  # pylint: disable=g-import-not-at-top

  sampler = sampling.SamplerConfig() if sampler is None else sampler
  if num_samples < 1:
    raise ValueError(f"--num_samples must be >= 1, got {num_samples}.")
  trained = train.load_trained(workdir, use_ema=use_ema, step=step)
  cfg = trained.model_config
  if length > cfg.max_len:
    raise ValueError(f"--length={length} exceeds the model's max_len={cfg.max_len} "
                     f"(config.model.max_len of {workdir}).")
  prompt_ids = None
  if prompt:
    prompt_ids = np.asarray(trained.vocab.encode(prompt), np.int32)
    if len(prompt_ids) >= length:
      raise ValueError(f"--prompt is {len(prompt_ids)} tokens long; --length={length} leaves "
                       "nothing to generate.")
  if (length - (0 if prompt_ids is None else len(prompt_ids))) % streams:
    raise ValueError(f"--streams={streams} must divide the number of generated tokens "
                     f"(--length minus the prompt: "
                     f"{length - (0 if prompt_ids is None else len(prompt_ids))}).")

  from armd_jax import registry  # pylint: disable=g-import-not-at-top
  generate = registry.get_kind(cfg.kind).generate

  def run(rng):
    return generate(trained.model, trained.params, rng, batch_size=num_samples, length=length,
                    streams=streams, prompt=prompt_ids, sampler=sampler, num_steps=num_steps)

  rng = jax.random.PRNGKey(seed)
  if warmup:
    jax.block_until_ready(run(jax.random.fold_in(rng, 1)).tokens)
  start = time.perf_counter()
  out = run(rng)
  tokens = np.asarray(jax.block_until_ready(out.tokens))
  seconds = time.perf_counter() - start
  texts = [trained.vocab.decode(row.tolist()) for row in tokens]
  return SampleResult(texts, tokens, int(out.num_calls), seconds,
                      num_samples * length / seconds, trained.step)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from armd_jax import sampling  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:  # orbax logs every restore at INFO
    logging.set_verbosity(logging.WARNING)
  try:
    sampler = sampling.SamplerConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                     top_p=_TOP_P.value, greedy=_GREEDY.value)
    result = sample_from_workdir(
        _WORKDIR.value, num_samples=_NUM_SAMPLES.value, length=_LENGTH.value,
        streams=_STREAMS.value, prompt=_PROMPT.value, sampler=sampler, seed=_SEED.value,
        use_ema=_USE_EMA.value, step=_STEP.value, num_steps=_NUM_STEPS.value,
        warmup=_WARMUP.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  for i, text in enumerate(result.texts):
    print(f"--- sample {i} ---\n{text}", flush=True)
  print(f"step {result.step}: {len(result.texts)} samples x {_LENGTH.value} tokens, "
        f"{_STREAMS.value} stream(s), {result.num_calls} network calls, "
        f"{result.seconds:.2f} s ({result.tokens_per_second:.1f} tokens/s"
        f"{'' if _WARMUP.value else ', compilation included'}).", flush=True)


if __name__ == "__main__":
  app.run(main)
