"""Zero-shot evaluation corpora: loaders, detokenisers and batching.

Sets and where they come from (only on users' machines; nothing is downloaded in tests):

| name        | Hugging Face (`datasets`)                     | TFDS       | local file shape |
|-------------|-----------------------------------------------|------------|------------------|
| ptb         | `ptb_text_only`, field `sentence`             | -          | `ptb.test.txt`: one tokenised sentence per line, `<unk>`, `N` for numbers |
| wikitext2   | `wikitext`/`wikitext-2-raw-v1`, field `text`  | -          | `wiki.test.raw` / `.tokens`: ` = Title = ` headings, `@-@` `@,@` `@.@` |
| wikitext103 | `wikitext`/`wikitext-103-raw-v1`, `text`      | -          | as wikitext2 |
| lambada     | `EleutherAI/lambada_openai`, field `text`     | -          | `lambada_test.jsonl` (`{"text": ...}` per line) or one passage per line |
| lm1b        | `lm1b`, field `text`                          | `lm1b`     | one sentence per line (`news.en.heldout-*`) |
| text        | -                                             | -          | any UTF-8 `.txt` file(s); each file one document |

Detokenisation conventions (applied before our tokenizer, as GPT-2 / SEDD / MDLM do):
- ptb: ` 's` -> `'s`, ` n't` -> `n't`, spaces before `, . ; : ? ! ' %` and inside
  brackets removed, `-lrb-`/`-rrb-` etc. -> brackets, ` N ` kept, `<unk>` kept
  literally (it is part of the test set, as in every PTB zero-shot number).
- wikitext: `@-@` -> `-`, `@,@` -> `,`, `@.@` -> `.`, spaces before punctuation
  and inside brackets/quotes removed, heading markers ` = x = ` -> `x` on its own line.
- lambada: curly quotes -> straight quotes, whitespace collapsed; passages are scored
  one per sequence (the last `seq_len` tokens kept so the target word is included).
- lm1b: ` 's` -> `'s`, ` n't` -> `n't`, spaces before `, . ; : ? !` removed, `` `` ``/`''`
  -> `"`.
- text: unchanged.
PTB, WikiText and LM1B documents are concatenated with EOS between them and cut into
`seq_len` chunks; LAMBADA passages are one sequence each.
"""

from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

ZERO_SHOT_SETS = ("ptb", "wikitext2", "wikitext103", "lambada", "lm1b", "text")
PACKING = {"ptb": "concat", "wikitext2": "concat", "wikitext103": "concat",
           "lambada": "document", "lm1b": "concat", "text": "concat"}


def _tidy_punctuation(text: str) -> str:
  text = re.sub(r" ([,.;:?!%)\]}])", r"\1", text)
  text = re.sub(r"([(\[{]) ", r"\1", text)
  return text


def ptb_detokenize(text: str) -> str:
  """Penn Treebank (Mikolov split) tokenised text -> ordinary text (see module doc)."""
  for tok, char in (("-lrb-", "("), ("-rrb-", ")"), ("-lcb-", "{"), ("-rcb-", "}"),
                    ("-lsb-", "["), ("-rsb-", "]")):
    text = text.replace(tok, char)
  text = text.replace(" 's", "'s").replace(" n't", "n't").replace(" 're", "'re")
  text = text.replace(" 've", "'ve").replace(" 'm", "'m").replace(" 'll", "'ll")
  text = text.replace(" 'd", "'d").replace(" ' ", "' ")
  return _tidy_punctuation(text).strip()


def wikitext_detokenize(text: str) -> str:
  """WikiText tokenised text (raw or .tokens) -> ordinary text (see module doc)."""
  text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
  text = re.sub(r"^ *(?:= )+(.*?)(?: =)+ *$", r"\1", text, flags=re.MULTILINE)
  text = text.replace(" 's", "'s").replace(" n't", "n't")
  text = re.sub(r'" ([^"]*?) "', r'"\1"', text)
  return _tidy_punctuation(text)


def lambada_detokenize(text: str) -> str:
  """LAMBADA passage -> text with straight quotes and single spaces."""
  text = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2019", "'")
  text = text.replace("\u2018", "'")
  return re.sub(r"\s+", " ", text).strip()


def lm1b_detokenize(text: str) -> str:
  """One Billion Word sentence -> ordinary text (see module doc)."""
  text = text.replace("`` ", '"').replace(" ''", '"').replace("``", '"').replace("''", '"')
  text = text.replace(" 's", "'s").replace(" n't", "n't")
  return _tidy_punctuation(text).strip()


