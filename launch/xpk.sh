#!/usr/bin/env bash
# Train one config as a GKE workload with xpk (https://github.com/AI-Hypercomputer/xpk) on
# a cluster made beforehand with `xpk cluster create`. xpk builds a container from
# --base_image plus this checkout (installed with `pip install -e .[EXTRAS]`), runs the
# training command on every host of the slice(s), each process calling
# jax.distributed.initialize() (xpk sets the coordinator variables), waits for the
# workload to finish, and deletes it (unless --keep).
#
# Usage:
#   launch/xpk.sh --cluster=CLUSTER --config=configs/owt_small.py --workdir=gs://BUCKET/run \
#       [--workload=NAME] [--tpu_type=v5litepod-64] [--num_slices=1] [--project=P] \
#       [--zone=Z] [--base_image=us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest] \
#       [--extras=tpu,hf] [--keep] [--dry_run] [--config.x=y ...]
# --dry_run prints the xpk commands without running them. With --num_slices=N > 1 the
# training command gets --config.mesh.num_slices=N: the mesh (config.mesh.shape inside a
# slice, config.mesh.dcn_shape across slices, all slices on 'data' by default) is built
# for N slices and refused if the processes do not see N slices.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=launch/common.sh
source "${here}/common.sh"

cluster="${XPK_CLUSTER:-}"
workload="armd-${USER:-run}"
tpu_type="v5litepod-64"
num_slices=1
project="${XPK_PROJECT:-}"
zone="${XPK_ZONE:-}"
base_image="us-docker.pkg.dev/cloud-tpu-images/jax-ai-image/tpu:latest"
extras="tpu,hf"
config=""
workdir=""
keep=0
parse_args cluster workload tpu_type num_slices project zone base_image extras -- "$@"
[[ -n "${cluster}" ]] || die "--cluster (or XPK_CLUSTER) is required"
[[ "${num_slices}" =~ ^[1-9][0-9]*$ ]] || die "--num_slices=${num_slices} must be a positive integer"
if (( num_slices > 1 )); then
  for arg in "${overrides[@]+"${overrides[@]}"}"; do
    [[ "${arg}" != --config.mesh.num_slices=* || "${arg}" == "--config.mesh.num_slices=${num_slices}" ]] \
      || die "${arg} disagrees with --num_slices=${num_slices}"
  done
  overrides+=("--config.mesh.num_slices=${num_slices}")
fi
where=(--cluster="${cluster}")
[[ -z "${project}" ]] || where+=(--project="${project}")
[[ -z "${zone}" ]] || where+=(--zone="${zone}")
train="$(train_command "${config}" "${workdir}" "${overrides[@]+"${overrides[@]}"}")"

cd "${here}/.."  # xpk copies the current directory (the checkout) into the image
run xpk workload create "${where[@]}" --workload="${workload}" --tpu-type="${tpu_type}" \
  --num-slices="${num_slices}" --base-docker-image="${base_image}" \
  --command="pip install -q -e \".[${extras}]\" && ${train}"
run xpk workload list "${where[@]}" --wait-for-job-completion="${workload}"
if [[ "${keep}" != 1 ]]; then
  run xpk workload delete "${where[@]}" --workload="${workload}"
fi
