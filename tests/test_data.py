"""Data pipeline: packing, determinism, resumable iterators, disjoint process shards.

These tests never import TensorFlow/seqio (see test_data_seqio.py for those paths).
"""

import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from armd_jax import data
from armd_jax.data import cache, pipeline, sources


def synthetic_config(**overrides):
  config = data.default_config()
  config.task = "synthetic"
  config.synthetic_num_documents = 600
  config.num_threads = 0
  config.update(overrides)
  return config


def text_config(train_files, **overrides):
  config = data.default_config()
  config.task = "text_files"
  config.train_files = train_files
  config.num_threads = 0
  config.update(overrides)
  return config


def make(config, tmp_path, *, seq_len=32, batch=4, seed=0, **kwargs):
  return data.create_datasets(config, seq_len=seq_len, global_batch_size=batch,
                              workdir=str(tmp_path), seed=seed, **kwargs)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
    np.testing.assert_array_equal(x["mask"], y["mask"])


def id_examples(num_examples, seq_len=4):
  """Examples whose first token is their own id (tokens = arange)."""
  tokens = np.arange(num_examples * seq_len, dtype=np.int64)
  starts = np.arange(num_examples, dtype=np.int64) * seq_len
  return pipeline.Examples(tokens=tokens, starts=starts,
                           lengths=np.full(num_examples, seq_len, np.int64),
                           seq_len=seq_len, pad_id=0)


