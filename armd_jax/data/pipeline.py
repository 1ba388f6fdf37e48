"""Fixed-length examples from a tokenised split and the grain training pipeline."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator, Optional

import grain
import numpy as np

from armd_jax import storage
from armd_jax.data import cache, sources
from armd_jax.data.config import DataConfig
from armd_jax.data.vocab import Vocabulary, build_vocab

Batch = dict  # {'tokens': int32 [B, L], 'mask': int32 [B, L]}


@dataclasses.dataclass(frozen=True)
class Examples:
  """Fixed-length examples as (start, length) windows into a flat token array.

  Example i is `tokens[starts[i] : starts[i] + lengths[i]]`, padded with `pad_id` to
  `seq_len` (mask 0 on the padding).
  """

  tokens: np.ndarray  # [T] flat tokens (documents + EOS)
  starts: np.ndarray  # [E] int64
  lengths: np.ndarray  # [E] int64, in [1, seq_len]
  seq_len: int
  pad_id: int

  def __len__(self) -> int:
    return int(self.starts.shape[0])

  def gather(self, indices) -> Batch:
    """Example ids [B] -> {'tokens', 'mask'}: int32 [B, seq_len] each."""
    indices = np.asarray(indices, np.int64)
    offsets = np.arange(self.seq_len, dtype=np.int64)  # [L]
    valid = offsets[None, :] < self.lengths[indices][:, None]  # [B, L]
    pos = np.minimum(self.starts[indices][:, None] + offsets[None, :],
                     self.tokens.shape[0] - 1)  # [B, L]
    tokens = np.where(valid, self.tokens[pos], self.pad_id).astype(np.int32)
    return {"tokens": tokens, "mask": valid.astype(np.int32)}


def make_examples(split: cache.TokenizedSplit, seq_len: int, packing: str, pad_id: int, *,
                  keep_remainder: bool) -> Examples:
  """Packs a tokenised split into fixed-length examples.

  'concat': consecutive windows of `seq_len` over the EOS-joined stream (no padding); the
  partial last window is kept (padded) only when `keep_remainder` (the eval split).
  'pad': each document + EOS alone, split into pieces of at most `seq_len`, padded.
  """
  total = split.num_tokens
  if packing == "concat":
    count = -(-total // seq_len) if keep_remainder else total // seq_len
    starts = np.arange(count, dtype=np.int64) * seq_len
    lengths = np.minimum(seq_len, total - starts)
  elif packing == "pad":
    begins = np.concatenate([[0], split.doc_ends[:-1]]).astype(np.int64)
    sizes = split.doc_ends - begins
    pieces = -(-sizes // seq_len)  # [D] pieces per document
    doc = np.repeat(np.arange(len(sizes)), pieces)
    first = np.concatenate([[0], np.cumsum(pieces)[:-1]]).astype(np.int64)
    piece = np.arange(doc.shape[0], dtype=np.int64) - first[doc]
    starts = begins[doc] + piece * seq_len
    lengths = np.minimum(seq_len, split.doc_ends[doc] - starts)
  else:
    raise ValueError(f"config.data.packing={packing!r} must be 'concat' or 'pad'.")
  return Examples(tokens=split.tokens, starts=starts, lengths=lengths.astype(np.int64),
                  seq_len=seq_len, pad_id=pad_id)


def train_dataset(examples: Examples, *, local_batch_size: int, seed: int,
                  process_index: int, process_count: int) -> grain.MapDataset:
  """Infinite grain dataset of this process's training batches.

  One global stream, the same for any number of processes: example ids shuffled with
  `seed` (reshuffled every epoch), repeated forever and cut into global batches of
  `local_batch_size * process_count` ids. Process p takes rows [p * local, (p + 1) *
  local) of each global batch and gathers only those examples: the process shards of a
  step are disjoint, and the global batch that `jax.make_array_from_process_local_data`
  assembles from them is the one a single process would read, so a run's batches do
  not depend on how many processes feed it.
  """
  if len(examples) == 0:
    raise ValueError("The training split has no example: use a larger corpus or a "
                     "smaller seq_len.")
  start = process_index * local_batch_size
  rows = functools.partial(_gather_rows, examples, slice(start, start + local_batch_size))
  return (grain.MapDataset.range(len(examples)).shuffle(seed=seed).repeat()
          .batch(local_batch_size * process_count, drop_remainder=True)
          .map(rows))


def _gather_rows(examples: Examples, rows: slice, global_ids: np.ndarray) -> Batch:
  """This process's rows of a global batch of example ids, gathered."""
  return examples.gather(np.asarray(global_ids)[rows])


