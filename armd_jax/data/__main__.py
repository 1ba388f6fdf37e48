"""Prepare and inspect a run's data ahead of training.

  python -m armd_jax.data --config=configs/shakespeare.py --workdir=DIR [--config.data.x=y]

Builds the vocabulary and the tokenised-corpus cache in DIR exactly as training will
(so a long tokenisation, e.g. OpenWebText, can run before the accelerators are booked),
then prints corpus statistics and the first training examples decoded. Uses
`config.data` and `config.train.{seq_len, global_batch_size, seed}` of an experiment
config.
"""

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from armd_jax import data

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (vocab and data cache).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 2, "Training examples to print.")
flags.mark_flags_as_required(["config", "workdir"])


def summary(datasets: data.Datasets, num_examples: int) -> str:
  """Corpus statistics and the first `num_examples` training examples, decoded."""
  vocab = datasets.vocab
  train, held_out = datasets.train_examples, datasets.eval_examples
  lines = [
      f"vocabulary: {vocab!r} (pad {vocab.pad_id}, eos {vocab.eos_id})",
      f"train: {int(train.tokens.shape[0]):,} tokens -> {len(train):,} examples of "
      f"{datasets.seq_len}",
      f"eval:  {int(held_out.tokens.shape[0]):,} tokens -> {len(held_out):,} examples, "
      f"{datasets.num_eval_batches()} batches of {datasets.local_batch_size}",
      f"batch: {datasets.local_batch_size} per process x {datasets.process_count} process(es)",
  ]
  batch = next(iter(datasets.train_dataset.slice(slice(0, 1))))
  for i in range(min(num_examples, batch["tokens"].shape[0])):
    tokens, mask = batch["tokens"][i], batch["mask"][i]
    lines.append(f"--- example {i} ({int(mask.sum())} real tokens, "
                 f"{int(np.sum(tokens == vocab.eos_id))} eos) ---")
    lines.append(vocab.decode(tokens[mask == 1]))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  train = config.get("train", {})
  datasets = data.create_datasets(
      config.data, seq_len=int(train.get("seq_len", 128)),
      global_batch_size=int(train.get("global_batch_size", 8)), workdir=_WORKDIR.value,
      seed=int(train.get("seed", 0)), process_index=0, process_count=1)
  print(summary(datasets, _NUM_EXAMPLES.value))


if __name__ == "__main__":
  app.run(main)
