"""`python -m armd_jax.convert export|import ...` (`armd_jax.convert.cli`)."""

import sys

from armd_jax.convert.cli import main

if __name__ == "__main__":
  sys.exit(main())
