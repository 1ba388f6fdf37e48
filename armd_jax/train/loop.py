"""`train_and_evaluate`: the one library call of `python -m armd_jax.main`.

One run: data (`armd_jax.data.create_datasets`) -> model (`build_model`) -> a train state
born sharded on the mesh -> resume (workdir checkpoint, else `init_from`, else scratch)
-> the jitted train step in a loop with progress lines, finite checks, periodic
left-to-right validation and checkpoints -> final evaluation -> optional samples.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from absl import logging

from armd_jax import registry, storage
from armd_jax.models import build_model
from armd_jax.train import checkpoints, lock, observe, partitioning, preemption
from armd_jax.train import state as state_lib
from armd_jax.train.settings import Settings, model_config_from, settings_from


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if it has one.

  Args:
    config: the experiment ConfigDict (see `configs/`); not modified.
    workdir: holds config.json, checkpoints/, metrics.jsonl, TensorBoard events and the
      data cache.

  Returns:
    The final metrics: the last train metrics and the final 'eval/*' metrics.

  Raises:
    ValueError: a bad config value (the message names `config.<section>.<field>`).
    observe.NonFiniteError: loss or grad norm became NaN/inf (names the step; the last
      good checkpoint is kept).
    lock.WorkdirBusyError: another live trainer holds `workdir` (raised on every
      process, naming the holder).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # our own copy, references resolved
  settings = settings_from(config)
  # One trainer per workdir: process 0 takes the lock, every process obeys its outcome.
  with lock.hold_workdir(workdir, settings.checkpoint.lock_timeout_s):
    return _train(config, settings, workdir)


def _train(config: ml_collections.ConfigDict, settings: Settings,
           workdir: str) -> Dict[str, float]:
  """The body of `train_and_evaluate`, run while holding the workdir lock."""
  from armd_jax import data as data_lib  # pylint: disable=g-import-not-at-top

  tc = settings.train
  logging.info("JAX devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
               jax.process_count())

  datasets = data_lib.create_datasets(
      config.data, seq_len=tc.seq_len, global_batch_size=tc.global_batch_size,
      workdir=workdir, seed=tc.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  fill_vocab_size(config, datasets.vocab.vocab_size)
  model_config = model_config_from(config)
  if tc.seq_len > model_config.max_len:
    raise ValueError(f"config.train.seq_len={tc.seq_len} exceeds config.model.max_len="
                     f"{model_config.max_len}.")
  model = build_model(model_config)

  mesh = partitioning.make_mesh(settings.mesh)
  rules = partitioning.rules_of(settings.mesh)
  partitioning.check_mesh(mesh, rules)
  partitioning.check_batch_size(tc.global_batch_size, mesh, rules)
  batch_shard = partitioning.batch_sharding(mesh, rules)
  init, abstract, shardings = state_lib.train_state_layout(
      model, settings.optim, tc.num_steps, tc.seq_len, tc.seed, mesh, rules)

  manager = checkpoints.make_manager(workdir, settings.checkpoint.max_to_keep,
                                     settings.checkpoint.async_save)
  state = resume_or_init(manager, init, abstract, datasets.train_iter, settings, workdir,
                         config)
  checkpoints.save_config(config, workdir)
  start = int(state.step)
  if jax.process_index() == 0:
    print(f"model {model_config.kind}: {count_params(state.params) / 1e6:.2f}M parameters, "
          f"mesh {dict(mesh.shape)}; training steps {start + 1}..{tc.num_steps} in {workdir}",
          flush=True)

  train_step = state_lib.make_train_step(model, settings.order, settings.optim, tc.num_steps,
                                         shardings, batch_shard, rules)
  eval_step = state_lib.make_eval_step(model, shardings.params, batch_shard, rules)
  writer = observe.Writer(workdir, tc.tensorboard)
  progress = observe.Progress(tc.num_steps, tc.global_batch_size * tc.seq_len, start)
  last_good = manager.latest_step()
  train_metrics: Dict[str, float] = {}
  pending = None  # (step, device metrics) checked one step late, so steps stay pipelined

  try:
    with preemption.Watch() as preempt:
      for step in range(start + 1, tc.num_steps + 1):  # `step` = steps done after this update
        batch = partitioning.global_batch(next(datasets.train_iter), batch_shard)
        state, metrics = train_step(state, batch)
        if step == start + 1:  # rates exclude compilation
          progress.restart(step, jax.block_until_ready(metrics))
        if pending is not None:
          observe.check_finite(pending[0], jax.device_get(pending[1]), last_good)
        pending = (step, metrics)
        is_last = step == tc.num_steps
        if step % tc.log_every == 0 or is_last:
          train_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          observe.check_finite(step, train_metrics, last_good)
          rates = progress.line(step, train_metrics)
          writer.write(step, {**{f"train/{k}": v for k, v in train_metrics.items()
                                 if k not in _SUMS}, **rates})
        if (tc.eval_every and step % tc.eval_every == 0) and not is_last:
          report_eval(writer, step, run_eval(eval_step, state, datasets, batch_shard, settings),
                      model_config.kind)
        stop = preempt.reached(step)  # a SIGTERM: save this step on every process, stop
        if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or is_last or stop:
          observe.check_finite(step, jax.device_get(metrics), last_good)
          checkpoints.save(manager, step, state, datasets.train_iter)
          last_good = step
        if stop and not is_last:
          raise preemption.Preempted(step)
  finally:  # let the last good checkpoint finish writing, even on errors
    manager.wait_until_finished()
    manager.close()

  final = run_eval(eval_step, state, datasets, batch_shard, settings)
  report_eval(writer, int(state.step), final, model_config.kind)
  if settings.sample.num_samples > 0:
    print_samples(model, state_lib.eval_params(state, settings.eval.use_ema), datasets.vocab,
                  settings)
  writer.close()
  return {**{f"train/{k}": v for k, v in train_metrics.items() if k not in _SUMS}, **final}


_SUMS = ("nll_sum", "correct_sum", "num_tokens", "num_scored", "num_masked")  # not logged


def fill_vocab_size(config: ml_collections.ConfigDict, data_vocab_size: int) -> None:
  """Sets config.model.vocab_size from the data when unset; checks it covers the data."""
  if config.model.get("vocab_size") is None:
    config.model.vocab_size = int(data_vocab_size)
  elif config.model.vocab_size < data_vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"data vocabulary ({data_vocab_size} ids); leave it None to fill it.")


def resume_or_init(manager, init, abstract, train_iter, settings: Settings, workdir: str,
                   config: ml_collections.ConfigDict) -> state_lib.TrainState:
  """Resume order: the workdir's newest checkpoint that restores, else `init_from`, else
  scratch. Process 0 decides and every process obeys (`checkpoints.restore_newest_good`):
  a checkpoint of another model (`config`, with vocab_size filled, vs config.json) is a
  ValueError that moves nothing; damaged ones are reported and moved aside; one saved by
  another process count restores the state and restarts the data iterator with a
  warning."""
  log = print if jax.process_index() == 0 else logging.warning
  restored = checkpoints.restore_newest_good(manager, workdir, config, abstract, train_iter,
                                             log)
  if restored is not None:
    logging.info("Resumed from %s at step %d.", checkpoints.checkpoint_dir(workdir),
                 restored.step)
    print(f"resuming from step {restored.step}", flush=True)
    return restored.state
  state = init()
  source = settings.checkpoint.init_from
  if source:
    saved, step = checkpoints.restore_state_arrays(source)
    saved_params, saved_ema = saved["params"], saved.get("ema_params") or saved["params"]
    how = ""
    source_dir = storage.path(source)
    if source_dir.name == checkpoints.CHECKPOINT_DIR:  # init_from=<workdir>/checkpoints
      source_dir = source_dir.parent
    source_config = (checkpoints.load_config(source_dir)
                     if (source_dir / checkpoints.CONFIG_FILE).exists() else None)
    if (source_config is not None and source_config.model.get("kind") == "ar"
        and config.model.get("kind") == "armd"):
      # An ARMD adapted from an AR run: shared weights copied, ARMD-only ones fresh.
      from armd_jax import convert  # pylint: disable=g-import-not-at-top
      adapt = lambda tree: convert.adapt_ar_params(  # noqa: E731
          tree, state.params, model_config_from(source_config),
          model_config_from(config), source=f"config.checkpoint.init_from={source!r}")
      saved_params, saved_ema = adapt(saved_params), adapt(saved_ema)
      how = ", AR weights adapted to ARMD"
    params = _put_like(saved_params, abstract.params, "params", source)
    ema = state.ema_params
    if ema is not None:
      ema = _put_like(saved_ema, abstract.ema_params, "ema_params", source)
    logging.info("Initialised parameters from %s (step %d%s).", source, step, how)
    print(f"initialised from {source} (step {step}{how})", flush=True)
    state = state.replace(params=params, ema_params=ema)
  return state


def _put_like(saved: Any, target: Any, name: str, source: str) -> Any:
  """Places a saved tree onto `target`'s shardings, checking structure and shapes."""
  if jax.tree.structure(saved) != jax.tree.structure(target):
    raise ValueError(f"config.checkpoint.init_from={source!r}: its {name} do not match this "
                     "model (different config.model?).")
  for (path, s), t in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(target)):
    if np.shape(s) != t.shape:
      raise ValueError(f"config.checkpoint.init_from={source!r}: {name}"
                       f"{jax.tree_util.keystr(path)} has shape {np.shape(s)}, this model "
                       f"needs {t.shape}.")
  return jax.tree.map(lambda s, t: jax.device_put(np.asarray(s, t.dtype), t.sharding), saved,
                      target)


