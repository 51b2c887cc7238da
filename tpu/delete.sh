#!/usr/bin/env bash
# Delete a Cloud TPU VM, or with --queued (or --slices S > 1) a queued resource and its TPU VMs.
# Usage: tpu/delete.sh --name N --zone Z [--queued] [--slices S] [--quiet] [--project P] [--dry-run]
# --quiet skips gcloud's confirmation prompt.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

QUEUED=0 QUIET=0
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --queued) QUEUED=1; shift ;;
    --quiet) QUIET=1; shift ;;
    *) parse_common "$@"; shift "$SHIFT" ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone

quiet=()
if ((QUIET)); then
  quiet=(--quiet)
fi
if ((QUEUED || SLICES > 1)); then
  # --force deletes the TPU VMs the queued resource holds, too.
  tpu_gcloud queued-resources delete "$NAME" --force "${quiet[@]}"
else
  tpu_gcloud tpu-vm delete "$NAME" "${quiet[@]}"
fi
