# Shared by the launch scripts (sourced, not run): argument helpers and --dry_run.
# `run CMD ARGS...` prints the command, shell-quoted (words needing it in '...'), on one line prefixed with '+ ',
# then runs it, unless DRY_RUN=1, when it only prints it (what --dry_run tests check).
# `probe CMD ARGS...` is for read-only questions (does the slice exist, is a job running):
# it prints the command prefixed with '? ' and runs it even with DRY_RUN=1, so a dry run
# takes the same decisions as a real one.

DRY_RUN=0

# One word for a shell command line: as is when safe, else in '...' quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%s' "${1@Q}"
  fi
}

run() {
  printf '+'
  local arg
  for arg in "$@"; do
    printf ' %s' "$(quote "${arg}")"
  done
  printf '\n'
  if [[ "${DRY_RUN}" != 1 ]]; then
    "$@"
  fi
}

probe() {
  printf '?' >&2
  local arg
  for arg in "$@"; do
    printf ' %s' "$(quote "${arg}")" >&2
  done
  printf '\n' >&2
  "$@"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# The training command every launcher runs on every host/process, with the config file,
# the workdir and any --config.* overrides (hyperparameters come only from configs).
train_command() {
  local config="$1" workdir="$2"; shift 2
  local cmd
  cmd="python -m armd_jax.main $(quote "--config=${config}") $(quote "--workdir=${workdir}") --jax_distributed"
  local arg
  for arg in "$@"; do
    [[ "${arg}" == --config.* ]] || die "only --config.<field>=<value> overrides may follow the options, got '${arg}'"
    cmd+=" $(quote "${arg}")"
  done
  printf '%s' "${cmd}"
}

# parse_args NAME... -- "$@": the launchers' shared options. Each --NAME=VALUE of the
# listed names sets the variable NAME (declare it, with its default, before the call); a
# name written +NAME is a switch: --NAME sets NAME=1. Also --config=, --workdir= (both
# required unless the caller set run_args_optional=1 and checks them itself), --keep
# (keep=1), --dry_run (DRY_RUN=1), and any --config.<field>=<value> overrides (collected
# in the array `overrides`). Anything else stops with an error naming it.
parse_args() {
  local names=(config workdir) switches=()
  while [[ "$1" != "--" ]]; do
    if [[ "$1" == +* ]]; then switches+=("${1#+}"); else names+=("$1"); fi
    shift
  done
  shift
  overrides=()
  local arg key
  for arg in "$@"; do
    case "${arg}" in
      --keep) keep=1 ;;
      --dry_run) DRY_RUN=1 ;;
      --config.*) overrides+=("${arg}") ;;
      --*=*)
        key="${arg%%=*}"
        key="${key#--}"
        [[ " ${names[*]} " == *" ${key} "* ]] || die "unknown argument '${arg}' (see the usage at the top of $0)"
        printf -v "${key}" '%s' "${arg#*=}" ;;
      --*)
        key="${arg#--}"
        [[ " ${switches[*]-} " == *" ${key} "* ]] || die "unknown argument '${arg}' (see the usage at the top of $0)"
        printf -v "${key}" '%s' 1 ;;
      *) die "unknown argument '${arg}' (see the usage at the top of $0)" ;;
    esac
  done
  [[ "${run_args_optional:-0}" == 1 || ( -n "${config}" && -n "${workdir}" ) ]] \
    || die "--config and --workdir are required"
}
