#!/usr/bin/env bash
# Train one config on a Cloud TPU VM slice, detached: the job outlives this script, and the
# slice is deleted only when you ask.
#
# Usage:
#   launch/tpu_vm.sh --zone=ZONE --config=configs/owt_small.py --workdir=gs://BUCKET/run \
#       [--name=NAME] [--project=PROJECT] [--accelerator_type=v5litepod-64] \
#       [--version=RUNTIME] [--extras=tpu,hf] [--delete_when_done [--poll_seconds=60]] \
#       [--dry_run] [--config.x=y ...]
#   launch/tpu_vm.sh --zone=ZONE [--name=NAME] --status       # job state on every worker
#   launch/tpu_vm.sh --zone=ZONE [--name=NAME] --logs [--worker=0]  # follow a worker's log
#   launch/tpu_vm.sh --zone=ZONE [--name=NAME] --stop [--delete]    # stop the job (then delete)
#   launch/tpu_vm.sh --zone=ZONE [--name=NAME] --delete       # delete the slice, no job running
#
# Launch: creates the slice unless it exists, copies this checkout (git HEAD) to every
# worker, installs it, and starts the training command on all workers at once (each
# process calls jax.distributed.initialize(), which finds its peers from the TPU metadata)
# as a detached job: `nohup setsid bash -c ... &` on every worker, so this script returns
# and the client may disconnect. Each worker keeps ~/armd-run/{pid,exit_code,train.log}
# (the log is appended to across restarts); when the workdir is gs://, every worker also
# copies its log to WORKDIR/logs/tpu_vm-<hostname>.log every 5 minutes and when the job
# ends. Running the same launch command again while the job runs reports it and starts
# nothing; once it has ended (finished, crashed, stopped), it starts the job again and the
# trainer resumes from its workdir.
# The slice is never deleted by a launch: --delete deletes it and refuses while a job runs
# (or while the workers cannot be asked); --stop --delete stops the job first;
# --delete_when_done makes the launch wait (polling every --poll_seconds) until the job has
# ended on every worker, then delete the slice (if this client goes away while waiting, the
# job goes on and the slice stays). --keep is accepted and changes nothing.
# --dry_run prints every command that would change something ('+ ' lines) without running
# it; the read-only questions (does the slice exist, is a job running: '? ' lines on
# stderr) still run, so a dry run takes the decisions a real run would.
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
worker=0
poll_seconds=60
status=0
logs=0
stop=0
delete=0
delete_when_done=0
run_args_optional=1  # only a launch needs --config and --workdir (checked below)
parse_args name zone project accelerator_type version extras worker poll_seconds \
  +status +logs +stop +delete +delete_when_done -- "$@"
[[ -n "${zone}" ]] || die "--zone (or TPU_ZONE) is required"
launch=1
[[ "${status}${logs}${stop}${delete}" == 0000 ]] || launch=0
if [[ "${launch}" == 1 ]]; then
  [[ -n "${config}" && -n "${workdir}" ]] || die "--config and --workdir are required to launch"
  # The workers get `git archive HEAD`: the config file must be committed there.
  git -C "${here}/.." cat-file -e "HEAD:${config%%:*}" 2> /dev/null \
    || die "--config=${config}: no such file committed in this checkout (the workers get git HEAD)"
elif [[ $(( status + logs + (stop || delete) )) != 1 || "${delete_when_done}" == 1 ]]; then
  die "give one of --status, --logs, --stop [--delete], --delete (--delete_when_done goes with a launch)"
fi
[[ "${poll_seconds}" =~ ^[0-9]+$ ]] || die "--poll_seconds=${poll_seconds} must be a number of seconds"
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
tpu=(gcloud compute tpus tpu-vm)
archive="/tmp/${name}-src.tar.gz"

# Shell run on the workers. `alive` is true while the job started by a launch runs: the pid
# it recorded is a live process whose command line is the job's (not a reused pid).
alive='alive() { pid=$(cat ~/armd-run/pid 2>/dev/null) && [ -n "$pid" ] && ps -ww -p "$pid" -o args= 2>/dev/null | grep -q armd_jax.main; }'
status_script="${alive}"'; if alive; then echo "armd-job: running (pid $pid) on $(hostname)"; elif [ -f ~/armd-run/exit_code ]; then echo "armd-job: ended (exit $(cat ~/armd-run/exit_code)) on $(hostname)"; else echo "armd-job: none on $(hostname)"; fi'
stop_script="${alive}"'; if alive; then kill -TERM -- "-$pid"; i=0; while alive && [ "$i" -lt 120 ]; do sleep 1; i=$((i + 1)); done; if alive; then kill -KILL -- "-$pid"; fi; echo stopped > ~/armd-run/exit_code; echo "armd-job: stopped on $(hostname)"; else echo "armd-job: none running on $(hostname)"; fi'

