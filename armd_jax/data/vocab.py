"""Vocabularies: byte-level, SentencePiece trained on the corpus, Hugging Face tokenizers.

Every vocabulary maps text to ids in python (no TensorFlow); `as_seqio()` returns the
matching seqio vocabulary for users of the seqio Tasks. Vocabulary files live in
`<workdir>/vocab/` so `load_vocab` rebuilds the vocabulary without reading the corpus.
The workdir may be a URL (`armd_jax.storage`): SentencePiece trains in a local folder and
the model is then copied to the workdir; every process loads a local copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Iterable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
from etils import epath

from armd_jax import storage
from armd_jax.data.config import DataConfig

VOCAB_DIR = "vocab"


@runtime_checkable
class Vocabulary(Protocol):
  """What the data pipeline, trainer and samplers need from a tokenizer."""

  vocab_size: int  # number of ids; every id is in [0, vocab_size)
  pad_id: int  # fills padded positions (whose mask is 0)
  eos_id: int  # ends every document

  def encode(self, text: str) -> list[int]:
    """Text -> ids (no EOS added)."""

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text; pad/eos/unk and out-of-range ids are dropped."""


class ByteVocabulary:
  """UTF-8 bytes shifted by 3: pad = 0, eos = 1, unk = 2, byte b = b + 3 (259 ids).

  The same ids as `seqio.ByteVocabulary()`.
  """

  num_special = 3
  pad_id = 0
  eos_id = 1
  unk_id = 2
  vocab_size = 256 + num_special
  fingerprint = "byte-v1"

  def encode(self, text: str) -> list[int]:
    """Text -> byte ids."""
    return [b + self.num_special for b in text.encode("utf-8")]

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """Many texts -> byte ids (vectorised; for tokenising whole corpora)."""
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int32) + self.num_special
            for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Byte ids -> text; special and out-of-range ids are dropped, bad UTF-8 replaced."""
    data = bytes(int(i) - self.num_special for i in ids
                 if self.num_special <= int(i) < self.vocab_size)
    return data.decode("utf-8", errors="replace")

  def as_seqio(self):
    """The equivalent `seqio.ByteVocabulary` (imports seqio)."""
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.ByteVocabulary()

  def __repr__(self):
    return "ByteVocabulary(vocab_size=259)"


class SentencePieceVocabulary:
  """A SentencePiece model file; ids follow seqio: pad = 0, eos = 1, unk = 2."""

  def __init__(self, model_file: str):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.model_file = model_file
    self._sp = spm.SentencePieceProcessor(model_file=model_file)
    self.vocab_size = int(self._sp.get_piece_size())
    self.pad_id = int(self._sp.pad_id())
    self.eos_id = int(self._sp.eos_id())
    if self.pad_id < 0 or self.eos_id < 0:
      raise ValueError(f"SentencePiece model {model_file} must define pad and eos ids "
                       f"(got pad={self.pad_id}, eos={self.eos_id}).")
    self.fingerprint = "spm-" + _file_digest(model_file)

  def encode(self, text: str) -> list[int]:
    """Text -> piece ids."""
    return list(self._sp.encode(text))

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Many texts -> piece ids (multi-threaded in SentencePiece)."""
    return self._sp.encode(texts)

  def decode(self, ids: Sequence[int]) -> str:
    """Piece ids -> text; pad/eos/unk and out-of-range ids are dropped."""
    special = {self.pad_id, self.eos_id, int(self._sp.unk_id())}
    return self._sp.decode([int(i) for i in ids
                            if 0 <= int(i) < self.vocab_size and int(i) not in special])

  def as_seqio(self):
    """The equivalent `seqio.SentencePieceVocabulary` (imports seqio)."""
    import seqio  # pylint: disable=g-import-not-at-top
    return seqio.SentencePieceVocabulary(self.model_file)

  def __repr__(self):
    return f"SentencePieceVocabulary({self.model_file!r}, vocab_size={self.vocab_size})"


