"""Raw documents of every task, per split ('train' or 'eval'), as python strings.

`text_files` and `synthetic` are pure python. The TFDS tasks read through a
`seqio.TfdsDataSource` and `openwebtext` through Hugging Face `datasets`; both are
imported lazily, only when those tasks are used. 'seqio:NAME' tasks are registered seqio
Tasks / Mixtures that tokenise themselves: `seqio_token_documents` yields their ids.
"""

from __future__ import annotations

import glob
import itertools
import os
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from armd_jax.data.config import DataConfig

SPLITS = ("train", "eval")

# TFDS name and the TFDS split used as our 'train' / 'eval'.
TFDS_TASKS = {
    "lm1b": ("lm1b:1.1.0", {"train": "train", "eval": "test"}),
    "tiny_shakespeare": ("tiny_shakespeare:1.0.0", {"train": "train", "eval": "validation"}),
}


def documents(config: DataConfig, split: str) -> Iterator[str]:
  """Yields the documents of `split` ('train' or 'eval') of `config.task`, in a fixed order."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  limit = config.max_train_documents if split == "train" else config.max_eval_documents
  if config.task == "text_files":
    docs = iter(text_file_documents(config, split))
  elif config.task == "synthetic":
    docs = iter(_held_out(synthetic_documents(config.synthetic_num_documents,
                                              config.synthetic_seed),
                          config.eval_fraction, split))
  elif config.task in TFDS_TASKS:
    docs = tfds_documents(config, split)
  elif config.task == "openwebtext":
    docs = hf_documents(config, split)
  elif config.is_seqio:
    raise ValueError(f"config.data.task={config.task!r} is tokenised by seqio: read it with "
                     "seqio_token_documents, not as text.")
  else:  # unreachable: DataConfig validates the task
    raise ValueError(f"config.data.task={config.task!r} has no source.")
  return itertools.islice(docs, limit) if limit else docs


def resolve_files(spec: str, field: str = "train_files") -> list[str]:
  """Expands 'a.txt,dir/*.txt' into a sorted, de-duplicated list of existing files."""
  files = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    matches = sorted(glob.glob(os.path.expanduser(part)))
    matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise FileNotFoundError(f"config.data.{field}: {part!r} matches no file "
                              f"(cwd {os.getcwd()}).")
    files.extend(m for m in matches if m not in files)
  if not files:
    raise FileNotFoundError(f"config.data.{field}={spec!r} names no file.")
  return files


def split_documents(text: str, how: str) -> list[str]:
  """Splits one file's text into documents: 'file', 'paragraph' or 'line'; drops empty ones."""
  if how == "file":
    parts = [text]
  elif how == "paragraph":
    parts = text.replace("\r\n", "\n").split("\n\n")
  elif how == "line":
    parts = text.splitlines()
  else:
    raise ValueError(f"config.data.document_split={how!r} must be file/paragraph/line.")
  return [p.strip("\n") for p in parts if p.strip()]


def text_file_documents(config: DataConfig, split: str) -> list[str]:
  """Documents of local UTF-8 files; held out by `eval_files` or by `eval_fraction`."""
  if config.eval_files:
    spec, field = ((config.train_files, "train_files") if split == "train"
                   else (config.eval_files, "eval_files"))
    return _read_documents(resolve_files(spec, field), config.document_split)
  docs = _read_documents(resolve_files(config.train_files), config.document_split)
  return _held_out(docs, config.eval_fraction, split)


def _read_documents(files: Sequence[str], how: str) -> list[str]:
  docs = []
  for path in files:
    with open(path, encoding="utf-8") as f:
      docs.extend(split_documents(f.read(), how))
  return docs


def _held_out(docs: list[str], fraction: float, split: str) -> list[str]:
  """The last `fraction` of the documents is 'eval'; one document is cut at a newline."""
  if not docs:
    raise ValueError("The corpus has no non-empty document.")
  if len(docs) >= 2:
    num_eval = max(1, int(round(len(docs) * fraction)))
    if num_eval >= len(docs):
      raise ValueError(f"config.data.eval_fraction={fraction} leaves no training document "
                       f"out of {len(docs)}.")
    return docs[:-num_eval] if split == "train" else docs[-num_eval:]
  text = docs[0]
  cut = int(len(text) * (1.0 - fraction))
  newline = text.rfind("\n", 0, cut)
  cut = newline + 1 if newline > 0 else cut
  if not 0 < cut < len(text):
    raise ValueError("The single document is too short to hold out "
                     f"config.data.eval_fraction={fraction} of it.")
  return [text[:cut]] if split == "train" else [text[cut:]]


_WORDS = ("the cat dog bird sees eats runs with a small big red green house tree river "
          "near under over and then quickly slowly sleeps sings one two three").split()


