#!/usr/bin/env bash
# The newest end of pyproject.toml's torch range: build an environment with the newest torch
# and torchvision the range allows (no constraints) and run the default suite in it.
# Not part of .ci/run (a second ~3 GB environment); run it by hand before widening the range.
set -euo pipefail
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
_venv=${AVALANCHE_TSN_CACHE:-$HOME/.cache/avalanche-tsn}/venv-newest
export PIP_FIND_LINKS=
if [ ! -x "$_venv/bin/python" ]; then
    python3 -m venv "$_venv"
    "$_venv/bin/python" -m pip install -q --upgrade pip
fi
"$_venv/bin/python" -m pip install -q --upgrade -e "$_root[dev]"
"$_venv/bin/python" -m pip uninstall -q -y avalanche-tsn
export PYTHONPATH="$_root"
cd "$_root"
"$_venv/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, '| torchvision', torchvision.__version__)"
"$_venv/bin/python" -m pytest -q
