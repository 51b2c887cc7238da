#!/usr/bin/env bash
# Create a Cloud TPU VM, or with --queued a queued resource that Cloud TPU fills when capacity frees.
# Usage: tpu/create.sh --name N --zone Z --type v5p-128 [--version RUNTIME] [--queued] [--spot]
#                      [--slices S] [--project P] [--dry-run]
# --slices S > 1: a multi-slice pod, S slices of --type joined over the data-center network (a
# queued resource with S nodes, NAME-0 ... NAME-(S-1)); training splits the batch over them
# (mesh.dcn).
# The runtime version defaults from the type: v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
# v5e (v5litepod) v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

TYPE="" VERSION="" QUEUED=0 SPOT=0
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --type) need_value "$@"; TYPE=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    *) parse_common "$@"; shift "$SHIFT" ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
require "$TYPE" --type

if [[ -z $VERSION ]]; then
  case $TYPE in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for --type $TYPE; pass --version" ;;
  esac
fi

spot=()
if ((SPOT)); then
  spot=(--spot)
fi
if ((SLICES > 1)); then
  tpu_gcloud queued-resources create "$NAME" --node-count "$SLICES" --node-prefix "$NAME" \
    --accelerator-type "$TYPE" --runtime-version "$VERSION" "${spot[@]}"
elif ((QUEUED)); then
  tpu_gcloud queued-resources create "$NAME" --node-id "$NAME" \
    --accelerator-type "$TYPE" --runtime-version "$VERSION" "${spot[@]}"
else
  tpu_gcloud tpu-vm create "$NAME" --accelerator-type "$TYPE" --version "$VERSION" "${spot[@]}"
fi
