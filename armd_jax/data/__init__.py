"""Data: corpora, vocabularies, packing and the grain pipeline.

The only package that touches seqio / TensorFlow / Hugging Face, and only lazily, inside
the functions of the tasks that need them: `import armd_jax.data` stays light, and its
names are imported on first use (PEP 562), so `armd_jax.data.config` (which config files
reach through `armd_jax.train.defaults`) does not import grain.

Public API:
  default_config()            the `config.data` ConfigDict, every field documented.
  create_datasets(...)        -> Datasets(train_iter, eval_batches(), vocab, ...).
  load_vocab(config, workdir) the run's vocabulary, rebuilt from the workdir.
  Vocabulary                  protocol: vocab_size, pad_id, eos_id, encode, decode.
  make_seqio_task(...)        the seqio Task of a config (imports seqio).
"""

from armd_jax._lazy import lazy_exports

_EXPORTS = {
    "DataConfig": "config", "default_config": "config",
    "Datasets": "pipeline", "Examples": "pipeline", "create_datasets": "pipeline",
    "make_seqio_task": "tasks",
    "ByteVocabulary": "vocab", "HuggingFaceVocabulary": "vocab",
    "SentencePieceVocabulary": "vocab", "Vocabulary": "vocab", "load_vocab": "vocab",
}


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = sorted(_EXPORTS)