class SeqioVocabulary:
  """The vocabulary of a 'seqio:NAME' task's output feature, wrapped (imports seqio).

  Ids are the seqio vocabulary's own; `fingerprint` names the task, feature and
  vocabulary, so the token cache of one task is never reused for another.
  """

  def __init__(self, vocabulary, task: str, feature: str):
    self._vocab = vocabulary
    self.vocab_size = int(vocabulary.vocab_size)
    self.pad_id = int(vocabulary.pad_id)
    self.eos_id = int(vocabulary.eos_id)
    if self.eos_id < 0:
      raise ValueError(f"seqio task {task!r}: the vocabulary of feature {feature!r} has no "
                       "EOS id; documents could not be separated when packed.")
    self.fingerprint = (f"seqio-{task}-{feature}-{type(vocabulary).__name__}-"
                        f"{self.vocab_size}-{self.pad_id}-{self.eos_id}")

  def encode(self, text: str) -> list[int]:
    """Text -> ids (the seqio vocabulary's `encode`)."""
    return [int(i) for i in self._vocab.encode(text)]

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text; pad, eos and out-of-range ids are dropped."""
    return self._vocab.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size
                               and int(i) not in (self.pad_id, self.eos_id)])

  def as_seqio(self):
    """The wrapped seqio vocabulary."""
    return self._vocab

  def __repr__(self):
    return f"SeqioVocabulary({self.fingerprint})"


def seqio_vocab(config: DataConfig) -> SeqioVocabulary:
  """The vocabulary of a 'seqio:NAME' task (imports its registry modules and seqio)."""
  from armd_jax.data import sources  # pylint: disable=g-import-not-at-top
  provider = sources.seqio_provider(config)
  return SeqioVocabulary(provider.output_features[config.seqio_feature].vocabulary,
                         config.seqio_name, config.seqio_feature)


_EOS_NAMES = ("<|endoftext|>", "[SEP]", "</s>", "<eos>", "<|end_of_text|>")
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")


class HuggingFaceVocabulary:
  """A Hugging Face tokenizer: a `tokenizer.json` file (via `tokenizers`) or a hub name.

  eos is the first of <|endoftext|>, [SEP], </s>, <eos> that the tokenizer knows; pad is
  [PAD]/<pad> when present, else eos (padding is marked by the batch mask anyway).
  """

  def __init__(self, name_or_path: str):
    self.name_or_path = name_or_path
    (self._encode, self._encode_batch, self._decode, self.vocab_size,
     token_to_id) = _load_hf(name_or_path)
    self.eos_id = _first_known(token_to_id, _EOS_NAMES)
    if self.eos_id is None:
      raise ValueError(f"Hugging Face tokenizer {name_or_path!r} has none of the EOS tokens "
                       f"{list(_EOS_NAMES)}.")
    pad = _first_known(token_to_id, _PAD_NAMES)
    self.pad_id = self.eos_id if pad is None else pad
    self._special = {self.pad_id, self.eos_id}
    if os.path.isfile(name_or_path):
      self.fingerprint = "hf-" + _file_digest(name_or_path)
    else:
      self.fingerprint = "hf-" + name_or_path

  def encode(self, text: str) -> list[int]:
    """Text -> ids without added special tokens."""
    return self._encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Many texts -> ids (parallel in the Rust tokenizer)."""
    return self._encode_batch(texts)

  def decode(self, ids: Sequence[int]) -> str:
    """Ids -> text; pad/eos and out-of-range ids are dropped."""
    return self._decode([int(i) for i in ids
                         if 0 <= int(i) < self.vocab_size and int(i) not in self._special])

  def as_seqio(self):
    """A seqio vocabulary that runs this tokenizer through `tf.numpy_function`."""
    return _hf_seqio_vocabulary(self)

  def __repr__(self):
    return f"HuggingFaceVocabulary({self.name_or_path!r}, vocab_size={self.vocab_size})"


def _load_hf(name_or_path: str):
  """(encode, encode_batch, decode, vocab_size, token_to_id) of a tokenizer file/dir/name."""
  path = name_or_path
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if os.path.isfile(path):
    try:
      import tokenizers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("config.data.vocab='hf' with a tokenizer.json needs the "
                        "`tokenizers` package: pip install -e '.[hf]'.") from e
    tok = tokenizers.Tokenizer.from_file(path)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    encode_batch = lambda texts: [e.ids for e in tok.encode_batch(texts,
                                                                   add_special_tokens=False)]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
    return (encode, encode_batch, decode, int(tok.get_vocab_size(with_added_tokens=True)),
            tok.token_to_id)
  if os.path.sep in name_or_path or name_or_path.endswith(".json"):
    raise FileNotFoundError(f"config.data.hf_tokenizer={name_or_path!r}: no such tokenizer "
                            "file or directory.")
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"config.data.hf_tokenizer={name_or_path!r} is a hub name and needs "
                      "`transformers` (pip install -e '.[hf]') and network access; or give "
                      "a local tokenizer.json.") from e
  tok = transformers.AutoTokenizer.from_pretrained(name_or_path)
  encode = lambda text: tok.encode(text, add_special_tokens=False)
  encode_batch = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
  decode = lambda ids: tok.decode(ids, skip_special_tokens=False)
  vocab = tok.get_vocab()
  return encode, encode_batch, decode, int(len(tok)), vocab.get


