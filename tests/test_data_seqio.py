"""The hub-backed paths on local data: seqio Tasks, TFDS (lm1b, tiny_shakespeare) through
`tfds.testing.mock_data` fed with local text, and OpenWebText with `datasets` replaced by
local documents. They need TensorFlow, imported by the first test that uses it (not at
collection, which every xdist worker does), hence `slow`."""

import importlib.util
import os

import numpy as np
import pytest

from armd_jax import data
from armd_jax.data import cache, sources

HUB_LIBRARIES = ("tensorflow", "tensorflow_datasets", "seqio")  # the [data] extra
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in HUB_LIBRARIES),
    reason=f"needs {', '.join(HUB_LIBRARIES)} (the [data] extra)")]

SENTENCES = [f"sentence number {i} of the billion word benchmark ." for i in range(40)]


def config(**overrides):
  c = data.default_config()
  c.num_threads = 0
  c.update(overrides)
  return c


def seqio_targets(task, split):
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                             use_cached=False, try_in_mem_cache=False)
  return np.concatenate([ex["targets"] for ex in dataset.as_numpy_iterator()])


@pytest.mark.parametrize("vocab_kind", ["byte", "sentencepiece"])
def test_seqio_task_gives_the_same_tokens_as_the_training_cache(tmp_path, vocab_kind):
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n\n".join(f"Doc {i}: naïve text, line one.\nline two {i * i}."
                                for i in range(30)))
  c = config(task="text_files", train_files=str(corpus), document_split="paragraph",
             vocab=vocab_kind, sentencepiece_vocab_size=400)
  ds = data.create_datasets(c, seq_len=16, global_batch_size=2, workdir=str(tmp_path / "run"),
                            seed=0)
  task = data.make_seqio_task(c, ds.vocab)
  for split, examples in (("train", ds.train_examples), ("eval", ds.eval_examples)):
    np.testing.assert_array_equal(seqio_targets(task, split), np.asarray(examples.tokens))


def test_seqio_task_wraps_hugging_face_tokenizers(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2, "the": 3, "cat": 4}, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "c.txt").write_text("the cat\n\nthe dog\n\ncat cat\n\nthe")
  c = config(task="text_files", train_files=str(tmp_path / "c.txt"), vocab="hf",
             document_split="paragraph", hf_tokenizer=str(tmp_path / "tokenizer.json"))
  ds = data.create_datasets(c, seq_len=4, global_batch_size=1, workdir=str(tmp_path / "run"),
                            seed=0)
  task = data.make_seqio_task(c, ds.vocab)
  np.testing.assert_array_equal(seqio_targets(task, "train"), [3, 4, 2, 3, 1, 2, 4, 4, 2])


