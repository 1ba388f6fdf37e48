"""Data: corpora, vocabularies, packing and the grain pipeline (spec: issue 3, item 1).

The only package that touches seqio / TensorFlow / Hugging Face, and only lazily, inside
the functions of the tasks that need them: `import armd_jax.data` stays light.

Public API:
  default_config()            the `config.data` ConfigDict, every field documented.
  create_datasets(...)        -> Datasets(train_iter, eval_batches(), vocab, ...).
  load_vocab(config, workdir) the run's vocabulary, rebuilt from the workdir.
  Vocabulary                  protocol: vocab_size, pad_id, eos_id, encode, decode.
  make_seqio_task(...)        the seqio Task of a config (imports seqio).
"""

from armd_jax.data.config import DataConfig, default_config
from armd_jax.data.pipeline import Datasets, Examples, create_datasets, make_global_batch
from armd_jax.data.tasks import make_seqio_task
from armd_jax.data.vocab import (ByteVocabulary, HuggingFaceVocabulary, SentencePieceVocabulary,
                                 Vocabulary, load_vocab)

__all__ = [
    "ByteVocabulary", "DataConfig", "Datasets", "Examples", "HuggingFaceVocabulary",
    "SentencePieceVocabulary", "Vocabulary", "create_datasets", "default_config",
    "load_vocab", "make_global_batch", "make_seqio_task",
]