def run_eval(eval_step, state: state_lib.TrainState, datasets, batch_shard,
             settings: Settings) -> Dict[str, float]:
  """Validation NLL (nats/token), perplexity and accuracy over `config.eval.num_batches`.

  Exact left-to-right for 'ar'/'armd'; an ELBO bound for 'mdlm', whose accuracy is over
  masked tokens. Batch i draws from `fold_in(PRNGKey(train.seed), i)`: every batch gets
  its own keys (so more batches lower the variance) and every evaluation of a run the
  same ones (so evaluations at different steps compare like with like).
  """
  params = state_lib.eval_params(state, settings.eval.use_ema)
  base = jax.random.PRNGKey(settings.train.seed)
  sums = {"nll_sum": 0.0, "correct_sum": 0.0, "num_tokens": 0.0, "num_scored": 0.0}
  for i, local in enumerate(datasets.eval_batches(settings.eval.num_batches or None)):
    out = jax.device_get(eval_step(params, partitioning.global_batch(local, batch_shard),
                                   jax.random.fold_in(base, i)))
    for k in sums:
      sums[k] += float(out[k])
  if sums["num_tokens"] == 0:
    raise ValueError("The held-out split is empty: check config.data (eval_files / "
                     "eval_fraction).")
  nll = sums["nll_sum"] / sums["num_tokens"]
  return {"eval/nll": nll, "eval/perplexity": float(np.exp(min(nll, 50.0))),
          "eval/bits_per_token": nll / np.log(2.0),
          "eval/accuracy": sums["correct_sum"] / max(sums["num_scored"], 1.0),
          "eval/num_tokens": sums["num_tokens"]}


