"""The data section of the experiment config: defaults, documentation and validation.

`default_config()` returns the ml-collections `ConfigDict` that experiment configs override
(`config.data`); `DataConfig.from_config` turns it once into a typed, validated, frozen
dataclass that the rest of `armd_jax.data` reads.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections
from ml_collections import config_dict

TASKS = ("text_files", "tiny_shakespeare", "lm1b", "openwebtext", "synthetic")
SEQIO_PREFIX = "seqio:"  # task 'seqio:NAME': any registered seqio Task or Mixture
VOCABS = ("byte", "sentencepiece", "hf", "seqio")
PACKINGS = ("concat", "pad")
DOCUMENT_SPLITS = ("file", "paragraph", "line")


def default_config() -> ml_collections.ConfigDict:
  """Returns the data config with every field at its default (one comment per field).

  Optional fields are typed placeholders (value None) so that `--config.data.x=...`
  overrides them from the command line.
  """
  c = ml_collections.ConfigDict()
  # Which corpus: 'text_files' (local UTF-8 files), 'tiny_shakespeare' (TFDS),
  # 'lm1b' (TFDS), 'openwebtext' (Hugging Face `datasets`), 'synthetic' (in-memory
  # Markov text that needs no files; for tests and smoke runs), or 'seqio:NAME' (any
  # registered seqio Task or Mixture; its modules named by `seqio_module`).
  c.task = "text_files"
  # text_files: training files, one path or a glob; several separated by commas.
  c.train_files = ""
  # text_files: held-out files (path/glob/commas); '' = hold out `eval_fraction` of the
  # training documents instead.
  c.eval_files = ""
  # text_files: what one document is: 'file' (a whole file), 'paragraph' (blank-line
  # separated) or 'line'. Documents are joined with EOS ('concat') or padded ('pad').
  c.document_split = "file"
  # Fraction of documents held out when there is no explicit eval split (text_files
  # without eval_files, openwebtext, synthetic). A single document is cut at a line
  # boundary instead, its last `eval_fraction` of characters held out.
  c.eval_fraction = 0.1
  # TFDS tasks: data_dir of prepared TFDS datasets (None = the TFDS default).
  c.tfds_data_dir = config_dict.placeholder(str)
  # openwebtext: Hugging Face dataset name passed to `datasets.load_dataset`.
  c.hf_dataset = "openwebtext"
  # Cap on training documents read (0 = all); for quick runs on large corpora.
  c.max_train_documents = 0
  # Cap on held-out documents read (0 = all).
  c.max_eval_documents = 0
  # Tokenizer: 'byte' (UTF-8 bytes + pad/eos/unk, 259 ids), 'sentencepiece' (trained
  # on the training split and cached in the workdir, or `sentencepiece_model`), or 'hf'
  # (Hugging Face tokenizer files, `hf_tokenizer`). None = the task's default: 'hf'
  # with bert-base-uncased for lm1b, 'hf' with gpt2 for openwebtext, 'byte' otherwise.
  c.vocab = config_dict.placeholder(str)
  # sentencepiece: vocabulary size of the model trained on the corpus.
  c.sentencepiece_vocab_size = 1024
  # sentencepiece: 'unigram' or 'bpe' model trained on the corpus.
  c.sentencepiece_model_type = "unigram"
  # sentencepiece: an existing .model file to use instead of training one ('' = train).
  c.sentencepiece_model = ""
  # sentencepiece: training reads at most this many characters of the training split.
  c.sentencepiece_max_chars = 20_000_000
  # hf: a tokenizer.json file, a directory holding one, or a hub name such as 'gpt2'
  # (hub names need `transformers` and network access). '' = the task's default.
  c.hf_tokenizer = ""
  # Packing into fixed-length examples: 'concat' (documents joined with EOS and cut into
  # windows of seq_len; no padding) or 'pad' (each document + EOS alone, padded; long
  # documents split into several examples).
  c.packing = "concat"
  # Shuffle seed of the training stream; None = the `seed` passed to create_datasets.
  c.seed = config_dict.placeholder(int)
  # Directory of the tokenised-corpus cache; '' = <workdir>/data_cache. On multi-host
  # runs with a remote workdir, point this at a local disk.
  c.cache_dir = ""
  # False: process 0 tokenises into cache_dir and the others wait for it (a shared
  # disk). True: every process builds its own copy (cache_dir on each host's local disk).
  c.cache_per_process = False
  # grain read threads for the training iterator (0 = read in the training thread).
  c.num_threads = 1
  # grain prefetch buffer (batches) when num_threads > 0.
  c.prefetch_buffer_size = 4
  # seqio:NAME tasks: modules that register the Task / Mixture when imported, comma
  # separated: importable module names ('my_project.tasks') or .py file paths.
  c.seqio_module = ""
  # seqio:NAME tasks: the Task's split read as our 'train' split.
  c.seqio_train_split = "train"
  # seqio:NAME tasks: the Task's split read as our held-out 'eval' split.
  c.seqio_eval_split = "validation"
  # seqio:NAME tasks: the output feature holding token ids (its vocabulary is the run's).
  c.seqio_feature = "targets"
  # synthetic: number of documents (sentences) generated.
  c.synthetic_num_documents = 4000
  # synthetic: seed of the Markov chain and of the generated text.
  c.synthetic_seed = 0
  return c


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Typed, validated view of `default_config()`; see there for each field."""

  task: str = "text_files"
  train_files: str = ""
  eval_files: str = ""
  document_split: str = "file"
  eval_fraction: float = 0.1
  tfds_data_dir: Optional[str] = None
  hf_dataset: str = "openwebtext"
  max_train_documents: int = 0
  max_eval_documents: int = 0
  vocab: Optional[str] = None
  sentencepiece_vocab_size: int = 1024
  sentencepiece_model_type: str = "unigram"
  sentencepiece_model: str = ""
  sentencepiece_max_chars: int = 20_000_000
  hf_tokenizer: str = ""
  packing: str = "concat"
  seed: Optional[int] = None
  cache_dir: str = ""
  cache_per_process: bool = False
  num_threads: int = 1
  prefetch_buffer_size: int = 4
  seqio_module: str = ""
  seqio_train_split: str = "train"
  seqio_eval_split: str = "validation"
  seqio_feature: str = "targets"
  synthetic_num_documents: int = 4000
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
