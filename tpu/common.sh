# shellcheck shell=bash disable=SC2034  # the variables set here are read by the scripts
# Shared helpers for the tpu/*.sh scripts; sourced, not run.
# Provides: the common flags --name, --zone, --project, --slices, --dry-run, --help (parse_common);
# die (one-line error, exit 2); quote (shell-quote one word); run (print or execute a command);
# tpu_gcloud (gcloud compute tpus ... with --zone and --project appended); nodes; tpu_ssh.
# A multi-slice pod (--slices N > 1) is one queued resource NAME whose TPU VMs, one per slice,
# are NAME-0 ... NAME-(N-1); the scripts act on every one of them.
# Every loop over the flags first splits --flag=value into --flag value.

NAME="" ZONE="" PROJECT="" DRY_RUN=0 SHIFT=0 SLICES=1
CODE_DIR=llama_jax  # where the code goes on the workers (relative to home); --dir in some scripts
PROG=${0##*/}

die() {
  echo "$PROG: error: $*" >&2
  exit 2
}

# usage: the running script's header comment, from its "Usage:" line on.
usage() {
  sed -n '/^# Usage:/,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

# quote WORD: WORD as one shell word, single-quoted unless it only holds safe characters.
quote() {
  if [[ -n $1 && $1 != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_all WORD...: the words shell-quoted and joined by spaces.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD...: with --dry-run, print the command on one line, shell-quoted; otherwise run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    "$@"
  fi
}

# tpu_gcloud ARGS...: run `gcloud compute tpus ARGS --zone ZONE [--project PROJECT]`.
tpu_gcloud() {
  local extra=(--zone "$ZONE")
  if [[ -n $PROJECT ]]; then
    extra+=(--project "$PROJECT")
  fi
  run gcloud compute tpus "$@" "${extra[@]}"
}

# need_value FLAG [VALUE...]: die unless FLAG is followed by a value.
need_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
}

# parse_common ARGS...: consume one common flag from ARGS (setting SHIFT to the number of
# words used) or die on an unknown flag.
parse_common() {
  case $1 in
    --name) need_value "$@"; NAME=$2; SHIFT=2 ;;
    --zone) need_value "$@"; ZONE=$2; SHIFT=2 ;;
    --project) need_value "$@"; PROJECT=$2; SHIFT=2 ;;
    --slices)
      need_value "$@"
      if [[ ! $2 =~ ^[1-9][0-9]*$ ]]; then
        die "--slices needs a positive number, not $2"
      fi
      SLICES=$2; SHIFT=2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown flag: $1 (see --help)" ;;
  esac
}

# require VALUE FLAG: die unless the required FLAG was given (VALUE non-empty).
require() {
  if [[ -z $1 ]]; then
    die "missing required flag $2 (see --help)"
  fi
}

# default_workdir EXP: the workdir train.py would use for EXP (runs/NAME, where NAME is EXP without
# a directory and .py suffix), relative to the code directory on the workers.
default_workdir() {
  local name=${1##*/}
  printf 'runs/%s' "${name%.py}"
}

# default_logdir WORKDIR: where the per-worker logs go (WORKDIR/logs).
default_logdir() {
  if [[ $1 == *://* ]]; then
    die "--workdir $1 is not a local path; pass --logdir for the worker logs"
  fi
  printf '%s/logs' "$1"
}

# nodes: the TPU VMs of NAME, one per line: NAME itself, or NAME-0 ... for --slices N > 1.
nodes() {
  if ((SLICES > 1)); then
    local i
    for ((i = 0; i < SLICES; i++)); do
      printf '%s-%d\n' "$NAME" "$i"
    done
  else
    printf '%s\n' "$NAME"
  fi
}

# tpu_ssh WORKER CMD: run the shell command CMD on the worker(s) WORKER (a number or all) of
# every TPU VM of NAME (each slice's, one after the other).
tpu_ssh() {
  local node
  for node in $(nodes); do
    tpu_gcloud tpu-vm ssh "$node" "--worker=$1" --command "$2"
  done
}
