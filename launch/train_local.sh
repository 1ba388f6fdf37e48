#!/usr/bin/env bash
# Train one config on this machine (CPU, one GPU, or one TPU host).
# Usage: launch/train_local.sh CONFIG WORKDIR [--config.x=y ...]
# Example: launch/train_local.sh configs/quickstart.py /tmp/armd_quickstart
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
exec python -m armd_jax.main --config="${config}" --workdir="${workdir}" "$@"
