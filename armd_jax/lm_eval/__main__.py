"""`python -m armd_jax.lm_eval --workdir=DIR --tasks=...` (`armd_jax.lm_eval.cli`)."""

from absl import app

from armd_jax.lm_eval import cli

if __name__ == "__main__":
  cli.define_flags()
  app.run(cli.main)
