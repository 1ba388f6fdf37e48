#!/usr/bin/env bash
# Train one config on a Cloud TPU VM slice: create the slice, copy this checkout to every
# worker and install it, run the training command on all workers at once
# (`--worker=all`, each process calls jax.distributed.initialize(), which finds its peers
# from the TPU metadata), stream their logs here, then delete the slice.
#
# Usage:
#   launch/tpu_vm.sh --zone=ZONE --config=configs/owt_small.py --workdir=gs://BUCKET/run \
#       [--name=NAME] [--project=PROJECT] [--accelerator_type=v5litepod-64] \
#       [--version=RUNTIME] [--extras=tpu,hf] [--keep] [--dry_run] [--config.x=y ...]
# --dry_run prints every command (gcloud, git, ...) without running any.
# --keep leaves the slice up afterwards (delete it yourself: the printed delete command).
# The workdir must be storage every worker reads and writes (a gs:// bucket).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "${here}/common.sh"

name="armd-${USER:-run}"
zone="${TPU_ZONE:-}"
project="${TPU_PROJECT:-}"
accelerator_type="v5litepod-64"
version=""
extras="tpu,hf"
config=""
workdir=""
keep=0
parse_args name zone project accelerator_type version extras -- "$@"
[[ -n "${zone}" ]] || die "--zone (or TPU_ZONE) is required"
if [[ -z "${version}" ]]; then  # the TPU VM software image of the chip generation
  case "${accelerator_type}" in
    v5litepod-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi
gcloud_where=(--zone="${zone}")
[[ -z "${project}" ]] || gcloud_where+=(--project="${project}")
train="$(train_command "${config}" "${workdir}" "${overrides[@]+"${overrides[@]}"}")"
archive="/tmp/${name}-src.tar.gz"

cd "${here}/.."
run gcloud compute tpus tpu-vm create "${name}" "${gcloud_where[@]}" \
  --accelerator-type="${accelerator_type}" --version="${version}"
if [[ "${keep}" == 1 ]]; then
  echo "the slice stays up; delete it with: gcloud compute tpus tpu-vm delete ${name} ${gcloud_where[*]} --quiet"
else
  cleanup() { run gcloud compute tpus tpu-vm delete "${name}" "${gcloud_where[@]}" --quiet; }
  trap cleanup EXIT
fi
run git archive --format=tar.gz --output="${archive}" HEAD
run gcloud compute tpus tpu-vm scp "${archive}" "${name}:armd-src.tar.gz" "${gcloud_where[@]}" \
  --worker=all
run gcloud compute tpus tpu-vm ssh "${name}" "${gcloud_where[@]}" --worker=all \
  --command="mkdir -p ~/armd-jax && tar -xzf ~/armd-src.tar.gz -C ~/armd-jax && cd ~/armd-jax && pip install -q -e \".[${extras}]\""
run gcloud compute tpus tpu-vm ssh "${name}" "${gcloud_where[@]}" --worker=all \
  --command="cd ~/armd-jax && ${train} 2>&1 | tee ~/train.log"