def _first_known(token_to_id: Callable[[str], Optional[int]], names) -> Optional[int]:
  for name in names:
    i = token_to_id(name)
    if i is not None:
      return int(i)
  return None


def _hf_seqio_vocabulary(vocab: HuggingFaceVocabulary):
  """Wraps a python tokenizer as a `seqio.Vocabulary` (defined lazily: imports seqio)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  class _PythonVocabulary(seqio.Vocabulary):

    def __init__(self):
      super().__init__(extra_ids=0)

    @property
    def eos_id(self):
      return vocab.eos_id

    @property
    def pad_id(self):
      return vocab.pad_id

    @property
    def unk_id(self):
      return None

    @property
    def _base_vocab_size(self):
      return vocab.vocab_size

    def _encode(self, s):
      return vocab.encode(s)

    def _decode(self, ids):
      return vocab.decode(ids)

    def _encode_tf(self, s):
      fn = lambda b: np.asarray(vocab.encode(b.decode("utf-8")), np.int32)
      out = tf.numpy_function(fn, [s], tf.int32)
      return tf.ensure_shape(out, [None])

    def _decode_tf(self, ids):
      fn = lambda a: vocab.decode(a.tolist()).encode("utf-8")
      return tf.numpy_function(fn, [ids], tf.string)

    def __eq__(self, other):
      return isinstance(other, _PythonVocabulary) and other.fingerprint == self.fingerprint

    fingerprint = vocab.fingerprint

  return _PythonVocabulary()


# ---------------------------------------------------------------------------------------
# Building and reloading.


def vocab_dir(workdir: storage.PathLike) -> epath.Path:
  """Where vocabulary files of a run live (a local folder or URL)."""
  return storage.path(workdir) / VOCAB_DIR


def sentencepiece_path(config: DataConfig, workdir: storage.PathLike) -> epath.Path:
  """Path of the SentencePiece model trained for `config` in `workdir`."""
  name = f"sentencepiece_{config.sentencepiece_model_type}_{config.sentencepiece_vocab_size}"
  return vocab_dir(workdir) / (name + ".model")


def load_vocab(data_config, workdir: storage.PathLike) -> Vocabulary:
  """Rebuilds the run's vocabulary from the workdir cache, without reading the corpus.

  Args:
    data_config: the `config.data` ConfigDict (or a DataConfig).
    workdir: the run directory given to `create_datasets`.

  Raises:
    FileNotFoundError: the vocabulary was never built in this workdir (run training
      first, or point `config.data.sentencepiece_model` at a model file).
  """
  config = DataConfig.from_config(data_config)
  if config.vocab == "byte":
    return ByteVocabulary()
  if config.vocab == "seqio":
    return seqio_vocab(config)
  if config.vocab == "sentencepiece":
    path = config.sentencepiece_model or sentencepiece_path(config, workdir)
    if not storage.path(path).is_file():
      raise FileNotFoundError(f"No SentencePiece model at {path}: create_datasets(...) trains "
                              "and caches it; or set config.data.sentencepiece_model.")
    return SentencePieceVocabulary(storage.local_copy(path))
  copy = _workdir_hf_copy(config, workdir)
  if copy.is_file():
    return HuggingFaceVocabulary(storage.local_copy(copy))
  return HuggingFaceVocabulary(config.hf_tokenizer)


def build_vocab(config: DataConfig, workdir: storage.PathLike,
                training_text: Callable[[], Iterable[str]], *,
                is_writer: bool = True, wait_s: float = 3600.0) -> Vocabulary:
  """Returns the vocabulary of `config`, training/caching it in `workdir` when needed.

  Args:
    config: data config.
    workdir: run directory (local or URL); files go to `<workdir>/vocab/`.
    training_text: callable returning the training documents (read only if a
      SentencePiece model must be trained).
    is_writer: whether this process writes vocab files (process 0); other processes wait
      up to `wait_s` seconds for them to appear in the workdir.

  Raises:
    TimeoutError: a non-writer waited `wait_s` seconds for the SentencePiece model.
  """
  if config.vocab == "byte":
    return ByteVocabulary()
  if config.vocab == "seqio":
    return seqio_vocab(config)
  vocab_dir(workdir).mkdir(parents=True, exist_ok=True)
  if config.vocab == "sentencepiece":
    if config.sentencepiece_model:
      return SentencePieceVocabulary(storage.local_copy(config.sentencepiece_model))
    path = sentencepiece_path(config, workdir)
    if not path.is_file():
      if is_writer:
        train_sentencepiece(training_text(), path, vocab_size=config.sentencepiece_vocab_size,
                            model_type=config.sentencepiece_model_type,
                            max_chars=config.sentencepiece_max_chars)
      else:
        storage.wait_for(path, wait_s, "the SentencePiece model", poll_s=1.0)
    return SentencePieceVocabulary(storage.local_copy(path))
  copy = _workdir_hf_copy(config, workdir)
  if copy.is_file():
    return HuggingFaceVocabulary(storage.local_copy(copy))
  source = config.hf_tokenizer
  if os.path.isdir(source):
    source = os.path.join(source, "tokenizer.json")
  if os.path.isfile(source) and is_writer:
    storage.upload(source, copy)  # keeps the run self-contained
    return HuggingFaceVocabulary(storage.local_copy(copy))
  return HuggingFaceVocabulary(source)


def train_sentencepiece(documents: Iterable[str], path: storage.PathLike, *, vocab_size: int,
                        model_type: str = "unigram", max_chars: int = 20_000_000) -> str:
  """Trains a SentencePiece model on `documents` (lines of at most 4096 chars) to `path`.

  Ids follow seqio (pad 0, eos 1, unk 2, no bos); rare characters fall back to bytes;
  text is not normalised (identity rule, spaces kept) and "\n" is its own piece, so
  decode(encode(text)) == text. `vocab_size` is an upper bound on a small corpus.
  Writes atomically. SentencePiece writes local files only: for a URL `path` the model
  is trained into its local mirror (`storage.local_mirror`) and then copied to `path`.
  Returns the local model file.

  Raises:
    ValueError: SentencePiece training failed (e.g. `vocab_size` too small).
  """
  url = None if storage.is_local(path) else path
  path = storage.local_mirror(path)
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  def lines():
    budget = max_chars
    for doc in documents:
      for line in doc.splitlines():
        line = line[:4096]
        if not line.strip():
          continue
        yield line
        budget -= len(line)
        if budget <= 0:
          return

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  prefix = f"{path[:-len('.model')] if path.endswith('.model') else path}.tmp{os.getpid()}"
  print(f"[armd_jax.data] training a {model_type} SentencePiece model, "
        f"vocab_size={vocab_size} -> {path}", flush=True)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=prefix, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=1.0, byte_fallback=True, max_sentence_length=16384,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        user_defined_symbols=["\n"], num_threads=2, minloglevel=2, hard_vocab_limit=False)
  except RuntimeError as e:
    raise ValueError(f"SentencePiece training failed with config.data.sentencepiece_vocab_size="
                     f"{vocab_size} (it needs 260 ids for bytes and specials plus one per "
                     f"distinct character): {e}") from e
  os.replace(prefix + ".model", path)
  os.remove(prefix + ".vocab")
  if url is not None:
    storage.upload(path, url)
  return path


def _workdir_hf_copy(config: DataConfig, workdir: storage.PathLike) -> epath.Path:
  """The workdir copy of a tokenizer file; named after `hf_tokenizer` so changing it is seen."""
  tag = hashlib.sha256(config.hf_tokenizer.encode()).hexdigest()[:12]
  return vocab_dir(workdir) / f"hf_tokenizer_{tag}.json"


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def describe(vocab: Vocabulary) -> str:
  """A one-line json description of a vocabulary (for logs and cache metadata)."""
  return json.dumps({"type": type(vocab).__name__, "vocab_size": vocab.vocab_size,
                     "pad_id": vocab.pad_id, "eos_id": vocab.eos_id,
                     "fingerprint": getattr(vocab, "fingerprint", "")})