def batch_ids(batch, seq_len=4):
  return list(batch["tokens"][:, 0] // seq_len)


def test_import_armd_jax_does_not_import_tensorflow_or_seqio():
  code = ("import sys, armd_jax, armd_jax.data; "
          "bad = [m for m in ('tensorflow', 'seqio', 'tensorflow_datasets', 'datasets', "
          "'transformers') if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_batches_have_agreed_keys_shapes_dtypes_and_token_range(tmp_path):
  ds = make(synthetic_config(), tmp_path, seq_len=32, batch=4)
  batch = next(ds.train_iter)
  assert sorted(batch) == ["mask", "tokens"]
  for value in batch.values():
    assert value.shape == (4, 32) and value.dtype == np.int32
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() < ds.vocab.vocab_size
  assert ds.vocab.vocab_size == 259 and ds.local_batch_size == 4


def test_concat_packing_has_no_padding_and_joins_documents_with_eos(tmp_path):
  ds = make(synthetic_config(), tmp_path, seq_len=64)
  batch = next(ds.train_iter)
  assert batch["mask"].min() == 1
  assert (batch["tokens"] == ds.vocab.eos_id).any()  # documents are ~40 bytes long
  assert not (batch["tokens"] == ds.vocab.pad_id).any()


def test_concat_train_windows_tile_the_token_stream_exactly_once():
  split = cache.TokenizedSplit(tokens=np.arange(103, dtype=np.int32) + 3,
                               doc_ends=np.array([50, 103]))
  examples = pipeline.make_examples(split, 10, "concat", pad_id=0, keep_remainder=False)
  tokens = examples.gather(np.arange(len(examples)))["tokens"]
  np.testing.assert_array_equal(tokens.reshape(-1), np.arange(100) + 3)
  held_out = pipeline.make_examples(split, 10, "concat", pad_id=0, keep_remainder=True)
  last = held_out.gather([len(held_out) - 1])
  np.testing.assert_array_equal(last["mask"][0], [1, 1, 1] + [0] * 7)
  np.testing.assert_array_equal(last["tokens"][0], [103, 104, 105] + [0] * 7)


def test_pad_packing_puts_one_document_per_example_ending_in_eos(tmp_path):
  ds = make(synthetic_config(packing="pad"), tmp_path, seq_len=64)
  eos, pad = ds.vocab.eos_id, ds.vocab.pad_id
  for batch in take(ds.train_iter, 5):
    for tokens, mask in zip(batch["tokens"], batch["mask"]):
      n = int(mask.sum())
      np.testing.assert_array_equal(mask, np.arange(64) < n)  # real tokens, then padding
      assert (tokens[n:] == pad).all()
      assert (tokens[:n - 1] != eos).all()  # at most one document per example
      if n < 64:
        assert tokens[n - 1] == eos


def test_pad_packing_splits_long_documents_into_pieces():
  split = cache.TokenizedSplit(tokens=np.arange(1, 26, dtype=np.int32),
                               doc_ends=np.array([3, 25]))  # lengths 3 and 22
  examples = pipeline.make_examples(split, 8, "pad", pad_id=0, keep_remainder=False)
  np.testing.assert_array_equal(examples.lengths, [3, 8, 8, 6])
  np.testing.assert_array_equal(examples.starts, [0, 3, 11, 19])


def test_same_seed_gives_same_batches_and_other_seed_other_batches(tmp_path):
  a = take(make(synthetic_config(), tmp_path, seed=1).train_iter, 3)
  b = take(make(synthetic_config(), tmp_path, seed=1).train_iter, 3)
  c = take(make(synthetic_config(), tmp_path, seed=2).train_iter, 3)
  assert_same_batches(a, b)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_iterator_yields_the_same_batches_after_set_state(tmp_path):
  ds = make(synthetic_config(), tmp_path)
  take(ds.train_iter, 3)
  state = ds.train_iter.get_state()
  expected = take(ds.train_iter, 4)
  fresh = make(synthetic_config(), tmp_path)
  fresh.train_iter.set_state(state)
  assert_same_batches(take(fresh.train_iter, 4), expected)


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_restored_by_orbax_with_the_train_state_yields_the_same_batches(
    tmp_path, num_threads):
  import orbax.checkpoint as ocp
  config = synthetic_config(num_threads=num_threads)
  ds = make(config, tmp_path / "run")
  take(ds.train_iter, 5)
  state = {"step": np.asarray(5, np.int32), "w": np.arange(3.0)}
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                                  item_names=("train_state", "train_iter"))
  manager.save(5, args=ocp.args.Composite(
      train_state=ocp.args.StandardSave(state),
      train_iter=grain.checkpoint.CheckpointSave(ds.train_iter)))
  manager.wait_until_finished()
  expected = take(ds.train_iter, 4)

  resumed = make(config, tmp_path / "run")  # a restarted process: fresh iterator
  take(resumed.train_iter, 2)  # whatever it did before restore is overwritten
  restored = manager.restore(5, args=ocp.args.Composite(
      train_state=ocp.args.StandardRestore(state),
      train_iter=grain.checkpoint.CheckpointRestore(resumed.train_iter)))
  assert int(restored.train_state["step"]) == 5
  assert_same_batches(take(resumed.train_iter, 4), expected)
  manager.close()


def test_two_processes_shards_are_disjoint_and_assemble_the_one_process_batches(tmp_path):
  examples = id_examples(40)
  one = pipeline.train_dataset(examples, local_batch_size=8, seed=0, process_index=0,
                               process_count=1)
  two = [pipeline.train_dataset(examples, local_batch_size=4, seed=0, process_index=p,
                                process_count=2) for p in range(2)]
  seen = [set(), set()]
  for i in range(5):  # one epoch: 5 global batches of 8
    parts = [batch_ids(ds[i]) for ds in two]
    assert not set(parts[0]) & set(parts[1])  # disjoint within every step
    assert parts[0] + parts[1] == batch_ids(one[i])  # = the 1-process global batch
    for p in range(2):
      seen[p].update(parts[p])
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(40))


def test_create_datasets_gives_each_process_its_share_of_the_global_batch(tmp_path):
  config = synthetic_config()
  first = [make(config, tmp_path, batch=8, process_index=p, process_count=2)
           for p in range(2)]
  batches = [next(ds.train_iter) for ds in first]
  assert all(b["tokens"].shape == (4, 32) for b in batches)
  rows = [set(map(bytes, b["tokens"].astype(np.int32))) for b in batches]
  assert not rows[0] & rows[1]


