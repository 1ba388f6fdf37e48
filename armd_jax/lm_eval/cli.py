"""`python -m armd_jax.lm_eval`: workdirs on harness tasks (flags: `define_flags`).

`run` is the harness's own `simple_evaluate` with our `ArmdLM` and its `TaskManager`;
`main` prints the results table and labels the likelihoods exact or bound.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

from lm_eval import utils as lm_eval_utils

from armd_jax.lm_eval.model import GENERATIONS, SCORING_ORDERS, ArmdLM


def run(workdir: str, tasks: Sequence[str], *, include_path: Optional[str] = None,
        include_defaults: bool = True, limit: Optional[float] = None,
        num_fewshot: Optional[int] = None, log_samples: bool = False,
        **settings) -> Dict[str, Any]:
  """Evaluates `workdir` on harness `tasks` with the harness's `simple_evaluate` and
  `TaskManager` (`include_path`: a folder of extra task YAMLs; `include_defaults=False`
  indexes only those, skipping the seconds spent on the built-in tasks). Returns the
  harness's results dict with an 'armd_jax' entry (`ArmdLM.describe`: exact or bound)."""
  from lm_eval import evaluator  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  lm = ArmdLM(workdir, **settings)
  results = evaluator.simple_evaluate(
      model=lm, tasks=list(tasks), task_manager=TaskManager(include_path=include_path,
                               include_defaults=include_defaults),
      limit=limit, num_fewshot=num_fewshot, log_samples=log_samples,
      batch_size=lm.settings.batch_size)
  if results is None:  # not rank 0 of a distributed harness run
    return {}
  results["armd_jax"] = lm.describe()
  return results


def main(argv) -> None:
  """The command (`absl.app.run(main)` after `define_flags()`): prints and writes results."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir or not f.tasks:
    raise SystemExit("--workdir and --tasks are required.")
  results = run(f.workdir, f.tasks, include_path=f.include_path,
                include_defaults=f.include_defaults, limit=f.limit,
                num_fewshot=f.num_fewshot, order=f.order, streams=f.streams,
                generation=f.generation, k=f.k, batch_size=f.batch_size,
                mdlm_samples=f.mdlm_samples, seed=f.seed, use_ema=f.use_ema)
  from lm_eval.utils import make_table  # pylint: disable=g-import-not-at-top
  described = results["armd_jax"]
  print(f"{described['workdir']} ({described['kind']}, step {described['step']}): "
        f"likelihoods are {described['likelihood'].upper()} ({described['order']}"
        f"{', S=%d' % described['streams'] if described['order'] == 'strided' else ''})")
  print(make_table(results))
  if f.output:
    from armd_jax import storage  # pylint: disable=g-import-not-at-top
    storage.path(f.output).write_text(json.dumps(
        results, indent=2, default=lm_eval_utils.handle_non_serializable))
    print(f"wrote {f.output}")


def define_flags() -> None:
  """The command's flags (defined only when run as a command)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Training workdir (a folder or gs:// URL).")
  flags.DEFINE_list("tasks", [], "Harness task names, e.g. lambada_openai,hellaswag.")
  flags.DEFINE_string("include_path", None, "Folder of extra task YAMLs.")
  flags.DEFINE_bool("include_defaults", True, "Also index the harness's built-in tasks.")
  flags.DEFINE_enum("order", "left_to_right", list(SCORING_ORDERS),
                    "ARMD scoring/generation order.")
  flags.DEFINE_integer("streams", 1, "S for --order=strided.")
  flags.DEFINE_enum("generation", "order", list(GENERATIONS),
                    "Decode in --order, or ARMD's confidence order.")
  flags.DEFINE_integer("k", 1, "Positions per call of --generation=confidence.")
  flags.DEFINE_float("limit", None, "Documents per task (a fraction if < 1).")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (the task's default if unset).")
  flags.DEFINE_integer("batch_size", 8, "Requests per network pass.")
  flags.DEFINE_integer("mdlm_samples", 32, "ELBO draws per request of an MDLM workdir.")
  flags.DEFINE_integer("seed", 0, "Seed of MDLM draws and sampled generations.")
  flags.DEFINE_bool("use_ema", True, "Use EMA parameters when present.")
  flags.DEFINE_string("output", None, "Write the harness's results (JSON) here.")