def local_tfds(texts_by_split):
  """mock_data hook: serves {'text': ...} examples of a TFDS split from local strings."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def as_dataset(builder, split, *args, **kwargs):
    del builder, args, kwargs
    texts = texts_by_split[str(split)]
    return tf.data.Dataset.from_tensor_slices({"text": tf.constant(texts)})

  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_lm1b_reads_tfds_train_and_test_splits_one_sentence_per_document(tmp_path):
  texts = {"train": SENTENCES[:30], "test": SENTENCES[30:]}
  with local_tfds(texts):
    c = data.DataConfig.from_config(config(task="lm1b", vocab="byte", packing="pad"))
    assert list(sources.documents(c, "train")) == SENTENCES[:30]
    assert list(sources.documents(c, "eval")) == SENTENCES[30:]
    ds = data.create_datasets(c, seq_len=64, global_batch_size=2, workdir=str(tmp_path),
                              seed=0)
  assert ds.num_train_examples == 30 and ds.num_eval_examples == 10
  held_out = [ds.vocab.decode(b["tokens"][i]) for b in ds.eval_batches() for i in range(2)]
  assert held_out == SENTENCES[30:]


def test_tiny_shakespeare_reads_tfds_validation_as_the_held_out_split(tmp_path):
  texts = {"train": ["First Citizen:\nSpeak.\n" * 20], "validation": ["All:\nResolved.\n" * 5],
           "test": ["never read"]}
  with local_tfds(texts):
    ds = data.create_datasets(config(task="tiny_shakespeare"), seq_len=8, global_batch_size=2,
                              workdir=str(tmp_path), seed=0)
  assert ds.vocab.decode(ds.train_examples.tokens).startswith("First Citizen:")
  assert ds.vocab.decode(ds.eval_examples.tokens) == texts["validation"][0]


def test_tfds_seqio_task_reads_the_mapped_split(tmp_path):
  texts = {"train": SENTENCES[:3], "test": SENTENCES[3:5]}
  with local_tfds(texts):
    c = config(task="lm1b", vocab="byte")
    task = data.make_seqio_task(c, data.ByteVocabulary())
    vocab = data.ByteVocabulary()
    expected = sum((vocab.encode(s) + [vocab.eos_id] for s in SENTENCES[3:5]), [])
    np.testing.assert_array_equal(seqio_targets(task, "eval"), expected)


def test_openwebtext_holds_out_the_last_documents_of_the_hf_train_split(tmp_path, monkeypatch):
  docs = [{"text": f"web page {i}\nwith two lines"} for i in range(50)]
  requested = []
  monkeypatch.setattr(sources, "load_hf_dataset", lambda name: requested.append(name) or docs)
  c = config(task="openwebtext", vocab="byte", eval_fraction=0.1)
  ds = data.create_datasets(c, seq_len=32, global_batch_size=4, workdir=str(tmp_path), seed=0)
  assert requested and requested[0] == "openwebtext"
  held_out = ds.vocab.decode(ds.eval_examples.tokens)
  assert held_out == "".join(d["text"] for d in docs[45:])  # eos ids are dropped by decode
  assert "web page 44" in ds.vocab.decode(ds.train_examples.tokens)
  assert next(ds.train_iter)["tokens"].shape == (4, 32)


def test_max_train_documents_caps_what_is_tokenised(tmp_path, monkeypatch):
  docs = [{"text": f"page {i}"} for i in range(100)]
  monkeypatch.setattr(sources, "load_hf_dataset", lambda name: docs)
  c = data.DataConfig.from_config(config(task="openwebtext", vocab="byte",
                                         max_train_documents=7))
  split = cache.tokenize_documents(sources.documents(c, "train"), data.ByteVocabulary())
  assert split.num_documents == 7


def test_hub_tokenizer_names_without_transformers_raise_a_clear_error():
  try:
    import transformers  # pylint: disable=unused-import
    pytest.skip("transformers is installed; the hub path would try the network")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="hf_tokenizer='gpt2'"):
    data.HuggingFaceVocabulary("gpt2")


REGISTRY = '''
import functools
import seqio
import tensorflow as tf

LINES = {lines!r}


def dataset_fn(split, shuffle_files, seed=None):
  del shuffle_files, seed
  return tf.data.Dataset.from_tensor_slices({{"text": LINES[split]}})


seqio.TaskRegistry.add(
    "armd_test_registered_lines",
    source=seqio.FunctionDataSource(dataset_fn, splits=("train", "validation")),
    preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={{"targets": "text"}}),
                   seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
    output_features={{"targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=True)}})
seqio.MixtureRegistry.add("armd_test_mixture", [("armd_test_registered_lines", 1.0)])
'''


LINES = {"train": [f"registered line {i}: the cat sees a dog." for i in range(60)],
         "validation": [f"held out {i}." for i in range(6)]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
  """A user's registry module (a .py file, imported once per process) over test lines."""
  path = tmp_path_factory.mktemp("registry") / "my_tasks.py"
  path.write_text(REGISTRY.format(lines=LINES))
  return str(path)


@pytest.mark.parametrize("name", ["armd_test_registered_lines", "armd_test_mixture"])
def test_a_registered_seqio_task_is_a_training_source(tmp_path, registry, name):
  module, lines = registry, LINES
  c = config(task=f"seqio:{name}", seqio_module=module)
  ds = data.create_datasets(c, seq_len=16, global_batch_size=4, workdir=str(tmp_path / "run"),
                            seed=0)
  vocab = data.ByteVocabulary()
  assert ds.vocab.vocab_size == 259 and ds.vocab.eos_id == vocab.eos_id
  expected = {split: sum((vocab.encode(t) + [vocab.eos_id] for t in texts), [])
              for split, texts in lines.items()}
  np.testing.assert_array_equal(np.asarray(ds.train_examples.tokens), expected["train"])
  np.testing.assert_array_equal(np.asarray(ds.eval_examples.tokens), expected["validation"])
  assert ds.vocab.decode(next(ds.train_iter)["tokens"][0]).strip()  # real text
  # Two processes: disjoint rows that together are the one-process batch.
  parts = [next(data.create_datasets(c, seq_len=16, global_batch_size=4,
                                     workdir=str(tmp_path / "run"), seed=0, process_index=p,
                                     process_count=2).train_iter)["tokens"] for p in range(2)]
  one = next(data.create_datasets(c, seq_len=16, global_batch_size=4,
                                  workdir=str(tmp_path / "run"), seed=0).train_iter)["tokens"]
  np.testing.assert_array_equal(np.concatenate(parts), one)


