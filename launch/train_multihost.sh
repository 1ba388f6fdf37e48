#!/usr/bin/env bash
# Train one config on every host of a multi-host slice (TPU pod slice or GPU cluster).
# Run the same command on every host (e.g. `gcloud compute tpus tpu-vm ssh ... --worker=all
# --command=...` or `srun`); jax.distributed.initialize() finds the coordinator from the
# environment (TPU metadata, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID). WORKDIR must be a filesystem every host reads and writes (e.g. NFS or a
# mounted bucket); each host feeds its own shard of the global batch.
# Usage: launch/train_multihost.sh CONFIG WORKDIR [--config.x=y ...]
set -euo pipefail
exec "$(dirname "$0")/train_local.sh" "$@" --jax_distributed
