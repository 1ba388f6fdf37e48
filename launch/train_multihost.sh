#!/usr/bin/env bash
# Train one config on every host of a multi-host slice (TPU pod slice or GPU cluster).
# Run the same command on every host (e.g. `gcloud compute tpus tpu-vm ssh ... --worker=all
# --command=...` or `srun`); jax.distributed.initialize() finds the coordinator from the
# environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID). WORKDIR must be shared storage (e.g. gs://... or NFS) that every host
# reads and writes; each host feeds its own shard of the global batch.
# Usage: launch/train_multihost.sh CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.x=y ...]" >&2
  exit 2
fi
config="$1"; workdir="$2"; shift 2
cd "$(dirname "$0")/.."
exec python -m armd_jax.main --jax_distributed --config="${config}" --workdir="${workdir}" "$@"
