"""Benchmark scripts: every one runs its command at tiny sizes (a new Python, or its
main(argv) with the same arguments in the test process) and writes its results file with
the expected keys (so none can rot unseen), clear errors on missing inputs, and the
decode FLOPs accounting (cache setup counted once, not in a call)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare", "input.txt")


def run_script(*argv, timeout=900):
  """Runs `python benchmarks/<argv>` on CPU from the repository root; asserts success."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  run = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env, check=False)
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
  return run


def _load_benchmark(name):
  """benchmarks/<name>.py as a module (its main(argv) runs the command in this process)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_compare_names_a_missing_data_file(monkeypatch):
  missing = os.path.join(ROOT, "no_such_dir", "input.txt")
  monkeypatch.setattr(sys, "argv", ["benchmarks/compare.py", "--smoke", "--data", missing])
  with pytest.raises(SystemExit) as exit_:  # the message Python prints on stderr, status 1
    _load_benchmark("compare").main()
  assert f"no tiny Shakespeare file at {missing} (pass --data)" in str(exit_.value.code)


@pytest.mark.slow
def test_decode_speed_counts_the_cache_setup_once_and_each_call_width_apart(tmp_path):
  out = tmp_path / "decode_speed.json"
  _load_benchmark("decode_speed").main([  # its command line's arguments, in this process
      "--settings=micro:16", "--streams=4", "--flops_streams=4", "--repeats=1",
      "--nocache_calls=2", "--parts", "--part_loops=2", f"--out={out}"])
  results = json.loads(out.read_text())
  assert {"machine", "command", "records"} <= set(results)
  (record,) = results["records"]
  timing = {(row["method"], row["streams"]): row for row in record["timing"]}
  assert set(timing) == {("no_cache", 1), ("cached", 1), ("strided", 4)}
  assert timing[("cached", 1)]["calls"] == 16
  assert timing[("strided", 4)]["calls"] == 7  # 4 stream heads, then 3 width-4 calls
  assert all(row["seconds"] > 0 for row in record["timing"])
  assert set(record["speedup"]) == {"cached_vs_no_cache", "strided_S4_vs_cached"}
  flops = record["flops"]
  per_call = flops["per_call"]
  # The one-time setup (empty caches, the BOS row) is reported on its own ...
  assert set(per_call) == {"setup", "width_1", "width_4"}
  assert per_call["setup"] > 0
  # ... and is not inside the width-1 call: a width-4 call then does ~4x its work (the
  # per-row work of the layers dominates: 4.10x at micro size; with the setup, 10% of a
  # width-1 call there, inside width 1 it would be 3.74x).
  assert 3.8 < per_call["width_4"] / per_call["width_1"] < 4.5
  assert flops["width_ratio"] == pytest.approx(per_call["width_4"] / per_call["width_1"])
  # Totals count the setup once per decode.
  assert flops["total"]["sequential"] == pytest.approx(
      per_call["setup"] + 16 * per_call["width_1"])
  assert flops["total"]["strided"] == pytest.approx(
      per_call["setup"] + 4 * per_call["width_1"] + 3 * per_call["width_4"])
  parts = {(row["part"], row["width"]) for row in record["parts"]}
  assert parts == {(name, width) for width in (1, 4) for name in
                   ("attend_layer", "keys_values", "logits", "sample", "cache_write")}


def test_decode_speed_rejects_an_unknown_model(capsys):
  with pytest.raises(SystemExit) as exit_:
    _load_benchmark("decode_speed").main(["--settings=huge:16"])
  assert exit_.value.code == 2 and "unknown model 'huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_throughput_times_the_three_variants(tmp_path):
  out = tmp_path / "throughput"
  _load_benchmark("train_throughput").main([  # its command line's arguments, in this process
      "--sizes=micro", "--trials=1", f"--out={out}"])
  results = json.loads((tmp_path / "throughput.json").read_text())
  assert {r["model"] for r in results["results"]} == {"armd", "ar", "armd_l2r_1s"}
  assert all(r["step_ms"] > 0 and r["xla_gflop_per_step"] > 0 for r in results["results"])
  ratios = results["ratios"]["micro"]
  assert ratios["armd_over_ar_flops"] > 1.0  # the two-stream lower half costs more
  assert "armd_over_ar" in ratios and "armd_over_l2r_1s" in ratios
  assert "| micro | armd |" in (tmp_path / "throughput.md").read_text()


@pytest.mark.skipif(not os.path.exists(CORPUS), reason="no tiny Shakespeare corpus")
def test_data_pipeline_times_its_cases(tmp_path):
  corpus = tmp_path / "corpus.txt"
  with open(CORPUS, encoding="utf-8") as f:
    corpus.write_text(f.read(20_000))
  out = tmp_path / "data_pipeline.json"
  run_script("benchmarks/data_pipeline.py", f"--corpus={corpus}", "--cases=synthetic,bytes",
             "--num_batches=2", f"--out={out}")
  results = json.loads(out.read_text())
  rows = results["results"]
  assert [(r["case"], r["num_threads"]) for r in rows] == [
      ("synthetic byte concat", 0), ("synthetic byte concat", 1),
      ("text_files byte concat", 0), ("text_files byte concat", 1)]
  for row in rows:
    assert {"build_s", "reload_s", "batch_ms", "train_examples", "vocab_size"} <= set(row)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_state_memory_reports_bytes_per_chip(tmp_path):
  out = tmp_path / "state_memory"
  run_script("benchmarks/state_memory.py", "--configs=owt_small", "--topologies=v5e:8x8",
             f"--out={out}")
  rows = json.loads((tmp_path / "state_memory.json").read_text())
  assert [r["mesh_choice"] for r in rows] == ["config", "data_parallel", "fsdp",
                                              "fsdp x tensor 4"]
  for row in rows:
    assert row["chips"] == 64 and 0 < row["state_bytes"] < row["hbm_bytes"]
  # Sharding the state over 64 chips (fsdp) needs less per chip than replicating it.
  by = {r["mesh_choice"]: r["state_bytes"] for r in rows}
  assert by["fsdp"] < by["data_parallel"] / 10
  assert "| owt_small | v5e:8x8" in (tmp_path / "state_memory.md").read_text()


@pytest.mark.slow
def test_attention_kernel_smoke_writes_its_table(tmp_path):
  out = tmp_path / "attention_kernel.md"
  _load_benchmark("attention_kernel").main(["--smoke", f"--out={out}"])  # in this process
  text = out.read_text()
  assert "SMOKE" in text
  for name in ("pallas 16x16", "xla masked reference", "xla causal"):
    assert f"| 16 | 64 | {name}" in text


@pytest.mark.slow
def test_adapt_from_ar_runs_its_three_runs_and_records_exact_perplexities(tmp_path):
  if not os.path.exists(CORPUS):
    pytest.skip(f"tiny Shakespeare is not at {CORPUS}")
  out = tmp_path / "adapt.json"
  run_script("benchmarks/adapt_from_ar.py", f"--root={tmp_path / 'runs'}", f"--out={out}",
             "--ar_steps=2", "--adapt_steps=2", "--d_model=16", "--layers=2",
             "--seq_len=16", "--batch=2", "--eval_batches=1")
  runs = json.loads(out.read_text())["runs"]
  assert sorted(runs) == ["adapted", "ar", "scratch"]
  assert runs["adapted"]["strided_S4"]["label"] == "exact"
  assert runs["scratch"]["steps"] == 4


def test_the_adaptation_plot_draws_every_run_of_the_committed_results(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "plot_adapt_from_ar", os.path.join(ROOT, "benchmarks", "plot_adapt_from_ar.py"))
  plot = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plot)
  files = [os.path.join(ROOT, "benchmarks", "results", name)
           for name in ("adapt_from_ar.json", "adapt_from_ar_lr1e-3.json")]
  rows = plot.bars(files)
  assert [r[0].split("\n")[0] for r in rows] == ["AR", "ARMD adapted", "ARMD scratch",
                                                  "ARMD adapted"]
  assert rows[0][2] is None and all(r[2] > r[1] for r in rows[1:])  # strided costs more
  out = tmp_path / "plot.png"
  run_script("benchmarks/plot_adapt_from_ar.py", f"--results={','.join(files)}", f"--out={out}")
  assert out.stat().st_size > 10_000


@pytest.mark.slow
def test_recipes_scores_every_sbp_checkpoint_and_reuses_finished_points(tmp_path, capsys):
  corpus = tmp_path / "corpus.txt"  # a made-up corpus: this repository's own sources
  corpus.write_text("".join(open(os.path.join(ROOT, "armd_jax", name), encoding="utf-8").read()
                            for name in ("orders.py", "losses.py", "objectives.py")) * 4)
  out, root = tmp_path / "recipes", tmp_path / "runs"
  recipes = _load_benchmark("recipes")  # its main(argv) runs the command in this process
  argv = ["--smoke", f"--data={corpus}", f"--root={root}", "--runs=ar,base,sbp", f"--out={out}"]
  recipes.main(argv)
  assert "training sbp" in capsys.readouterr().out
  results = json.loads((tmp_path / "recipes.json").read_text())
  points = results["points"]
  assert list(points) == ["ar", "base", "sbp4", "sbp8"]  # the SBP lengths of --smoke
  assert [points[p]["step"] for p in ("sbp4", "sbp8")] == [4, 8]
  for name in ("base", "sbp4", "sbp8"):
    ppl = points[name]["perplexity"]
    assert set(ppl) == {"left_to_right", "strided S=4"}  # the strides of --smoke
    ratio = ppl["strided S=4"]["ppl"] / ppl["left_to_right"]["ppl"]
    assert abs(ppl["strided S=4"]["over_left_to_right"] - ratio) < 1e-9
    samplers = [row["sampler"] for row in points[name]["generation"]]  # those of --smoke
    assert samplers == ["sequential", "strided S=4", "confidence k=4 (max prob)"], samplers
  assert points["sbp4"]["perplexity"] != points["sbp8"]["perplexity"]  # two checkpoints
  (ar_row,) = points["ar"]["generation"]  # the evaluator's own sampler, for its speed
  assert ar_row["num_calls"] == 32 and ar_row["flops_per_sample"] > 0
  # the two-stream lower half costs ARMD FLOPs per train step over AR of the same size
  assert points["base"]["train_gflop_per_step"] > points["ar"]["train_gflop_per_step"] > 0
  assert points["base"]["train_step_seconds"] > 0
  recipes.main(argv)  # everything is reused: no training, no scoring
  second = capsys.readouterr().out
  assert "wrote" in second and "training" not in second and "scoring" not in second
  assert json.loads((tmp_path / "recipes.json").read_text())["points"] == points


def test_recipes_combines_seeds_into_means_and_deviations(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "recipes", os.path.join(ROOT, "benchmarks", "recipes.py"))
  recipes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipes)

  def point(l2r, ratio4, seq, s4):
    ppl = {"left_to_right": {"ppl": l2r}}
    ppl.update({f"strided S={s}": {"over_left_to_right": ratio4 if s == 4 else 1.0}
                for s in recipes.STRIDES})
    gen = [{"sampler": name, "gen_ppl": value} for name, value in (
        ("sequential", seq), ("strided S=4", s4), ("strided S=8", seq),
        ("confidence k=4 (max prob)", seq))]
    return {"perplexity": ppl, "generation": gen}

  for name, seed, values in (("recipes.json", 0, (6.0, 1.1, 10.0, 11.0)),
                             ("recipes_seed1.json", 1, (8.0, 1.3, 10.0, 13.0))):
    (tmp_path / name).write_text(json.dumps({"seed": seed, "points": {"base": point(*values)}}))
  recipes.combine_seeds(str(tmp_path))
  table = (tmp_path / "recipes_seeds.md").read_text()
  row = next(line for line in table.splitlines() if line.startswith("| base"))
  # l2r 6 and 8: mean 7, sd sqrt(2); S=4 ratio 1.1 and 1.3; S=4 gen vs sequential +10%, +30%
  assert row.startswith("| base | 7.000 ± 1.414 | 1.000 ± 0.000 | 1.200 ± 0.141 |"), row
  assert "+20.0% ± 14.1%" in row and "seeds [0, 1]" in table


def test_compare_tables_flops_per_sample_beside_calls_and_milliseconds():
  spec = importlib.util.spec_from_file_location(
      "compare", os.path.join(ROOT, "benchmarks", "compare.py"))
  compare = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(compare)
  row = {"run": "armd", "num_calls": 31, "gen_ppl": 5.0, "entropy_nats": 3.0, "mauve": 0.5,
         "seconds_per_sample": 0.25}
  results = {"mode": "smoke", "size": compare.SIZES["smoke"], "device": "cpu",
             "wall_seconds": 60.0, "runs": {}, "evaluator": "ar",
             "generation": [dict(row, sampler="strided S=4", flops_per_sample=2.5e8),
                            dict(row, sampler="confidence k=8 (max prob)",
                                 flops_per_sample=4.0e9)]}
  lines = compare.markdown(results).splitlines()
  header = next(line for line in lines if line.startswith("| run | sampler"))
  cells = [c.strip() for c in header.strip("|").split("|")]
  assert cells[2] == "network calls" and cells[-2:] == ["ms / sample", "GFLOP / sample"]
  table = [line for line in lines if line.startswith("| armd |")]
  assert [line.rstrip(" |").rsplit("| ", 1)[1] for line in table] == ["0.25", "4.00"]
  results["generation"] = results["generation"][:1]  # below 1 GFLOP: MFLOP
  table = compare.markdown(results)
  assert "| ms / sample | MFLOP / sample |" in table and "| 250.0 |" in table


def test_strided_gap_puts_an_excess_at_stream_starts_where_it_is():
  gap_lib = _load_benchmark("strided_gap")
  l2r = np.zeros((3, 16))
  strided = l2r.copy()
  strided[:, [4, 8, 12]] = 1.0  # one nat at the start of streams 2..4 (S = 4, N = 16)
  gap = gap_lib.gap_by_offset(l2r, strided, streams=4, head=1)
  assert gap["excess_nats_per_sequence"] == pytest.approx(3.0)
  assert gap["share_in_first_1_offsets"] == pytest.approx(1.0)
  assert gap["excess_by_offset_later_streams"] == pytest.approx([1.0, 0.0, 0.0, 0.0])
  assert gap["ppl_ratio"] == pytest.approx(np.exp(3.0 / 16))
  assert gap_lib.extrapolate(gap, [64])["64"] == pytest.approx(np.exp(3.0 / 64))


def test_strided_gap_of_a_trained_run_is_the_exact_strided_perplexity_ratio(tiny_workdir,
                                                                           tmp_path):
  from armd_jax import eval as ev  # pylint: disable=import-outside-toplevel
  from armd_jax import train  # pylint: disable=import-outside-toplevel
  gap_lib = _load_benchmark("strided_gap")
  out = tmp_path / "gap.json"
  gap_lib.main([f"--workdir={tiny_workdir}", "--streams=4", "--batches=2", f"--out={out}"])
  gap = json.loads(out.read_text())["gaps"]["S=4"]
  trained = train.load_trained(tiny_workdir)
  compare = _load_benchmark("compare")

  def ppl(order):
    return ev.evaluate_perplexity(trained.model, trained.params,
                                  compare.heldout_batches(trained, tiny_workdir), order=order,
                                  max_batches=2).ppl
  ratio = ppl(ev.EvalOrder("strided", streams=4)) / ppl(ev.EvalOrder("left_to_right"))
  assert gap["ppl_ratio"] == pytest.approx(ratio, rel=1e-4)
