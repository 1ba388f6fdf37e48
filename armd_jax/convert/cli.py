"""`python -m armd_jax.convert export|import ...` (the commands: the package doc)."""

from __future__ import annotations

import sys

from armd_jax.convert.pretrained import export
from armd_jax.convert.workdir import import_hf


def main(argv=None) -> int:
  """`python -m armd_jax.convert export|import ...` (see the package doc); exit status."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m armd_jax.convert",
                                   description=sys.modules[__package__].__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="a workdir's parameters as safetensors + config.json")
  ex.add_argument("--workdir", required=True)
  ex.add_argument("--out", required=True)
  ex.add_argument("--raw", action="store_true", help="the raw parameters, not the EMA")
  im = sub.add_parser("import", help="a Hugging Face GPT-2 / Llama folder as a workdir")
  im.add_argument("--hf_dir", required=True)
  im.add_argument("--kind", required=True, choices=("ar", "armd"))
  im.add_argument("--workdir", required=True)
  im.add_argument("--seed", type=int, default=0, help="init of ARMD-only parameters")
  im.add_argument("--bos_token_id", type=int, default=None,
                  help="start-row token when config.json has no bos_token_id")
  args = parser.parse_args(argv)
  try:
    if args.command == "export":
      print(f"wrote {export(args.workdir, args.out, args.raw)}", flush=True)
    else:
      import_hf(args.hf_dir, args.kind, args.workdir, args.seed, args.bos_token_id)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, ValueError) else 1
  return 0
