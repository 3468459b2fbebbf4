#!/usr/bin/env bash
# Source me: builds (or reuses) the project's virtual environment and activates it.
# The environment is cached under ~/.cache/avalanche-tsn, keyed on the hash of pyproject.toml,
# so torch is not downloaded again unless the dependencies change.
set -euo pipefail
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_py=${PYTHON:-python3}
_key=$(sha256sum "$_root/pyproject.toml" | cut -c1-16)
_cache=${AVALANCHE_TSN_CACHE:-$HOME/.cache/avalanche-tsn}
_venv="$_cache/venv-$_key"

# The machine's pip config points at a local CPU-only torch wheel that torchvision from PyPI
# cannot load against (torchvision::nms missing); take torch and torchvision from PyPI only.
export PIP_FIND_LINKS=
if [ ! -f "$_venv/.complete" ]; then
    rm -rf "$_venv"
    mkdir -p "$_cache"
    "$_py" -m venv "$_venv"
    "$_venv/bin/python" -m pip install --upgrade pip
    "$_venv/bin/python" -m pip install -e "$_root[dev]"
    touch "$_venv/.complete"
fi
# A cached environment must point at this checkout, wherever it was cloned.
"$_venv/bin/python" -m pip install --no-deps -q -e "$_root"
"$_venv/bin/python" -c "import torchvision; from torchvision.ops import nms" || {
    echo "torchvision does not load in $_venv; delete it and retry" >&2
    exit 1
}
# shellcheck disable=SC1091
source "$_venv/bin/activate"