def report_eval(writer: observe.Writer, step: int, metrics: Dict[str, float],
                kind: str = "armd") -> None:
  """Writes eval metrics and prints them on one line ('mdlm' NLLs are ELBO bounds)."""
  how = registry.get_kind(kind).validation_label
  writer.write(step, metrics)
  if jax.process_index() == 0:
    print(f"eval at step {step}: nll {metrics['eval/nll']:.4f}  perplexity "
          f"{metrics['eval/perplexity']:.3f}  accuracy {metrics['eval/accuracy']:.3f}  "
          f"({metrics['eval/num_tokens']:.0f} held-out tokens, {how})",
          flush=True)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def print_samples(model, params, vocab, settings: Settings) -> None:
  """Generates `config.sample.num_samples` sequences with the kind's generator
  (`armd_jax.registry`; 'mdlm' runs the matched step count) and prints them decoded."""
  from armd_jax import sampling  # pylint: disable=g-import-not-at-top

  sc = settings.sample
  sampler = sampling.SamplerConfig(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                                   noise=sc.noise)
  kind = model.config.kind
  out = registry.get_kind(kind).generate(model, params, jax.random.PRNGKey(sc.seed),
                                         batch_size=sc.num_samples, length=sc.length,
                                         streams=sc.streams, sampler=sampler)
  tokens = np.asarray(out.tokens)
  print(f"{sc.num_samples} samples of {sc.length} tokens ({kind}, {sc.streams} stream(s)), "
        f"{int(out.num_calls)} network calls:", flush=True)
  for i, row in enumerate(tokens):
    print(f"--- sample {i} ---\n{vocab.decode(row.tolist())}", flush=True)


__all__ = ["train_and_evaluate", "run_eval", "resume_or_init", "fill_vocab_size"]