def test_each_epoch_sees_every_example_once_in_a_new_order():
  ds = pipeline.train_dataset(id_examples(12), local_batch_size=3, seed=0,
                              process_index=0, process_count=1)
  epochs = [sum((batch_ids(ds[e * 4 + i]) for i in range(4)), []) for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
  assert epochs[0] != epochs[1]


def test_eval_batches_are_fresh_deterministic_and_cover_the_held_out_split_once(tmp_path):
  config = synthetic_config()
  rows = []
  for process_index in range(2):
    ds = make(config, tmp_path, batch=8, process_index=process_index, process_count=2)
    first, second = list(ds.eval_batches()), list(ds.eval_batches())
    assert_same_batches(first, second)
    assert len(first) == ds.num_eval_batches()
    for batch in first:
      assert batch["tokens"].shape == (4, 32)
      rows.extend(t[m == 1].tolist() for t, m in zip(batch["tokens"], batch["mask"])
                  if m.any())
  held_out = ds.eval_examples.gather(np.arange(ds.num_eval_examples))
  expected = [t[m == 1].tolist() for t, m in zip(held_out["tokens"], held_out["mask"])]
  assert sorted(rows) == sorted(expected)
  assert sum(map(len, rows)) == int(np.asarray(ds.eval_examples.lengths).sum())


def test_eval_batches_max_batches_limits_the_pass(tmp_path):
  ds = make(synthetic_config(), tmp_path)
  assert len(list(ds.eval_batches(max_batches=2))) == 2


def test_text_files_hold_out_the_last_documents(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n\n".join(f"paragraph {i} " * 3 for i in range(20)))
  config = data.DataConfig.from_config(
      text_config(str(corpus), document_split="paragraph", eval_fraction=0.1))
  train, held_out = (sources.documents(config, s) for s in ("train", "eval"))
  train, held_out = list(train), list(held_out)
  assert len(train) == 18 and len(held_out) == 2
  assert held_out[0].startswith("paragraph 18")


def test_one_text_file_is_cut_at_a_line_boundary_for_the_held_out_split(tmp_path):
  corpus = tmp_path / "one.txt"
  lines = [f"line {i}" for i in range(100)]
  corpus.write_text("\n".join(lines) + "\n")
  config = data.DataConfig.from_config(text_config(str(corpus), eval_fraction=0.1))
  (train,), (held_out,) = (list(sources.documents(config, s)) for s in ("train", "eval"))
  assert train + held_out == corpus.read_text().strip("\n")  # documents lose edge newlines
  assert held_out.startswith("line 9") and train.endswith("\n")


def test_text_files_accept_globs_and_explicit_eval_files(tmp_path):
  for name in ("a.txt", "b.txt", "dev.txt"):
    (tmp_path / name).write_text(f"text of {name}\n" * 40)
  config = text_config(str(tmp_path / "[ab].txt"), eval_files=str(tmp_path / "dev.txt"))
  ds = make(config, tmp_path / "run", seq_len=16)
  held_out = ds.vocab.decode(ds.eval_examples.tokens)
  assert "dev.txt" in held_out and "a.txt" not in held_out
  train = ds.vocab.decode(ds.train_examples.tokens)
  assert "a.txt" in train and "b.txt" in train and "dev.txt" not in train


def test_tiny_shakespeare_file_loads_as_text_files_when_present(tmp_path):
  path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                      "tinyshakespeare", "input.txt")
  if not os.path.exists(path):
    pytest.skip("tiny shakespeare is not on this machine")
  ds = make(text_config(path), tmp_path, seq_len=128, batch=4)
  assert ds.num_train_examples > 7000 and ds.num_eval_examples > 800
  assert ds.vocab.decode(next(ds.train_iter)["tokens"][0]).strip()


def test_the_cache_is_reused_and_rebuilt_when_the_corpus_changes(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text("first version\n" * 50)
  config = text_config(str(corpus))
  a = make(config, tmp_path / "run", seq_len=8)
  assert len(os.listdir(tmp_path / "run" / "data_cache")) == 1
  make(config, tmp_path / "run", seq_len=8)
  assert len(os.listdir(tmp_path / "run" / "data_cache")) == 1
  corpus.write_text("second version, longer\n" * 50)
  b = make(config, tmp_path / "run", seq_len=8)
  assert len(os.listdir(tmp_path / "run" / "data_cache")) == 2
  assert "second" in b.vocab.decode(b.train_examples.tokens)
  assert "second" not in a.vocab.decode(a.train_examples.tokens)


@pytest.mark.parametrize("field,value", [
    ("task", "c4"), ("packing", "wrap"), ("vocab", "wordpiece"), ("eval_fraction", 1.0),
    ("document_split", "sentence"), ("sentencepiece_vocab_size", 0), ("seed", -1),
])
def test_bad_config_values_raise_an_error_naming_the_field(field, value):
  config = synthetic_config()
  config[field] = value
  with pytest.raises(ValueError, match=field):
    data.DataConfig.from_config(config)


def test_unknown_config_fields_and_missing_files_raise_clear_errors(tmp_path):
  config = synthetic_config()
  config.unlikely_field = 1
  with pytest.raises(ValueError, match="unlikely_field"):
    data.DataConfig.from_config(config)
  with pytest.raises(ValueError, match="train_files"):
    data.DataConfig.from_config(text_config(""))
  with pytest.raises(FileNotFoundError, match="nowhere"):
    make(text_config(str(tmp_path / "nowhere*.txt")), tmp_path)


def test_bad_batch_and_process_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="global_batch_size"):
    make(synthetic_config(), tmp_path, batch=6, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    make(synthetic_config(), tmp_path, batch=4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="seq_len"):
    make(synthetic_config(), tmp_path, seq_len=10**7)


def test_byte_vocabulary_round_trips_utf8_and_drops_special_ids():
  vocab = data.ByteVocabulary()
  text = "Hark! naïve café, 東京"
  ids = vocab.encode(text)
  assert min(ids) >= 3 and max(ids) < vocab.vocab_size
  assert vocab.decode(ids) == text
  assert vocab.decode([vocab.pad_id, vocab.eos_id] + ids + [vocab.eos_id, 999]) == text
  assert isinstance(vocab, data.Vocabulary)


def test_other_processes_wait_for_the_cache_that_process_zero_writes(tmp_path):
  import threading
  config = synthetic_config()
  result = {}
  waiter = threading.Thread(target=lambda: result.update(
      ds=make(config, tmp_path, batch=4, process_index=1, process_count=2)))
  waiter.start()
  waiter.join(timeout=3.0)
  assert waiter.is_alive() and not result  # nothing to read yet: process 1 waits
  writer = make(config, tmp_path, batch=4, process_index=0, process_count=2)
  waiter.join(timeout=60.0)
  np.testing.assert_array_equal(result["ds"].train_examples.tokens,
                                writer.train_examples.tokens)


def test_per_process_caches_built_concurrently_agree(tmp_path):
  import threading
  config = synthetic_config(cache_per_process=True)
  built = [None, None]

  def build(p):
    built[p] = make(config, tmp_path, batch=4, process_index=p, process_count=2)

  threads = [threading.Thread(target=build, args=(p,)) for p in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60.0)
  np.testing.assert_array_equal(built[0].train_examples.tokens, built[1].train_examples.tokens)
  assert [n for n in os.listdir(tmp_path / "data_cache") if ".tmp" in n] == []


def test_default_config_is_data_configs_defaults_and_its_placeholders_take_overrides():
  import dataclasses
  c = data.default_config()
  assert c.to_dict() == {f.name: f.default for f in dataclasses.fields(data.DataConfig)}
  c.train_files, c.seed = "corpus.txt", 7  # `seed` is an int placeholder (default None)
  with pytest.raises(TypeError):
    c.seed = "seven"
  assert data.DataConfig.from_config(c) == data.DataConfig(train_files="corpus.txt", seed=7)


def test_byte_batch_encoding_equals_one_by_one_encoding():
  vocab = data.ByteVocabulary()
  texts = ["", "abc", "naïve 東京\n"]
  assert [list(ids) for ids in vocab.encode_batch(texts)] == [vocab.encode(t) for t in texts]


def test_global_batch_holds_the_local_rows_on_a_one_device_mesh(tmp_path):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  ds = make(synthetic_config(), tmp_path)
  batch = next(ds.train_iter)
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  from armd_jax.train import partitioning  # the one global-batch helper
  arrays = partitioning.global_batch(batch, NamedSharding(mesh, PartitionSpec("data", None)))
  for key in batch:
    assert arrays[key].shape == batch[key].shape
    np.testing.assert_array_equal(np.asarray(arrays[key]), batch[key])


def test_the_prepare_command_builds_the_cache_and_prints_decoded_examples(tmp_path):
  config_file = tmp_path / "cfg.py"
  config_file.write_text(
      "import ml_collections\nfrom armd_jax import data\n"
      "def get_config():\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.data = data.default_config()\n"
      "  c.data.task = 'synthetic'\n"
      "  c.train = ml_collections.ConfigDict(dict(seq_len=24, global_batch_size=4, seed=0))\n"
      "  return c\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run(
      [sys.executable, "-m", "armd_jax.data", f"--config={config_file}",
       f"--workdir={tmp_path / 'run'}", "--config.data.packing=pad"],
      check=True, capture_output=True, text=True, env=env).stdout
  assert "ByteVocabulary" in out and "examples of 24" in out and "--- example 1" in out
  assert os.listdir(tmp_path / "run" / "data_cache")
