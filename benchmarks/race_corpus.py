"""The training race's corpus: Python standard library sources as byte tokens, and the
order in which both racers read them.

The tokens are the byte vocabulary's ids (`armd_jax.data.vocab.ByteVocabulary`: byte b is
id b + 3, EOS = 1): every source file is one document followed by EOS, the training files
first, then the held-out ones (every tenth file in sorted path order, so the held-out
part spans the whole library). UTF-8 never uses the bytes 0xF5-0xFF, so every id fits in
uint8. The file is built once (here) and committed, so that every machine races on the
same bytes whatever its Python version:

  python benchmarks/race_corpus.py                 # -> benchmarks/race_corpus.npz
  python benchmarks/race_corpus.py --stdlib=DIR --out=PATH

Loading and batching need numpy only (the GPU machine has no data stack).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import sys
import sysconfig
from typing import Dict, List, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PATH = os.path.join(HERE, "race_corpus.npz")
SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__")
HELD_OUT_EVERY = 10  # file i is held out when i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Byte-token ids of the training files, then of the held-out files."""

  tokens: np.ndarray  # uint8 [T]: training documents, then held-out ones, each + EOS
  split: int  # tokens[:split] train, tokens[split:] held out
  meta: Dict[str, object]  # vocab_size, eos_id, python, file counts, sha256 of tokens

  @property
  def train(self) -> np.ndarray:
    return self.tokens[:self.split]

  @property
  def held_out(self) -> np.ndarray:
    return self.tokens[self.split:]


def source_files(root: str) -> List[str]:
  """Sorted paths (relative to root) of the *.py files under root, test folders left out."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    found.extend(os.path.relpath(os.path.join(folder, f), root)
                 for f in files if f.endswith(".py"))
  return sorted(found)


def build(root: str) -> Corpus:
  """Reads every source file under root as UTF-8 and tokenises it with the byte vocabulary.

  Files that are not valid UTF-8 are left out (counted in meta['skipped']).
  """
  from armd_jax.data.vocab import ByteVocabulary  # pylint: disable=import-outside-toplevel
  vocab = ByteVocabulary()
  train, held_out, skipped = [], [], 0
  for i, path in enumerate(source_files(root)):
    try:
      with open(os.path.join(root, path), encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError:
      skipped += 1
      continue
    if not text.strip():
      continue
    ids = np.append(vocab.encode_batch([text])[0], vocab.eos_id)
    (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(ids)
  tokens = np.concatenate(train + held_out)
  if tokens.max() > np.iinfo(np.uint8).max:
    raise ValueError(f"a token id {tokens.max()} does not fit in uint8.")
  tokens = tokens.astype(np.uint8)
  split = int(sum(len(t) for t in train))
  meta = {"vocab_size": vocab.vocab_size, "eos_id": vocab.eos_id, "pad_id": vocab.pad_id,
          "python": sys.version.split()[0], "root": "stdlib (sysconfig stdlib path)",
          "train_files": len(train), "held_out_files": len(held_out), "skipped": skipped,
          "held_out_rule": f"file i % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1} (sorted paths)",
          "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
  return Corpus(tokens=tokens, split=split, meta=meta)


def save(corpus: Corpus, path: str) -> None:
  """Writes tokens, split and meta (as JSON text) to a compressed .npz."""
  np.savez_compressed(path, tokens=corpus.tokens, split=np.int64(corpus.split),
                      meta=np.array(json.dumps(corpus.meta, sort_keys=True)))


def load(path: str = DEFAULT_PATH) -> Corpus:
  """Reads a corpus `save` wrote; checks the tokens against the digest in meta."""
  with np.load(path, allow_pickle=False) as data:
    tokens, split = data["tokens"], int(data["split"])
    meta = json.loads(str(data["meta"]))
  if hashlib.sha256(tokens.tobytes()).hexdigest() != meta["sha256"]:
    raise ValueError(f"{path}: the tokens do not match their recorded sha256.")
  return Corpus(tokens=tokens, split=split, meta=meta)


def windows(tokens: np.ndarray, length: int) -> np.ndarray:
  """Non-overlapping windows [W, length] of tokens (a view; the tail is dropped)."""
  count = tokens.shape[0] // length
  if count == 0:
    raise ValueError(f"{tokens.shape[0]} tokens hold no window of {length}.")
  return tokens[:count * length].reshape(count, length)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_windows)


def batch_rows(step: int, num_windows: int, batch: int, seed: int = 0) -> np.ndarray:
  """Window indices [batch] of training step `step`: each epoch reads every window once in
  its own seeded random order, and the batches run on across epoch boundaries. A pure
  function of its arguments, so two runs with the same arguments read the same data."""
  positions = step * batch + np.arange(batch)
  epochs, offsets = np.divmod(positions, num_windows)
  return np.array([_epoch_permutation(num_windows, seed, int(e))[o]
                   for e, o in zip(epochs, offsets)], np.int64)


def eval_rows(num_windows: int, count: int) -> np.ndarray:
  """`count` window indices spread evenly over the held-out windows (all if fewer)."""
  return np.unique(np.linspace(0, num_windows - 1, min(count, num_windows)).astype(np.int64))


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
  parser.add_argument("--out", default=DEFAULT_PATH)
  args = parser.parse_args(argv)
  sys.path.insert(0, os.path.dirname(HERE))
  corpus = build(args.stdlib)
  save(corpus, args.out)
  print(f"{args.out}: {corpus.tokens.shape[0]:,} tokens, split {corpus.split:,}, "
        f"{os.path.getsize(args.out):,} bytes; {corpus.meta}")


if __name__ == "__main__":
  main(sys.argv[1:])
