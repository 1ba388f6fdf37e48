"""The baselines train through the same loop, checkpoints and commands as ARMD; the
evaluate command labels what it measures."""

import importlib.util
import json
import math
import os

import pytest

from armd_jax import evaluate, train
from conftest import alarming_lines, run_as_user, tiny_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(kind, steps=20):
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.kind = kind
  config.train.num_steps = steps
  config.train.eval_every = 0
  config.train.checkpoint_every = steps
  return config


def test_an_armd_workdir_reports_the_trainers_own_final_heldout_nll(tiny_run):
  """The evaluate library call on the shared trained `tiny` workdir: the default order of
  an ARMD model is left-to-right and exact, and over the trainer's eval batches it gives
  the NLL the trainer's final evaluation logged (same EMA params, same batches)."""
  results = evaluate.evaluate_workdir(
      tiny_run.workdir, max_batches=tiny_run_config().eval.num_batches, log=lambda _: None)
  assert results["step"] == 60 and results["model_kind"] == "armd"
  heldout = results["heldout"]
  assert heldout["label"] == "exact" and heldout["order"] == "left_to_right"
  assert heldout["num_tokens"] == tiny_run.final["eval/num_tokens"]
  assert heldout["nll"] == pytest.approx(tiny_run.final["eval/nll"], rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Tiny runs of the AR (20 steps) and MDLM (60 steps: its bound starts above ln V)."""
  out = {}
  for kind, steps in (("ar", 20), ("mdlm", 60)):
    workdir = str(tmp_path_factory.mktemp(kind))
    final = train.train_and_evaluate(tiny(kind, steps), workdir)
    out[kind] = (workdir, final)
  return out


@pytest.mark.slow  # trains the two baselines (the `runs` fixture)
@pytest.mark.parametrize("kind", ["ar", "mdlm"])
def test_baselines_train_with_the_shared_loop_and_lower_their_loss(runs, kind):
  workdir, final = runs[kind]
  # ln 259 is the NLL (and the ELBO) of a uniform byte model.
  assert math.isfinite(final["eval/nll"]) and final["eval/nll"] < math.log(259)
  trained = train.load_trained(workdir)
  assert trained.model_config.kind == kind and trained.step == (20 if kind == "ar" else 60)


@pytest.mark.slow  # trains the two baselines (the `runs` fixture)
def test_ar_workdir_reports_exact_perplexity_and_scores_its_samples(runs, tmp_path):
  workdir, _ = runs["ar"]
  text = tmp_path / "book.txt"
  text.write_text("To be, or not to be, that is the question.\n" * 4)
  results = evaluate.evaluate_workdir(
      workdir, max_batches=2, zero_shot=["text"], zero_shot_files={"text": [str(text)]},
      gen_samples=2, gen_length=16, log=lambda _: None)
  assert results["heldout"]["label"] == "exact"
  assert results["heldout"]["order"] == "left_to_right"
  assert results["zero_shot/text"]["label"] == "exact"
  gen = results["generative"]
  assert "the generator itself" in gen["evaluator"] and math.isfinite(gen["gen_ppl"])
  assert gen["num_calls"] == 16


@pytest.mark.slow  # trains the two baselines (the `runs` fixture)
def test_mdlm_workdir_reports_a_bound_and_is_scored_by_the_ar_evaluator(runs):
  (workdir, _), (ar_workdir, _) = runs["mdlm"], runs["ar"]
  results = evaluate.evaluate_workdir(workdir, max_batches=2, gen_samples=2, gen_length=16,
                                      gen_num_steps=8, evaluator=ar_workdir,
                                      log=lambda _: None)
  assert results["heldout"]["label"] == "bound" and results["heldout"]["order"] == "elbo"
  assert ar_workdir in results["generative"]["evaluator"]
  assert results["generative"]["num_calls"] <= 8
  with pytest.raises(ValueError, match="evaluator"):
    evaluate.evaluate_workdir(workdir, heldout=False, gen_samples=2, gen_length=16,
                              log=lambda _: None)
  with pytest.raises(ValueError, match="cannot be evaluated"):
    evaluate.evaluate_workdir(workdir, order="left_to_right", log=lambda _: None)


@pytest.mark.slow  # trains the two baselines (the `runs` fixture)
def test_the_sample_command_generates_from_both_baselines(runs):
  from armd_jax import sample as sample_cmd  # pylint: disable=import-outside-toplevel
  for kind in ("ar", "mdlm"):
    result = sample_cmd.sample_from_workdir(runs[kind][0], num_samples=2, length=16,
                                            warmup=False)
    assert result.tokens.shape == (2, 16) and len(result.texts) == 2


@pytest.mark.slow  # trains the two baselines (the `runs` fixture)
def test_the_evaluate_command_prints_labels_and_writes_json_and_no_warning_lines(runs, tmp_path):
  output = tmp_path / "out.json"
  proc = run_as_user("armd_jax.evaluate", f"--workdir={runs['mdlm'][0]}", "--max_batches=1",
                     f"--output={output}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  alarming = alarming_lines(proc.stderr)  # JAX_PLATFORMS unset, libtpu installed
  assert not alarming, "the evaluate command printed:\n" + "\n".join(alarming)
  assert "bound" in proc.stdout and "elbo" in proc.stdout
  assert json.loads(output.read_text())["heldout"]["label"] == "bound"