def test_with_shard_by_process_each_process_reads_and_trains_on_its_own_shard(tmp_path,
                                                                             registry):
  c = config(task="seqio:armd_test_registered_lines", seqio_module=registry,
             seqio_shard_by_process=True, packing="pad")
  vocab = data.ByteVocabulary()
  documents = {vocab.decode(vocab.encode(t)) for t in LINES["train"]}
  held_out = sum((vocab.encode(t) + [vocab.eos_id] for t in LINES["validation"]), [])
  seen, runs = [], []
  for p in range(2):
    ds = data.create_datasets(c, seq_len=48, global_batch_size=4, workdir=str(tmp_path / "run"),
                              seed=0, process_index=p, process_count=2)
    runs.append(ds)
    shard = [vocab.decode(ds.train_examples.gather(np.array([i]))["tokens"][0]).strip()
             for i in range(len(ds.train_examples))]
    assert 0 < len(shard) < len(LINES["train"])
    seen.append(set(shard))
    batches = [next(ds.train_iter)["tokens"] for _ in range(3)]
    for batch in batches:  # only this process's documents
      assert {vocab.decode(row).strip() for row in batch} <= seen[-1]
    # The held-out split is read whole by every process.
    np.testing.assert_array_equal(np.asarray(ds.eval_examples.tokens), held_out)
    # The iterator position restores as for the built-in corpora.
    state = ds.train_iter.get_state()
    after = next(ds.train_iter)["tokens"]
    fresh = data.create_datasets(c, seq_len=48, global_batch_size=4,
                                 workdir=str(tmp_path / "run"), seed=0, process_index=p,
                                 process_count=2)
    fresh.train_iter.set_state(state)
    np.testing.assert_array_equal(next(fresh.train_iter)["tokens"], after)
  assert not seen[0] & seen[1] and seen[0] | seen[1] == documents  # a partition
  entries = sorted(os.listdir(tmp_path / "run" / "data_cache"))
  assert sum("shard0of2" in e for e in entries) == 1 == sum("shard1of2" in e for e in entries)
  with pytest.raises(ValueError, match="seqio_shard_by_process=True needs a task 'seqio:NAME'"):
    data.DataConfig.from_config(config(task="synthetic", seqio_shard_by_process=True))


def test_unregistered_seqio_names_and_text_vocabularies_are_clear_errors(tmp_path, registry):
  module = registry
  with pytest.raises(ValueError, match="no seqio Task or Mixture 'nope'"):
    data.create_datasets(config(task="seqio:nope", seqio_module=module), seq_len=16,
                         global_batch_size=4, workdir=str(tmp_path), seed=0)
  with pytest.raises(ValueError, match="brings its own vocabulary"):
    data.DataConfig.from_config(config(task="seqio:x", vocab="byte"))
  with pytest.raises(ValueError, match="config.data.task"):
    data.DataConfig.from_config(config(task="seqio:"))


def test_training_on_a_seqio_task_checkpoints_its_iterator_position(tmp_path, registry):
  import glob  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top

  from armd_jax import train  # pylint: disable=g-import-not-at-top
  from armd_jax.train.defaults import config_from_file  # pylint: disable=g-import-not-at-top

  module = registry
  c = config_from_file("configs/tiny.py")
  c.data.task = "seqio:armd_test_registered_lines"
  c.data.seqio_module = module
  c.train.num_steps = 3
  c.train.checkpoint_every = 3
  c.train.eval_every = 0
  c.eval.num_batches = 1
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(c, workdir)
  assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["eval/nll"])
  saved = glob.glob(f"{workdir}/checkpoints/3/data/*process*")
  assert len(saved) == 1
  ds = data.create_datasets(c.data, seq_len=16, global_batch_size=8, workdir=workdir, seed=0)
  for _ in range(3):
    next(ds.train_iter)
  with open(saved[0]) as f:
    assert json.load(f) == json.loads(json.dumps(ds.train_iter.get_state()))
