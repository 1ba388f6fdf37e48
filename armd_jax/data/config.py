"""The data section of the experiment config: defaults, documentation and validation.

`DataConfig` holds each field's default and meaning once; `default_config()` derives the
ml-collections `ConfigDict` that experiment configs override (`config.data`) from it, and
`DataConfig.from_config` turns that ConfigDict once into the typed, validated, frozen
dataclass that the rest of `armd_jax.data` reads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections

from armd_jax.config_dict import section_config

TASKS = ("text_files", "tiny_shakespeare", "lm1b", "openwebtext", "synthetic")
SEQIO_PREFIX = "seqio:"  # task 'seqio:NAME': any registered seqio Task or Mixture
VOCABS = ("byte", "sentencepiece", "hf", "seqio")
PACKINGS = ("concat", "pad")
DOCUMENT_SPLITS = ("file", "paragraph", "line")


def default_config() -> ml_collections.ConfigDict:
  """Returns the `config.data` ConfigDict at `DataConfig`'s defaults (documented there).

  Optional fields are typed placeholders (value None) so that `--config.data.x=...`
  overrides them from the command line.
  """
  return section_config(DataConfig)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data section: every field's default and meaning, written once here.

  `default_config()` is derived from these defaults; `from_config` validates a
  ConfigDict against them.
  """

  # Which corpus: 'text_files' (local UTF-8 files), 'tiny_shakespeare' (TFDS),
  # 'lm1b' (TFDS), 'openwebtext' (Hugging Face `datasets`), 'synthetic' (in-memory
  # Markov text that needs no files; for tests and smoke runs), or 'seqio:NAME' (any
  # registered seqio Task or Mixture; its modules named by `seqio_module`).
  task: str = "text_files"
  # text_files: training files, one path or a glob; several separated by commas.
  train_files: str = ""
  # text_files: held-out files (path/glob/commas); '' = hold out `eval_fraction` of the
  # training documents instead.
  eval_files: str = ""
  # text_files: what one document is: 'file' (a whole file), 'paragraph' (blank-line
  # separated) or 'line'. Documents are joined with EOS ('concat') or padded ('pad').
  document_split: str = "file"
  # Fraction of documents held out when there is no explicit eval split (text_files
  # without eval_files, openwebtext, synthetic). A single document is cut at a line
  # boundary instead, its last `eval_fraction` of characters held out.
  eval_fraction: float = 0.1
  # TFDS tasks: data_dir of prepared TFDS datasets (None = the TFDS default).
  tfds_data_dir: Optional[str] = None
  # openwebtext: Hugging Face dataset name passed to `datasets.load_dataset`.
  hf_dataset: str = "openwebtext"
  # Cap on training documents read (0 = all); for quick runs on large corpora.
  max_train_documents: int = 0
  # Cap on held-out documents read (0 = all).
  max_eval_documents: int = 0
  # Tokenizer: 'byte' (UTF-8 bytes + pad/eos/unk, 259 ids), 'sentencepiece' (trained
  # on the training split and cached in the workdir, or `sentencepiece_model`), or 'hf'
  # (Hugging Face tokenizer files, `hf_tokenizer`). None = the task's default: 'hf'
  # with bert-base-uncased for lm1b, 'hf' with gpt2 for openwebtext, 'byte' otherwise.
  vocab: Optional[str] = None
  # sentencepiece: vocabulary size of the model trained on the corpus.
  sentencepiece_vocab_size: int = 1024
  # sentencepiece: 'unigram' or 'bpe' model trained on the corpus.
  sentencepiece_model_type: str = "unigram"
  # sentencepiece: an existing .model file to use instead of training one ('' = train).
  sentencepiece_model: str = ""
  # sentencepiece: training reads at most this many characters of the training split.
  sentencepiece_max_chars: int = 20_000_000
  # hf: a tokenizer.json file, a directory holding one, or a hub name such as 'gpt2'
  # (hub names need `transformers` and network access). '' = the task's default.
  hf_tokenizer: str = ""
  # Packing into fixed-length examples: 'concat' (documents joined with EOS and cut into
  # windows of seq_len; no padding) or 'pad' (each document + EOS alone, padded; long
  # documents split into several examples).
  packing: str = "concat"
  # Shuffle seed of the training stream; None = the `seed` passed to create_datasets.
  seed: Optional[int] = None
  # Directory of the tokenised-corpus cache; '' = <workdir>/data_cache. On multi-host
  # runs with a remote workdir, point this at a local disk.
  cache_dir: str = ""
  # False: process 0 tokenises into cache_dir and the others wait for it (a shared
  # disk). True: every process builds its own copy (cache_dir on each host's local disk).
  cache_per_process: bool = False
  # grain read threads for the training iterator (0 = read in the training thread).
  num_threads: int = 1
  # grain prefetch buffer (batches) when num_threads > 0.
  prefetch_buffer_size: int = 4
  # seqio:NAME tasks: modules that register the Task / Mixture when imported, comma
  # separated: importable module names ('my_project.tasks') or .py file paths.
  seqio_module: str = ""
  # seqio:NAME tasks: the Task's split read as our 'train' split.
  seqio_train_split: str = "train"
  # seqio:NAME tasks: the Task's split read as our held-out 'eval' split.
  seqio_eval_split: str = "validation"
  # seqio:NAME tasks: the output feature holding token ids (its vocabulary is the run's).
  seqio_feature: str = "targets"
  # seqio:NAME tasks: True = each process reads only its shard of the training split
  # (`seqio.ShardInfo(process_index, process_count)`) into its own cache entry and
  # draws its local batches from it, so no process tokenises the whole split (the
  # global batch then depends on the process count). The held-out split is read whole.
  # False = one global training stream, the same for any process count.
  seqio_shard_by_process: bool = False
  # synthetic: number of documents (sentences) generated.
  synthetic_num_documents: int = 4000
  # synthetic: seed of the Markov chain and of the generated text.
  synthetic_seed: int = 0

  def __post_init__(self):
    if self.is_seqio:
      if not self.seqio_name:
        raise ValueError(f"config.data.task={self.task!r} must name a seqio Task or Mixture "
                         "after 'seqio:'.")
      if self.vocab not in (None, "seqio"):
        raise ValueError(f"config.data.vocab={self.vocab!r}: a seqio task brings its own "
                         "vocabulary (its output feature's); leave config.data.vocab unset.")
      object.__setattr__(self, "vocab", "seqio")
    else:
      _choice("task", self.task, TASKS + (SEQIO_PREFIX + "NAME",))
      if self.seqio_shard_by_process:
        raise ValueError(f"config.data.seqio_shard_by_process=True needs a task 'seqio:NAME', "
                         f"got {self.task!r}.")
      if self.vocab == "seqio":
        raise ValueError("config.data.vocab='seqio' needs a task 'seqio:NAME'.")
    _choice("packing", self.packing, PACKINGS)
    _choice("document_split", self.document_split, DOCUMENT_SPLITS)
    _choice("sentencepiece_model_type", self.sentencepiece_model_type, ("unigram", "bpe"))
    if self.vocab is None:
      object.__setattr__(self, "vocab", _DEFAULT_VOCAB.get(self.task, "byte"))
    _choice("vocab", self.vocab, VOCABS)
    if self.vocab == "hf" and not self.hf_tokenizer:
      if self.task not in _DEFAULT_HF_TOKENIZER:
        raise ValueError(f"config.data.vocab='hf' needs config.data.hf_tokenizer (a "
                         f"tokenizer.json path or a hub name) for task {self.task!r}.")
      object.__setattr__(self, "hf_tokenizer", _DEFAULT_HF_TOKENIZER[self.task])
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"config.data.eval_fraction={self.eval_fraction} must be in [0, 1).")
    if self.task == "text_files" and not self.train_files:
      raise ValueError("config.data.train_files must name a file or glob for "
                       "task='text_files'.")
    if (self.task == "text_files" and not self.eval_files and self.eval_fraction == 0.0):
      raise ValueError("config.data.eval_fraction must be > 0 when config.data.eval_files "
                       "is empty (no held-out split otherwise).")
    for name in ("max_train_documents", "max_eval_documents", "num_threads",
                 "prefetch_buffer_size"):
      if getattr(self, name) < 0:
        raise ValueError(f"config.data.{name}={getattr(self, name)} must be >= 0.")
    for name in ("sentencepiece_vocab_size", "sentencepiece_max_chars",
                 "synthetic_num_documents"):
      if getattr(self, name) <= 0:
        raise ValueError(f"config.data.{name}={getattr(self, name)} must be > 0.")
    if self.seed is not None and not 0 <= self.seed < 2**32:
      raise ValueError(f"config.data.seed={self.seed} must be in [0, 2**32).")

  @property
  def is_seqio(self) -> bool:
    """Whether the task is a registered seqio Task / Mixture ('seqio:NAME')."""
    return self.task.startswith(SEQIO_PREFIX)

  @property
  def seqio_name(self) -> str:
    """NAME of a 'seqio:NAME' task ('' otherwise)."""
    return self.task[len(SEQIO_PREFIX):] if self.is_seqio else ""

  @classmethod
  def from_config(cls, config) -> "DataConfig":
    """Builds a DataConfig from a ConfigDict / dict / DataConfig; unknown keys are errors."""
    if isinstance(config, DataConfig):
      return config
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"Unknown config.data field(s) {unknown}; known fields: {sorted(known)}.")
    return cls(**values)


_DEFAULT_VOCAB = {"lm1b": "hf", "openwebtext": "hf"}
_DEFAULT_HF_TOKENIZER = {"lm1b": "bert-base-uncased", "openwebtext": "gpt2"}


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"config.data.{name}={value!r} must be one of {list(choices)}.")
