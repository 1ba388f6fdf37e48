"""Data pipeline cost: first build (tokenise + cache), warm reload, and time per batch.

  python benchmarks/data_pipeline.py [--corpus=../shared/data/tinyshakespeare/input.txt] \
      [--cases=synthetic,bytes,paragraphs,sentencepiece] [--num_batches=500]

Writes benchmarks/results/data_pipeline.json and prints a table (summarised in
docs/data.md). The per-batch time is what the train loop pays each step on the host.
"""

import argparse
import json
import os
import tempfile
import time

from armd_jax import data

CASES = {
    # key: (name, config overrides, seq_len, global batch)
    "synthetic": ("synthetic byte concat", dict(task="synthetic"), 128, 32),
    "bytes": ("text_files byte concat", dict(task="text_files"), 128, 32),
    "paragraphs": ("text_files byte pad (paragraphs)",
                   dict(task="text_files", packing="pad", document_split="paragraph"), 128, 32),
    "sentencepiece": ("text_files sentencepiece-1024 concat",
                      dict(task="text_files", vocab="sentencepiece",
                           sentencepiece_vocab_size=1024), 256, 32),
}


def run_case(corpus, overrides, seq_len, batch, num_threads, num_batches):
  config = data.default_config()
  config.train_files = corpus
  config.num_threads = num_threads
  config.update(overrides)
  workdir = tempfile.mkdtemp(prefix="armd_data_bench_")
  kwargs = dict(seq_len=seq_len, global_batch_size=batch, workdir=workdir, seed=0)
  start = time.perf_counter()
  data.create_datasets(config, **kwargs)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  ds = data.create_datasets(config, **kwargs)
  reload_s = time.perf_counter() - start
  next(ds.train_iter)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(ds.train_iter)
  batch_ms = 1e3 * (time.perf_counter() - start) / num_batches
  return dict(build_s=round(build_s, 3), reload_s=round(reload_s, 3),
              batch_ms=round(batch_ms, 3), train_examples=ds.num_train_examples,
              eval_examples=ds.num_eval_examples, vocab_size=ds.vocab.vocab_size)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--corpus", default=os.path.join(
      os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare", "input.txt"))
  parser.add_argument("--num_batches", type=int, default=500)
  parser.add_argument("--cases", default=",".join(CASES), help="comma-separated keys of CASES")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "data_pipeline.json"))
  args = parser.parse_args()
  unknown = set(args.cases.split(",")) - set(CASES)
  if unknown:
    parser.error(f"--cases: unknown {sorted(unknown)}; known: {list(CASES)}")
  results = []
  for name, overrides, seq_len, batch in (CASES[key] for key in args.cases.split(",")):
    for num_threads in (0, 1):
      row = dict(case=name, seq_len=seq_len, global_batch=batch, num_threads=num_threads)
      row.update(run_case(args.corpus, overrides, seq_len, batch, num_threads,
                          args.num_batches))
      print(json.dumps(row), flush=True)
      results.append(row)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"corpus": os.path.basename(args.corpus), "cpu_count": os.cpu_count(),
               "results": results}, f, indent=1)
  print("\n| case | threads | build s | reload s | ms/batch |\n|---|---|---|---|---|")
  for r in results:
    print(f"| {r['case']} ({r['global_batch']}x{r['seq_len']}) | {r['num_threads']} | "
          f"{r['build_s']} | {r['reload_s']} | {r['batch_ms']} |")


if __name__ == "__main__":
  main()