DETOKENIZERS: Dict[str, Callable[[str], str]] = {
    "ptb": ptb_detokenize, "wikitext2": wikitext_detokenize,
    "wikitext103": wikitext_detokenize, "lambada": lambada_detokenize,
    "lm1b": lm1b_detokenize, "text": lambda text: text,
}


def _check_name(name: str) -> None:
  if name not in ZERO_SHOT_SETS:
    raise ValueError(f"unknown zero-shot set {name!r}; expected one of {ZERO_SHOT_SETS}.")


def read_local(name: str, paths: Sequence[str]) -> List[str]:
  """Raw documents of set `name` from local files shaped like the real set (module doc)."""
  _check_name(name)
  docs: List[str] = []
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(f"zero-shot {name}: no such file {path!r}.")
    with open(path, encoding="utf-8") as f:
      content = f.read()
    if name == "lambada":
      for line in content.splitlines():
        line = line.strip()
        if line:
          docs.append(json.loads(line)["text"] if line.startswith("{") else line)
    elif name in ("ptb", "lm1b"):
      docs.extend(line.strip() for line in content.splitlines() if line.strip())
    else:  # wikitext and text: one document per file
      docs.append(content)
  if not docs:
    raise ValueError(f"zero-shot {name}: files {list(paths)} hold no text.")
  return docs


def read_remote(name: str, split: str = "test") -> List[str]:
  """Raw documents of a set through Hugging Face `datasets` (lm1b: TFDS first).

  Needs network access and the optional packages (`pip install armd-jax[hf]` /
  `[data]`); raises a clear error otherwise.
  """
  _check_name(name)
  if name == "text":
    raise ValueError("zero-shot 'text' reads local files only: pass paths.")
  if name == "lm1b":
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      ds = tfds.load("lm1b", split=split)
      return [ex["text"].decode("utf-8") for ex in tfds.as_numpy(ds)]
    except Exception:  # pylint: disable=broad-except
      pass  # fall back to Hugging Face below
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"zero-shot {name}: install Hugging Face datasets "
                      "(pip install 'armd-jax[hf]') or pass local files.") from e
  source = {"ptb": (("ptb_text_only",), "sentence"),
            "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text"),
            "wikitext103": (("wikitext", "wikitext-103-raw-v1"), "text"),
            "lambada": (("EleutherAI/lambada_openai",), "text"),
            "lm1b": (("lm1b",), "text")}[name]
  rows = datasets.load_dataset(*source[0], split=split)[source[1]]
  if name.startswith("wikitext"):
    return ["".join(rows)]  # the whole split is one document, as in the raw files
  return [r for r in rows if r.strip()]


def load_texts(name: str, *, paths: Optional[Sequence[str]] = None, split: str = "test",
               detokenize: bool = True) -> List[str]:
  """Detokenised documents of a zero-shot set, from local `paths` or the hub/TFDS."""
  docs = read_local(name, paths) if paths else read_remote(name, split)
  return [DETOKENIZERS[name](d) for d in docs] if detokenize else docs


def encode_batches(texts: Sequence[str], vocab, *, seq_len: int, batch_size: int,
                   packing: str = "concat") -> Iterator[Dict[str, np.ndarray]]:
  """Deterministic eval batches {'tokens', 'mask'} int32 [batch_size, seq_len].

  packing='concat': documents joined with EOS and cut into seq_len chunks (the last
  one padded); 'document': one document per row, its last seq_len tokens, padded.
  Rows beyond the data are all padding (mask 0), so every batch has the same shape.
  """
  if packing not in ("concat", "document"):
    raise ValueError(f"packing must be 'concat' or 'document', got {packing!r}.")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}.")
  if packing == "concat":
    stream: List[int] = []
    for i, text in enumerate(texts):
      if i:
        stream.append(vocab.eos_id)
      stream.extend(vocab.encode(text))
    rows = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
  else:
    rows = [list(vocab.encode(text))[-seq_len:] for text in texts]
  rows = [r for r in rows if r]
  if not rows:
    raise ValueError("encode_batches: no tokens to evaluate.")
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    tokens = np.full((batch_size, seq_len), vocab.pad_id, np.int32)
    mask = np.zeros((batch_size, seq_len), np.int32)
    for r, row in enumerate(chunk):
      tokens[r, :len(row)] = row
      mask[r, :len(row)] = 1
    yield {"tokens": tokens, "mask": mask}
