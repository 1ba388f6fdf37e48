"""The sample command: decoded text from a trained workdir.

  python -m armd_jax.sample --workdir=DIR --num_samples=4 --length=256 --streams=4 \
      [--prompt="ROMEO:"] [--temperature=0.8] [--top_k=0] [--top_p=1.0] [--greedy] \
      [--order=strided|confidence] [--per_call=K] [--criterion=max_prob] \
      [--stop_at_eos] [--noise=precise|fast]

Loads the latest checkpoint (EMA parameters when the run kept them, unless
--nouse_ema), generates with `armd_jax.sampling.generate` (KV-cached, S strided
streams: N/S + S - 1 network calls, plus one call that reads the whole prompt) and prints
each sample, the number of network calls, the decode time and tokens/s.
--order=confidence reveals the --per_call most confident positions per exact call after
probing every unrevealed one (2 ceil(U/K) - 1 calls). --stop_at_eos ends each sample at
its first EOS (`sampling.truncate_at_eos`: later generated positions are padding, not
printed; the prompt is kept as given). tokens/s is measured on a second, timed run
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

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with checkpoints (a "
                               "folder or a URL such as gs://BUCKET/RUN).",
                               allow_override=True)  # main.py defines it too
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
_ORDER = flags.DEFINE_enum("order", "strided", ["strided", "confidence"],
                           "ARMD generation order: strided streams or confidence-ordered.")
_PER_CALL = flags.DEFINE_integer("per_call", 1, "--order=confidence: positions revealed per "
                                 "exact call (k).")
_CRITERION = flags.DEFINE_enum("criterion", "max_prob", ["max_prob", "margin", "entropy"],
                               "--order=confidence: confidence measure.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", False, "End each sample at its first EOS.")
_NOISE = flags.DEFINE_enum("noise", "precise", ["precise", "fast"],
                           "Categorical noise: float64-equivalent 'precise' or float32 'fast'.")
flags.mark_flags_as_required(["workdir"])


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """Samples from a workdir: decoded `texts`, `tokens` [B, N] (padding after each row's
  first EOS with stop_at_eos), `num_calls`, timing."""

  texts: List[str]
  tokens: object
  num_calls: int
  seconds: float
  tokens_per_second: float
  step: int


def sample_from_workdir(workdir: str, *, num_samples: int = 4, length: int = 256,
                        streams: int = 1, prompt: Optional[str] = None, sampler=None,
                        seed: int = 0, use_ema: bool = True, step: Optional[int] = None,
                        num_steps: Optional[int] = None, warmup: bool = True,
                        order: str = "strided", per_call: int = 1, criterion: str = "max_prob",
                        stop_at_eos: bool = False) -> SampleResult:
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
  if order == "confidence" and streams != 1:
    raise ValueError("--order=confidence takes --streams=1.")
  if order == "strided" and (length - (0 if prompt_ids is None else len(prompt_ids))) % streams:
    raise ValueError(f"--streams={streams} must divide the number of generated tokens "
                     f"(--length minus the prompt: "
                     f"{length - (0 if prompt_ids is None else len(prompt_ids))}).")

  from armd_jax import registry  # pylint: disable=g-import-not-at-top
  generate = registry.get_kind(cfg.kind).generate

  def run(rng):
    options = {} if order == "strided" else dict(order=order, k=per_call, criterion=criterion)
    return generate(trained.model, trained.params, rng, batch_size=num_samples, length=length,
                    streams=streams, prompt=prompt_ids, sampler=sampler, num_steps=num_steps,
                    **options)

  rng = jax.random.PRNGKey(seed)
  if warmup:
    jax.block_until_ready(run(jax.random.fold_in(rng, 1)).tokens)
  start = time.perf_counter()
  out = run(rng)
  tokens = np.asarray(jax.block_until_ready(out.tokens))
  seconds = time.perf_counter() - start
  valid = np.ones(tokens.shape, bool)
  if stop_at_eos:  # every kind: the text ends at its first EOS (decode drops the EOS)
    known = np.zeros(tokens.shape, bool)
    known[:, :0 if prompt_ids is None else len(prompt_ids)] = True
    tokens, _, valid = sampling.truncate_at_eos(tokens, None, trained.vocab.eos_id,
                                                trained.vocab.pad_id, known=known)
    tokens, valid = np.asarray(tokens), np.asarray(valid)
  texts = [trained.vocab.decode(row[keep].tolist()) for row, keep in zip(tokens, valid)]
  return SampleResult(texts, tokens, int(out.num_calls), seconds,
                      int(valid.sum()) / seconds, trained.step)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from armd_jax import platforms, sampling  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS["verbosity"].present:  # orbax logs every restore at INFO
    logging.set_verbosity(logging.WARNING)
  platforms.skip_absent_tpu()  # no libtpu start-up errors on a host without a TPU
  try:
    sampler = sampling.SamplerConfig(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                     top_p=_TOP_P.value, greedy=_GREEDY.value,
                                     noise=_NOISE.value)
    result = sample_from_workdir(
        _WORKDIR.value, num_samples=_NUM_SAMPLES.value, length=_LENGTH.value,
        streams=_STREAMS.value, prompt=_PROMPT.value, sampler=sampler, seed=_SEED.value,
        use_ema=_USE_EMA.value, step=_STEP.value, num_steps=_NUM_STEPS.value,
        warmup=_WARMUP.value, order=_ORDER.value, per_call=_PER_CALL.value,
        criterion=_CRITERION.value, stop_at_eos=_STOP_AT_EOS.value)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  for i, text in enumerate(result.texts):
    print(f"--- sample {i} ---\n{text}", flush=True)
  how = (f"confidence order, {_PER_CALL.value} per call" if _ORDER.value == "confidence"
         else f"{_STREAMS.value} stream(s)")
  print(f"step {result.step}: {len(result.texts)} samples x {_LENGTH.value} tokens, {how}, "
        f"{result.num_calls} network calls, decode {result.seconds:.3f} s "
        f"({result.tokens_per_second:.1f} tokens/s"
        f"{'' if _WARMUP.value else ', compilation included'}"
        f"{', tokens after EOS not counted' if _STOP_AT_EOS.value else ''}).", flush=True)


if __name__ == "__main__":
  app.run(main)
