#!/usr/bin/env bash
# Start training on every worker of a TPU VM, detached, each worker's stdout and stderr kept in
# LOGDIR/worker-HOSTNAME.log (LOGDIR default WORKDIR/logs), so that the ssh session can end.
# Usage: tpu/launch.sh --name N --zone Z --exp EXP [--workdir DIR] [--logdir DIR] [--dir REMOTE_DIR]
#                      [--slices S] [--project P] [--dry-run] [-- key=value ...]
# With --slices S, on every worker of every slice; the slices find each other through the
# environment Cloud TPU gives a multi-slice queued resource, and mesh.dcn (0: one per slice)
# splits the batch over them.
# Runs `python -m llama_jax.train --exp=EXP --workdir=DIR key=value ...` in the code directory
# REMOTE_DIR (default llama_jax, as tpu/setup.sh installs it); WORKDIR defaults to runs/EXP there.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EXP="" WORKDIR="" LOGDIR="" overrides=()
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --exp) need_value "$@"; EXP=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --logdir) need_value "$@"; LOGDIR=$2; shift 2 ;;
    --dir) need_value "$@"; CODE_DIR=$2; shift 2 ;;
    --) shift; overrides+=("$@"); break ;;
    -*) parse_common "$@"; shift "$SHIFT" ;;
    *) overrides+=("$1"); shift ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
require "$EXP" --exp
WORKDIR=${WORKDIR:-$(default_workdir "$EXP")}
LOGDIR=${LOGDIR:-$(default_logdir "$WORKDIR")}

train=(.venv/bin/python -m llama_jax.train "--exp=$EXP" "--workdir=$WORKDIR" "${overrides[@]}")
log="$(quote "$LOGDIR")/worker-\$(hostname).log"
command="set -e; cd $(quote "$CODE_DIR"); mkdir -p $(quote "$LOGDIR"); log=$log"
command+="; PYTHONUNBUFFERED=1 setsid nohup $(quote_all "${train[@]}") >\"\$log\" 2>&1 </dev/null &"
command+=" echo \"\$(hostname): started, log \$PWD/\$log\""
tpu_ssh all "$command"
