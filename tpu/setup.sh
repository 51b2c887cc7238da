#!/usr/bin/env bash
# Install llama_jax on every worker of a TPU VM: get the code, make a virtual environment with uv
# (Python --python, default 3.12, downloaded by uv if the image lacks it), pip install -e '.[tpu]'.
# Usage: tpu/setup.sh --name N --zone Z [--repo URL [--ref REF] | --source DIR] [--dir REMOTE_DIR]
#                     [--python VERSION] [--slices S] [--project P] [--dry-run]
# --repo: git clone URL on each worker and check out REF (default main).
# --source: copy a local directory (default: this checkout) without .git, .venv, runs and caches.
# --dir: where the code goes on the workers, relative to the home directory (default llama_jax).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO="" REF="" SOURCE="" PYTHON=3.12
while (($#)); do
  if [[ $1 == --*=* ]]; then set -- "${1%%=*}" "${1#*=}" "${@:2}"; fi
  case $1 in
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --source) need_value "$@"; SOURCE=$2; shift 2 ;;
    --dir) need_value "$@"; CODE_DIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    *) parse_common "$@"; shift "$SHIFT" ;;
  esac
done
require "$NAME" --name
require "$ZONE" --zone
if [[ -n $REPO && -n $SOURCE ]]; then
  die "pass --repo or --source, not both"
fi
if [[ -n $REF && -z $REPO ]]; then
  die "--ref needs --repo"
fi

dir=$(quote "$CODE_DIR")
if [[ -n $REPO ]]; then
  get_code="if [ ! -d $dir/.git ]; then git clone -q $(quote "$REPO") $dir; fi"
  get_code+=" && git -C $dir fetch -q origin $(quote "${REF:-main}")"
  get_code+=" && git -C $dir checkout -q --detach FETCH_HEAD"
else
  SOURCE=${SOURCE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
  if [[ ! -f $SOURCE/setup.cfg && ! -f $SOURCE/pyproject.toml ]]; then
    die "--source $SOURCE is not a Python project"
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  tarball=$tmp/llama_jax-src.tar.gz
  run tar -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./runs \
    --exclude=__pycache__ --exclude='*.egg-info' -C "$SOURCE" .
  for node in $(nodes); do
    tpu_gcloud tpu-vm scp "$tarball" "$node:llama_jax-src.tar.gz" --worker=all
  done
  get_code="mkdir -p $dir && tar -xzf llama_jax-src.tar.gz -C $dir && rm llama_jax-src.tar.gz"
fi

# uv from PyPI into ~/.local; PIP_BREAK_SYSTEM_PACKAGES lets a --user install through on images
# whose system Python is marked externally managed.
uv="\$HOME/.local/bin/uv"
install="PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user -U uv"
install+=" && $uv venv -q --allow-existing --python $(quote "$PYTHON") $dir/.venv"
install+=" && $uv pip install -q --python $dir/.venv/bin/python -e $(quote "${CODE_DIR}[tpu]")"
install+=" && echo \"\$(hostname): installed in $dir\""
tpu_ssh all "set -e; $get_code && $install"