# The job one worker runs (detached): the training command, its output appended to the
# worker's log (and copied to the gs:// workdir), its exit status recorded.
job_script() {
  local train copy="" copy_last=""
  train="$(train_command "${config}" "${workdir}" "${overrides[@]+"${overrides[@]}"}")"
  if [[ "${workdir}" == gs://* ]]; then
    local dest
    dest="$(quote "${workdir%/}/logs/")"'tpu_vm-$(hostname).log'
    copy='( while sleep 300; do gcloud storage cp "$log" '"${dest}"' > /dev/null 2>&1; done ) & copier=$!; '
    copy_last='kill "$copier" 2> /dev/null; gcloud storage cp "$log" '"${dest}"' > /dev/null 2>&1; '
  fi
  printf '%s' 'cd ~/armd-jax || exit 1; log=~/armd-run/train.log; '\
'echo "== armd-job start $(date -u +%FT%TZ) on $(hostname)" >> "$log"; '"${copy}"\
"${train}"' >> "$log" 2>&1; rc=$?; '"${copy_last}"\
'echo "== armd-job exit $rc $(date -u +%FT%TZ)" >> "$log"; echo "$rc" > ~/armd-run/exit_code'
}

# Starts the job on a worker unless one runs there already.
start_script() {
  printf '%s' 'mkdir -p ~/armd-run && '"${alive}"'; if alive; then echo "armd-job: running (pid $pid) on $(hostname), not started again"; else rm -f ~/armd-run/exit_code; nohup setsid bash -c '"$(quote "$(job_script)")"' > /dev/null 2>&1 < /dev/null & echo "$!" > ~/armd-run/pid; echo "armd-job: started (pid $!) on $(hostname)"; fi'
}

slice_exists() {
  probe "${tpu[@]}" describe "${name}" "${gcloud_where[@]}" --format='value(state)' > /dev/null
}

# Prints 'running' (a job runs on some worker), 'idle' (every worker answered, none runs)
# or 'unknown' (the workers could not be asked); the workers' answers go to stderr.
job_state() {
  local out rc=0 answers
  out="$(probe "${tpu[@]}" ssh "${name}" "${gcloud_where[@]}" --worker=all \
    --command="${status_script}" 2>&1)" || rc=$?
  answers="$(grep -v '^? ' <<< "${out}" | grep 'armd-job: ' || true)"  # not the probe's echo
  [[ -z "${answers}" ]] || printf '%s\n' "${answers}" >&2
  if grep -q 'armd-job: running' <<< "${answers}"; then
    echo running
  elif [[ "${rc}" == 0 && -n "${answers}" ]]; then
    echo idle
  else
    printf '%s\n' "${out}" >&2
    echo unknown
  fi
}

start_job() {
  run git archive --format=tar.gz --output="${archive}" HEAD
  run "${tpu[@]}" scp "${archive}" "${name}:armd-src.tar.gz" "${gcloud_where[@]}" --worker=all
  run "${tpu[@]}" ssh "${name}" "${gcloud_where[@]}" --worker=all \
    --command="rm -rf ~/armd-jax && mkdir -p ~/armd-jax && tar -xzf ~/armd-src.tar.gz -C ~/armd-jax && cd ~/armd-jax && pip install -q -e \".[${extras}]\""
  run "${tpu[@]}" ssh "${name}" "${gcloud_where[@]}" --worker=all --command="$(start_script)"
}

delete_slice() {
  run "${tpu[@]}" delete "${name}" "${gcloud_where[@]}" --quiet
}

# Waits until the job has ended on every worker, then deletes the slice. Never deletes
# while a worker reports the job running or cannot be asked.
delete_when_ended() {
  local state
  while true; do
    if ! slice_exists 2> /dev/null; then
      echo "slice ${name} is gone; nothing to delete"
      return 0
    fi
    state="$(job_state)"
    [[ "${state}" != idle ]] || break
    sleep "${poll_seconds}"
  done
  echo "the job has ended on every worker of ${name}; deleting the slice"
  delete_slice
}

me="launch/tpu_vm.sh --zone=${zone}${project:+ --project=${project}} --name=${name}"
cd "${here}/.."
if [[ "${status}" == 1 ]]; then
  slice_exists || die "no slice ${name} in ${zone} (see the error above)"
  state="$(job_state)"
  echo "job on ${name}: ${state}"
elif [[ "${logs}" == 1 ]]; then
  run "${tpu[@]}" ssh "${name}" "${gcloud_where[@]}" --worker="${worker}" \
    --command="tail -n 200 -F ~/armd-run/train.log"
elif [[ "${stop}${delete}" != 00 ]]; then
  slice_exists || die "no slice ${name} in ${zone} (see the error above)"
  if [[ "${stop}" == 1 ]]; then
    run "${tpu[@]}" ssh "${name}" "${gcloud_where[@]}" --worker=all --command="${stop_script}"
  fi
  if [[ "${delete}" == 1 ]]; then
    if [[ "${stop}" == 1 && "${DRY_RUN}" == 1 ]]; then
      echo "dry run: the stop above did not run; a real run asks the workers again before deleting"
    else
      state="$(job_state)"
      case "${state}" in
        idle) ;;
        running) die "a job is still running on ${name}: not deleting the slice. Stop it first" \
                     "(${me} --stop --delete) or let it end (${me} --status)" ;;
        *) die "could not ask the workers of ${name} whether a job runs: not deleting the slice." \
               "If you know it is safe: gcloud compute tpus tpu-vm delete ${name} ${gcloud_where[*]} --quiet" ;;
      esac
    fi
    delete_slice
  fi
else
  started=0
  if slice_exists 2> /dev/null; then
    state="$(job_state)"
    case "${state}" in
      running) echo "a job is already running on ${name}: not starting a second one" ;;
      idle) start_job; started=1 ;;
      *) die "could not ask the workers of ${name} whether a job runs (see above): not starting one" ;;
    esac
  else
    run "${tpu[@]}" create "${name}" "${gcloud_where[@]}" \
      --accelerator-type="${accelerator_type}" --version="${version}"
    start_job
    started=1
  fi
  if [[ "${delete_when_done}" == 1 ]]; then
    if [[ "${DRY_RUN}" == 1 && "${started}" == 1 ]]; then
      echo "dry run: the job above did not start; a real run waits for it to end on every worker, then:"
      delete_slice
    else
      delete_when_ended
    fi
  else
    echo "the job runs detached on ${name} (the slice stays up). Follow it: ${me} --status" \
         "| --logs; stop it: ${me} --stop; delete the slice: ${me} --delete"
  fi
fi
