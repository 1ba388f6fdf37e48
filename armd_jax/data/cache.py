"""Tokenise a corpus split once into flat numpy arrays cached on disk.

Layout of one split: `tokens` (uint16 or int32, [T]) holds every document followed by
EOS, back to back; `doc_ends` (int64, [num_docs]) the end offset of each document. The
cache directory name is a digest of everything the tokens depend on (task, files and
their sizes/mtimes, document split, held-out rule, vocabulary file), so a changed
corpus or vocabulary is re-tokenised and never silently reused.

The cache folder may be a URL (`armd_jax.storage`; by default it is in the workdir):
process 0 builds the entry in a local mirror folder (`storage.local_mirror`), uploads the
arrays and then meta.json, which tells the other processes it is complete; every process
memory-maps a local copy of the arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from armd_jax import storage
from armd_jax.data import sources
from armd_jax.data.config import DataConfig

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TokenizedSplit:
  """One split as flat arrays (memory-mapped from the cache)."""

  tokens: np.ndarray  # [T] every document followed by EOS
  doc_ends: np.ndarray  # [num_docs] int64 end offset (exclusive) of each document

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_documents(self) -> int:
    return int(self.doc_ends.shape[0])


def cache_key(config: DataConfig, vocab, splits: Sequence[str] = sources.SPLITS,
              shard: Optional[Tuple[int, int]] = None) -> str:
  """Digest of everything the tokenised corpus depends on (and of which splits / shard
  of it a cache entry holds)."""
  fields = {
      "format": FORMAT_VERSION,
      "task": config.task,
      "document_split": config.document_split,
      "eval_fraction": config.eval_fraction,
      "max_train_documents": config.max_train_documents,
      "max_eval_documents": config.max_eval_documents,
      "vocab": vocab.fingerprint,
  }
  if config.task == "text_files":
    fields["train_files"] = _file_stamps(sources.resolve_files(config.train_files))
    if config.eval_files:
      fields["eval_files"] = _file_stamps(sources.resolve_files(config.eval_files, "eval_files"))
  elif config.task == "synthetic":
    fields["synthetic"] = [config.synthetic_num_documents, config.synthetic_seed]
  elif config.task == "openwebtext":
    fields["hf_dataset"] = config.hf_dataset
  elif config.is_seqio:  # keyed by name: re-registered data under one name needs a new key
    fields["seqio"] = [config.seqio_name, config.seqio_train_split, config.seqio_eval_split,
                       config.seqio_feature]
  else:
    fields["tfds_data_dir"] = config.tfds_data_dir
  if tuple(splits) != tuple(sources.SPLITS):
    fields["splits"] = list(splits)
  if shard is not None:
    fields["shard"] = list(shard)
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
  suffix = "" if shard is None else f"-shard{shard[0]}of{shard[1]}"
  return f"{config.task.replace(':', '_')}-{digest}{suffix}"


def _file_stamps(files):
  return [[os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files]


def tokenize_documents(docs: Iterable[str], vocab, *, log_every_s: float = 30.0,
                       name: str = "") -> TokenizedSplit:
  """Encodes every document and appends EOS; prints progress on long corpora."""
  dtype = np.uint16 if vocab.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  chunks, ends, total, count = [], [], 0, 0
  start = last_log = time.time()
  batch_encode = getattr(vocab, "encode_batch", None)
  pending = []

  def flush():
    nonlocal total, count
    encoded = batch_encode(pending) if batch_encode else [vocab.encode(d) for d in pending]
    for ids in encoded:
      arr = np.empty(len(ids) + 1, dtype)
      arr[:-1] = ids
      arr[-1] = vocab.eos_id
      chunks.append(arr)
      total += arr.shape[0]
      ends.append(total)
    count += len(pending)
    pending.clear()

  for doc in docs:
    pending.append(doc)
    if len(pending) >= 1024:
      flush()
      if time.time() - last_log > log_every_s:
        last_log = time.time()
        rate = total / max(last_log - start, 1e-9)
        print(f"[armd_jax.data] tokenising {name}: {count} documents, {total} tokens "
              f"({rate:,.0f} tokens/s)", flush=True)
  if pending:
    flush()
  tokens = np.concatenate(chunks) if chunks else np.zeros([0], dtype)
  return TokenizedSplit(tokens=tokens, doc_ends=np.asarray(ends, np.int64))


def join_token_documents(docs: Iterable[np.ndarray], vocab) -> TokenizedSplit:
  """Already tokenised documents (a seqio task's ids) -> one split; each document ends
  with EOS (appended where the task did not)."""
  dtype = np.uint16 if vocab.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
  chunks, ends, total = [], [], 0
  for ids in docs:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab.vocab_size):
      raise ValueError(f"token ids out of range [0, {vocab.vocab_size}) in a seqio example.")
    if not ids.size or ids[-1] != vocab.eos_id:
      ids = np.append(ids, vocab.eos_id)
    chunks.append(ids.astype(dtype))
    total += ids.shape[0]
    ends.append(total)
  tokens = np.concatenate(chunks) if chunks else np.zeros([0], dtype)
  return TokenizedSplit(tokens=tokens, doc_ends=np.asarray(ends, np.int64))


def load_or_build(config: DataConfig, vocab, cache_dir: storage.PathLike, *,
                  is_writer: bool = True, wait_s: float = 7 * 24 * 3600.0,
                  splits: Sequence[str] = sources.SPLITS,
                  shard: Optional[Tuple[int, int]] = None) -> dict[str, TokenizedSplit]:
  """Returns {split: TokenizedSplit} for `splits`, tokenising into `cache_dir` on first use.

  A writer builds the cache in a private temporary directory and renames it into place
  (concurrent writers are safe: the first rename wins); a non-writer waits for it.
  For a URL `cache_dir` the writer builds in the local mirror and uploads it, meta.json
  last; every process reads local copies of the arrays.
  shard: (index, count) holds only that shard of a seqio task's splits
  (`sources.seqio_token_documents`), in its own cache entry.

  Raises:
    TimeoutError: a non-writer waited `wait_s` seconds for meta.json.
  """
  if shard is not None and not config.is_seqio:
    raise ValueError(f"Only seqio tasks are read by shard, not {config.task!r}.")
  entry = storage.path(cache_dir) / cache_key(config, vocab, splits, shard)
  done = entry / "meta.json"
  local = storage.is_local(cache_dir)
  directory = os.fspath(entry) if local else storage.local_mirror(entry)
  if not done.exists():
    if is_writer:
      if not os.path.exists(os.path.join(directory, "meta.json")):
        _build(config, vocab, directory, splits, shard)
      if not local:
        _upload(directory, entry, splits)
    else:
      print(f"[armd_jax.data] waiting for process 0 to build the data cache {entry}",
            flush=True)
      storage.wait_for(done, wait_s, "the data cache")
  if not local:
    for split in splits:
      for name in (f"{split}_tokens.npy", f"{split}_doc_ends.npy"):
        storage.local_copy(entry / name)  # into `directory`, the local mirror of `entry`
  return {split: TokenizedSplit(
      tokens=np.load(os.path.join(directory, f"{split}_tokens.npy"), mmap_mode="r"),
      doc_ends=np.load(os.path.join(directory, f"{split}_doc_ends.npy")))
          for split in splits}


def _upload(directory: str, entry, splits: Sequence[str]) -> None:
  """Copies a built cache entry to its URL: the arrays, then meta.json (complete marker)."""
  for split in splits:
    for name in (f"{split}_tokens.npy", f"{split}_doc_ends.npy"):
      storage.upload(os.path.join(directory, name), entry / name)
  storage.upload(os.path.join(directory, "meta.json"), entry / "meta.json")


def _build(config: DataConfig, vocab, directory: str, splits: Sequence[str],
           shard: Optional[Tuple[int, int]]) -> None:
  tmp = f"{directory}.tmp-{uuid.uuid4().hex}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  meta = {"task": config.task, "vocab_size": vocab.vocab_size, "pad_id": vocab.pad_id,
          "eos_id": vocab.eos_id, "vocab": vocab.fingerprint}
  if shard is not None:
    meta["shard"] = list(shard)
  for split in splits:
    start = time.time()
    if config.is_seqio:
      data = join_token_documents(sources.seqio_token_documents(config, split, shard), vocab)
    else:
      data = tokenize_documents(sources.documents(config, split), vocab,
                                name=f"{config.task}/{split}")
    if data.num_tokens == 0:
      part = "" if shard is None else f" shard {shard[0]} of {shard[1]} of"
      raise ValueError(f"config.data.task={config.task!r}:{part} the {split!r} split is empty.")
    np.save(os.path.join(tmp, f"{split}_tokens.npy"), data.tokens)
    np.save(os.path.join(tmp, f"{split}_doc_ends.npy"), data.doc_ends)
    meta[split] = {"documents": data.num_documents, "tokens": data.num_tokens}
    name = split if shard is None else f"{split} (shard {shard[0]} of {shard[1]})"
    print(f"[armd_jax.data] {config.task}/{name}: {data.num_documents} documents, "
          f"{data.num_tokens} tokens ({time.time() - start:.1f}s)", flush=True)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  try:
    os.replace(tmp, directory)
  except OSError:  # another writer finished first
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(directory, "meta.json")):
      raise
