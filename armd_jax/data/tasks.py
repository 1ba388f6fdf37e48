"""seqio Tasks for every corpus (imports seqio / TensorFlow, inside the function only).

The training pipeline reads the same sources in python and tokenises them once into a
numpy cache (`armd_jax.data.cache`); these Tasks expose the identical corpus, split and
tokenisation to seqio users (mixtures, other frameworks, inspection). A test checks that
a Task's tokens equal the cache's.
"""

from __future__ import annotations

from armd_jax.data import sources
from armd_jax.data.config import DataConfig


def make_seqio_task(data_config, vocab, name: str | None = None):
  """Returns a `seqio.Task` for `config.data` with feature 'targets' (ids + EOS).

  Splits are 'train' and 'eval' (for TFDS tasks: train/test for lm1b, train/validation
  for tiny_shakespeare). `vocab` is one of our vocabularies (its `as_seqio()` is used).
  The Task is returned, not registered; `seqio.TaskRegistry.add_provider` registers it.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  config = DataConfig.from_config(data_config)
  name = name or f"armd_{config.task}"
  if config.task in sources.TFDS_TASKS:
    source = sources.tfds_source(config)
  else:

    def dataset_fn(split, shuffle_files, seed=None):
      del shuffle_files, seed  # documents keep their order; shuffling happens later
      return tf.data.Dataset.from_generator(
          functools.partial(sources.documents, config, split),
          output_signature=tf.TensorSpec([], tf.string)).map(lambda t: {"text": t})

    source = seqio.FunctionDataSource(dataset_fn, splits=sources.SPLITS)
  return seqio.Task(
      name, source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos,
      ],
      output_features={"targets": seqio.Feature(vocab.as_seqio(), add_eos=True)})