def synthetic_documents(num_documents: int, seed: int) -> list[str]:
  """A deterministic in-memory corpus: sentences from a sparse first-order word Markov chain.

  Every word has 3 possible successors, so a small model can learn the text well beyond
  unigram statistics; nothing is read from disk.
  """
  rng = np.random.default_rng(seed)
  num_words = len(_WORDS)
  successors = np.stack([rng.choice(num_words, size=3, replace=False)
                         for _ in range(num_words)])  # [W, 3]
  docs = []
  for _ in range(num_documents):
    length = int(rng.integers(4, 16))
    word = int(rng.integers(num_words))
    words = [_WORDS[word]]
    for _ in range(length - 1):
      word = int(successors[word, rng.integers(3)])
      words.append(_WORDS[word])
    docs.append(" ".join(words).capitalize() + ".")
  return docs


def tfds_source(config: DataConfig):
  """The `seqio.TfdsDataSource` of a TFDS task (imports seqio / TensorFlow)."""
  import seqio  # pylint: disable=g-import-not-at-top
  name, splits = TFDS_TASKS[config.task]
  return seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=config.tfds_data_dir,
                              splits={ours: theirs for ours, theirs in splits.items()})


def tfds_documents(config: DataConfig, split: str) -> Iterator[str]:
  """Yields the 'text' field of a TFDS task's split, in file order."""
  source = tfds_source(config)
  dataset = source.get_dataset(split=split, shuffle=False)
  for example in dataset.as_numpy_iterator():
    text = example["text"]
    yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def load_hf_dataset(name: str):
  """`datasets.load_dataset(name, split='train')` (OpenWebText has only a train split)."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("task='openwebtext' needs Hugging Face `datasets`: "
                      "pip install -e '.[hf]'.") from e
  return datasets.load_dataset(name, split="train")


def hf_documents(config: DataConfig, split: str) -> Iterator[str]:
  """Yields OpenWebText documents; the last `eval_fraction` of them is the 'eval' split."""
  dataset = load_hf_dataset(config.hf_dataset)
  total = len(dataset)
  num_eval = max(1, int(round(total * config.eval_fraction)))
  start, stop = (0, total - num_eval) if split == "train" else (total - num_eval, total)
  for i in range(start, stop):
    yield dataset[i]["text"]


# seqio:NAME tasks: any registered seqio Task or Mixture, already tokenised by it.


def import_seqio_modules(spec: str) -> list[str]:
  """Imports the comma-separated modules (names or .py paths) that register seqio tasks.

  A .py path is imported once per process under a name derived from its path, so
  importing it again (e.g. eval after training) does not register its Tasks twice.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  imported = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    if part.endswith(".py"):
      path = os.path.abspath(os.path.expanduser(part))
      if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.seqio_module: no file {path!r}.")
      name = "_armd_seqio_" + "".join(c if c.isalnum() else "_" for c in path)
      if name not in sys.modules:
        spec_ = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[name] = module
        try:
          spec_.loader.exec_module(module)
        except BaseException:
          del sys.modules[name]
          raise
    else:
      importlib.import_module(part)
    imported.append(part)
  return imported


def seqio_provider(config: DataConfig):
  """The registered seqio Task or Mixture of a 'seqio:NAME' task (imports seqio)."""
  import seqio  # pylint: disable=g-import-not-at-top

  modules = import_seqio_modules(config.seqio_module)
  try:
    provider = seqio.get_mixture_or_task(config.seqio_name)
  except ValueError as e:
    raise ValueError(f"config.data.task={config.task!r}: no seqio Task or Mixture "
                     f"{config.seqio_name!r} is registered after importing "
                     f"config.data.seqio_module={modules or '(none)'}; name the module that "
                     "registers it.") from e
  if config.seqio_feature not in provider.output_features:
    raise ValueError(f"config.data.seqio_feature={config.seqio_feature!r} is not an output "
                     f"feature of seqio {config.seqio_name!r} "
                     f"({sorted(provider.output_features)}).")
  return provider


def seqio_token_documents(config: DataConfig, split: str,
                          shard: Optional[Tuple[int, int]] = None) -> Iterator[np.ndarray]:
  """Yields the token ids (int32 [n]) of `config.seqio_feature` of each example of
  `split` ('train' / 'eval' -> `seqio_train_split` / `seqio_eval_split`), in order.

  One pass, unshuffled, not packed or trimmed by seqio (sequence_length=None): our
  pipeline packs them (the EOS the Task appends ends each document). shard: (index,
  count) reads only that shard of the split (`seqio.ShardInfo`: the source's files
  where it has enough, else every count-th example).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  provider = seqio_provider(config)
  name = config.seqio_train_split if split == "train" else config.seqio_eval_split
  shard_info = None
  if shard is not None:
    import seqio  # pylint: disable=g-import-not-at-top
    shard_info = seqio.ShardInfo(index=shard[0], num_shards=shard[1])
  dataset = provider.get_dataset(sequence_length=None, split=name, shuffle=False,
                                 num_epochs=1, use_cached=False, shard_info=shard_info)
  limit = config.max_train_documents if split == "train" else config.max_eval_documents
  examples = dataset.as_numpy_iterator()
  for example in itertools.islice(examples, limit) if limit else examples:
    yield np.asarray(example[config.seqio_feature], np.int32).reshape(-1)
