#!/usr/bin/env bash
# Follow the training log of one TPU VM worker (as tpu/launch.sh writes it); Ctrl-C to stop.
# Usage: tpu/watch.sh --name N --zone Z (--exp EXP | --workdir DIR | --logdir DIR) [--worker 0]
#                     [--lines 100] [--dir REMOTE_DIR] [--slices S [--slice 0]] [--project P] [--dry-run]
# The flags name the log as for tpu/launch.sh: LOGDIR (default WORKDIR/logs; WORKDIR default runs/EXP).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

EXP="" WORKDIR="" LOGDIR="" WORKER=0 LINES=100 SLICE=0
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --exp) need_value "$@"; EXP=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --logdir) need_value "$@"; LOGDIR=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --lines) need_value "$@"; LINES=$2; shift 2 ;;
    --slice) need_value "$@"; SLICE=$2; shift 2 ;;
    --dir) need_value "$@"; CODE_DIR=$2; shift 2 ;;
    *) parse_common "$@"; shift "$SHIFT" ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
if [[ -z $EXP && -z $WORKDIR && -z $LOGDIR ]]; then
  die "missing required flag --exp, --workdir or --logdir (see --help)"
fi
if [[ ! $LINES =~ ^[0-9]+$ ]]; then
  die "--lines needs a number, not $LINES"
fi
if [[ -z $LOGDIR ]]; then
  LOGDIR=$(default_logdir "${WORKDIR:-$(default_workdir "$EXP")}")
fi

if [[ ! $SLICE =~ ^[0-9]+$ ]] || ((SLICE >= SLICES)); then
  die "--slice must be a slice of the $SLICES (0 to $((SLICES - 1))), not $SLICE"
fi
node=$NAME
if ((SLICES > 1)); then
  node=$NAME-$SLICE
fi
tpu_gcloud tpu-vm ssh "$node" "--worker=$WORKER" --command "cd $(quote "$CODE_DIR") && tail -n $LINES -F $(quote "$LOGDIR")/worker-\$(hostname).log"
