"""Vocabularies: SentencePiece trained and cached in the workdir, Hugging Face tokenizer
files (GPT-2-like byte-level BPE and BERT-like WordPiece, built locally), load_vocab."""

import os

import numpy as np
import pytest

from armd_jax import data

tokenizers = pytest.importorskip("tokenizers")  # in the 'test' and 'hf' extras

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die "
        "than to famish?\n")


def corpus(tmp_path, copies=60):
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(f"{TEXT}Scene {i}.\n" for i in range(copies)))
  return str(path)


def config(train_files, **overrides):
  c = data.default_config()
  c.task = "text_files"
  c.train_files = train_files
  c.document_split = "paragraph"
  c.num_threads = 0
  c.update(overrides)
  return c


def make(c, workdir, seq_len=32):
  return data.create_datasets(c, seq_len=seq_len, global_batch_size=4, workdir=str(workdir),
                              seed=0)


def gpt2_like_tokenizer(path):
  """A byte-level BPE with <|endoftext|> (the GPT-2 layout) trained on TEXT."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT] * 5, trainer)
  tok.save(str(path))
  return str(path)


def bert_like_tokenizer(path):
  """A lower-casing WordPiece with [PAD]/[UNK]/[CLS]/[SEP]/[MASK] (the BERT layout)."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.decoder = tokenizers.decoders.WordPiece()
  trainer = tokenizers.trainers.WordPieceTrainer(
      vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  tok.train_from_iterator([TEXT] * 5, trainer)
  tok.save(str(path))
  return str(path)


def test_sentencepiece_is_trained_on_the_corpus_once_and_round_trips_text(tmp_path):
  c = config(corpus(tmp_path), vocab="sentencepiece", sentencepiece_vocab_size=400)
  ds = make(c, tmp_path / "run")
  vocab = ds.vocab
  assert isinstance(vocab, data.SentencePieceVocabulary)
  assert (vocab.pad_id, vocab.eos_id) == (0, 1)  # seqio's convention
  assert vocab.vocab_size <= 400
  assert vocab.decode(vocab.encode(TEXT)) == TEXT  # newlines and spaces survive
  assert len(vocab.encode(TEXT)) < 0.8 * len(TEXT.encode())  # it learned pieces
  model_files = os.listdir(tmp_path / "run" / "vocab")
  assert model_files == ["sentencepiece_unigram_400.model"]
  stamp = os.path.getmtime(tmp_path / "run" / "vocab" / model_files[0])
  make(c, tmp_path / "run")
  assert os.path.getmtime(tmp_path / "run" / "vocab" / model_files[0]) == stamp


def test_load_vocab_rebuilds_the_sentencepiece_vocab_without_the_corpus(tmp_path):
  path = corpus(tmp_path)
  c = config(path, vocab="sentencepiece", sentencepiece_vocab_size=400)
  trained = make(c, tmp_path / "run").vocab
  os.remove(path)
  loaded = data.load_vocab(c, str(tmp_path / "run"))
  assert loaded.encode(TEXT) == trained.encode(TEXT)
  assert loaded.vocab_size == trained.vocab_size


def test_load_vocab_raises_for_a_workdir_that_never_built_the_vocab(tmp_path):
  c = config("unused.txt", vocab="sentencepiece")
  with pytest.raises(FileNotFoundError, match="SentencePiece"):
    data.load_vocab(c, str(tmp_path))


def test_load_vocab_for_bytes_needs_no_files(tmp_path):
  assert data.load_vocab(config("unused.txt"), str(tmp_path)).vocab_size == 259


def test_an_existing_sentencepiece_model_file_is_used_as_given(tmp_path):
  c = config(corpus(tmp_path), vocab="sentencepiece", sentencepiece_vocab_size=380)
  model = make(c, tmp_path / "first").vocab.model_file
  c2 = config(corpus(tmp_path), vocab="sentencepiece", sentencepiece_model=model)
  ds = make(c2, tmp_path / "second")
  assert ds.vocab.model_file == model
  assert not os.path.exists(tmp_path / "second" / "vocab" / "sentencepiece_unigram_1024.model")


@pytest.mark.parametrize("builder,eos,pad", [
    (gpt2_like_tokenizer, "<|endoftext|>", "<|endoftext|>"),
    (bert_like_tokenizer, "[SEP]", "[PAD]"),
])
def test_hugging_face_tokenizer_files_encode_the_corpus_and_are_copied_to_the_workdir(
    tmp_path, builder, eos, pad):
  tokenizer_file = builder(tmp_path / "tokenizer.json")
  reference = tokenizers.Tokenizer.from_file(tokenizer_file)
  c = config(corpus(tmp_path), vocab="hf", hf_tokenizer=tokenizer_file)
  ds = make(c, tmp_path / "run")
  vocab = ds.vocab
  assert vocab.eos_id == reference.token_to_id(eos)
  assert vocab.pad_id == reference.token_to_id(pad)
  assert vocab.vocab_size == reference.get_vocab_size()
  assert vocab.encode(TEXT) == reference.encode(TEXT, add_special_tokens=False).ids
  assert vocab.encode_batch([TEXT, "Speak."]) == [vocab.encode(TEXT), vocab.encode("Speak.")]
  batch = next(ds.train_iter)
  assert batch["tokens"].max() < vocab.vocab_size
  assert "speak" in vocab.decode(ds.train_examples.tokens[:200]).lower()
  os.remove(tokenizer_file)  # the workdir copy is enough to reload
  reloaded = data.load_vocab(c, str(tmp_path / "run"))
  assert reloaded.encode(TEXT) == vocab.encode(TEXT)


def test_a_tokenizer_directory_is_accepted(tmp_path):
  os.makedirs(tmp_path / "tok")
  gpt2_like_tokenizer(tmp_path / "tok" / "tokenizer.json")
  vocab = data.HuggingFaceVocabulary(str(tmp_path / "tok"))
  assert vocab.decode(vocab.encode("Speak, speak.")) == "Speak, speak."


def test_a_missing_tokenizer_file_raises_naming_the_flag(tmp_path):
  with pytest.raises(FileNotFoundError, match="hf_tokenizer"):
    data.HuggingFaceVocabulary(str(tmp_path / "missing" / "tokenizer.json"))


def test_hf_vocab_without_a_tokenizer_raises_for_text_files():
  with pytest.raises(ValueError, match="hf_tokenizer"):
    data.DataConfig.from_config(config("a.txt", vocab="hf"))


def test_task_defaults_pick_the_papers_tokenizers():
  lm1b = data.DataConfig.from_config(config("", task="lm1b"))
  owt = data.DataConfig.from_config(config("", task="openwebtext"))
  assert (lm1b.vocab, lm1b.hf_tokenizer) == ("hf", "bert-base-uncased")
  assert (owt.vocab, owt.hf_tokenizer) == ("hf", "gpt2")


def test_sentencepiece_tokens_in_batches_decode_to_corpus_text(tmp_path):
  path = corpus(tmp_path)
  c = config(path, vocab="sentencepiece", sentencepiece_vocab_size=400, packing="pad")
  ds = make(c, tmp_path / "run", seq_len=64)
  batch = next(ds.train_iter)
  text = open(path).read()
  for tokens, mask in zip(batch["tokens"], batch["mask"]):
    piece = ds.vocab.decode(tokens[mask == 1])
    assert piece and piece in text
  assert np.all(batch["tokens"][batch["mask"] == 0] == ds.vocab.pad_id)


def test_a_too_small_sentencepiece_vocab_raises_naming_the_field(tmp_path):
  c = config(corpus(tmp_path), vocab="sentencepiece", sentencepiece_vocab_size=100)
  with pytest.raises(ValueError, match="sentencepiece_vocab_size"):
    make(c, tmp_path / "run")