@dataclasses.dataclass
class Datasets:
  """What `create_datasets` returns; see its docstring."""

  train_iter: grain.DatasetIterator  # infinite; per-process batches
  train_dataset: grain.MapDataset  # the dataset behind train_iter (iter() it for a fresh one)
  vocab: Vocabulary
  seq_len: int
  global_batch_size: int
  local_batch_size: int
  process_index: int
  process_count: int
  train_examples: Examples
  eval_examples: Examples

  @property
  def num_train_examples(self) -> int:
    return len(self.train_examples)

  @property
  def num_eval_examples(self) -> int:
    return len(self.eval_examples)

  def num_eval_batches(self) -> int:
    """Batches per eval pass; equal on every process (the last ones padded)."""
    per_process = -(-self.num_eval_examples // self.process_count)
    return -(-per_process // self.local_batch_size)

  def eval_batches(self, max_batches: Optional[int] = None) -> Iterator[Batch]:
    """A fresh, finite, deterministic pass over this process's share of the held-out split.

    Every held-out example is seen exactly once across processes (strided shards, text
    order). Rows past the end are padding (mask all 0), so every batch is
    [local_batch, seq_len] and every process yields `num_eval_batches()` batches.
    """
    ids = np.arange(self.process_index, self.num_eval_examples, self.process_count)
    count = self.num_eval_batches()
    if max_batches is not None:
      count = min(count, max_batches)
    batch = self.local_batch_size
    for b in range(count):
      chunk = ids[b * batch:(b + 1) * batch]
      out = self.eval_examples.gather(np.pad(chunk, (0, batch - len(chunk))))
      if len(chunk) < batch:
        out["mask"][len(chunk):] = 0
        out["tokens"][len(chunk):] = self.eval_examples.pad_id
      yield out


def create_datasets(data_config, *, seq_len: int, global_batch_size: int, workdir: str,
                    seed: int, process_index: Optional[int] = None,
                    process_count: Optional[int] = None) -> Datasets:
  """Builds the vocabulary, the tokenised corpus cache and the grain pipelines.

  The first call tokenises the corpus once (and trains the SentencePiece model if asked)
  into `<workdir>/vocab/` and the data cache (`config.data.cache_dir`, default
  `<workdir>/data_cache/`); later calls memory-map the cache. Per step the pipeline only
  gathers `local_batch` windows from that array.

  Args:
    data_config: `config.data` (a ConfigDict from `default_config()`, dict or DataConfig).
    seq_len: tokens per example.
    global_batch_size: examples per step over all processes; must divide by process_count.
    workdir: run directory: a local folder or a URL such as gs://BUCKET/RUN (`storage`).
    seed: shuffle seed (used unless `config.data.seed` is set).
    process_index, process_count: this process and the number of processes (default
      `jax.process_index()`, `jax.process_count()`); pass them to simulate hosts.

  Returns:
    `Datasets` with `.train_iter` (infinite grain iterator of per-process batches
    (from this process's own shard when `config.data.seqio_shard_by_process`)
    {'tokens', 'mask'}, int32 [local_batch, seq_len], local_batch = global_batch_size //
    process_count), `.eval_batches()` (fresh finite held-out pass) and `.vocab`.

  Checkpointing the iterator: save and restore it with orbax next to the train state:

      import grain, orbax.checkpoint as ocp
      manager = ocp.CheckpointManager(directory, item_names=("train_state", "train_iter"))
      manager.save(step, args=ocp.args.Composite(
          train_state=ocp.args.StandardSave(state),
          train_iter=grain.checkpoint.CheckpointSave(datasets.train_iter)))
      restored = manager.restore(step, args=ocp.args.Composite(
          train_state=ocp.args.StandardRestore(abstract_state),
          train_iter=grain.checkpoint.CheckpointRestore(datasets.train_iter)))

  `CheckpointRestore` sets the iterator's position in place (each process writes its own
  state file), after which it yields exactly the batches the saved run would have
  yielded next. Without orbax: `state = train_iter.get_state()` (a small json-able dict)
  and `train_iter.set_state(state)`.
  """
  config = DataConfig.from_config(data_config)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if seq_len <= 0:
    raise ValueError(f"seq_len={seq_len} must be positive.")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count="
                     f"{process_count}).")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  is_writer = process_index == 0
  vocab = build_vocab(config, workdir, lambda: sources.documents(config, "train"),
                      is_writer=is_writer)
  cache_dir = config.cache_dir or os.fspath(storage.path(workdir) / "data_cache")
  shared = is_writer or config.cache_per_process
  if config.seqio_shard_by_process:  # own train shard (every process writes its own)
    splits = cache.load_or_build(config, vocab, cache_dir, is_writer=shared, splits=("eval",))
    splits.update(cache.load_or_build(config, vocab, cache_dir, splits=("train",),
                                      shard=(process_index, process_count)))
  else:
    splits = cache.load_or_build(config, vocab, cache_dir, is_writer=shared)
  train_examples = make_examples(splits["train"], seq_len, config.packing, vocab.pad_id,
                                 keep_remainder=False)
  eval_examples = make_examples(splits["eval"], seq_len, config.packing, vocab.pad_id,
                                keep_remainder=True)
  if len(train_examples) == 0:
    raise ValueError(f"The training split has {splits['train'].num_tokens} tokens: fewer than "
                     f"one example of seq_len={seq_len}.")
  local_batch = global_batch_size // process_count
  shuffle_seed = (config.seed if config.seed is not None else seed) % 2**32
  if config.seqio_shard_by_process:  # a local stream over this process's shard
    dataset = train_dataset(train_examples, local_batch_size=local_batch, seed=shuffle_seed,
                            process_index=0, process_count=1)
  else:  # this process's rows of one global stream
    dataset = train_dataset(train_examples, local_batch_size=local_batch, seed=shuffle_seed,
                            process_index=process_index, process_count=process_count)
  return Datasets(
      train_iter=make_iterator(dataset, config),
      train_dataset=dataset, vocab=vocab, seq_len=seq_len,
      global_batch_size=global_batch_size, local_batch_size=local_batch,
      process_index=process_index, process_count=process_count,
      train_examples=train_examples, eval_examples=eval_examples)


def make_iterator(dataset: grain.MapDataset, config: DataConfig) -> grain.DatasetIterator:
  """A fresh checkpointable iterator over `dataset` (threaded prefetch if configured)."""
  if config.num_threads == 0:
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                          prefetch_buffer_size=0)))
  options = grain.ReadOptions(num_threads=config.num_threads,
                              prefetch_buffer_size=config.prefetch_buffer_size)
  return iter(dataset.to_iter_dataset(options))
