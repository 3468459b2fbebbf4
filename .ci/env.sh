#!/usr/bin/env bash
# Source me: builds (or reuses) the project's virtual environment and activates it.
#
# The environment is cached under ${AVALANCHE_TSN_CACHE:-~/.cache/avalanche-tsn}, keyed on the
# hash of pyproject.toml and the constraints file (the torch versions it pins), comment lines
# left out, so nothing is downloaded again unless the dependencies change.
# AVALANCHE_TSN_CONSTRAINTS picks the constraints file: .ci/constraints.txt (default, the
# oldest end of the torch range) or .ci/constraints-newest.txt (the newest end); .ci/run tests
# both.
# It holds the dependencies only: the code is this checkout's, put on PYTHONPATH here, so
# two clones share the environment without pointing it at each other's code.
# PYTHON picks the interpreter that creates it (default: python3, 3.10 or newer).
# First run: about 3 GB of wheels are downloaded (PyPI's torch comes with its CUDA libraries,
# also on CPU-only machines) and the environment takes about 6.5 GB; 5 to 10 minutes.
# Later runs print nothing unless something is wrong.
set -euo pipefail
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
_py=${PYTHON:-python3}
_constraints=${AVALANCHE_TSN_CONSTRAINTS:-$_root/.ci/constraints.txt}
if [ ! -f "$_constraints" ]; then
    echo "AVALANCHE_TSN_CONSTRAINTS: no such file: $_constraints" >&2
    return 1 2>/dev/null || exit 1
fi
# comment lines do not count: editing a comment must not rebuild a 6 GB environment
_key=$(cat "$_root/pyproject.toml" "$_constraints" | grep -v '^[[:space:]]*#' | sha256sum | cut -c1-16)
_cache=${AVALANCHE_TSN_CACHE:-$HOME/.cache/avalanche-tsn}
_venv="$_cache/venv-$_key"

# The machine's pip config points at a local CPU-only torch wheel that torchvision from PyPI
# cannot load against (torchvision::nms missing); take torch and torchvision from PyPI only.
export PIP_FIND_LINKS=
if [ ! -f "$_venv/.complete" ]; then
    echo "avalanche-tsn: building $_venv (first run: ~3 GB of downloads, 5-10 minutes)" >&2
    rm -rf "$_venv"
    mkdir -p "$_cache"
    "$_py" -m venv "$_venv"
    "$_venv/bin/python" -m pip install -q --upgrade pip
    # the dependencies (and the dev tools) of pyproject.toml, without the project itself
    "$_venv/bin/python" -m pip install -q -c "$_constraints" -e "$_root[dev]"
    "$_venv/bin/python" -m pip uninstall -q -y avalanche-tsn
    touch "$_venv/.complete"
fi
# An environment made before it held the dependencies only has the project installed
# (editable, pointing at whichever clone installed it last): take it out.
if compgen -G "$_venv/lib/python3*/site-packages/avalanche_tsn-*.dist-info" >/dev/null; then
    "$_venv/bin/python" -m pip uninstall -q -y avalanche-tsn >/dev/null 2>&1 || true
fi
export PYTHONPATH="$_root${PYTHONPATH:+:$PYTHONPATH}"
# This checkout's code must be what loads, and torchvision must load against its torch.
_check='import os, avalanche_tsn, torchvision; from torchvision.ops import nms
print(os.path.dirname(os.path.dirname(os.path.realpath(avalanche_tsn.__file__))))'
_found=$(cd / && "$_venv/bin/python" -c "$_check" 2>/dev/null || true)
if [ "$_found" != "$_root" ]; then
    echo "avalanche_tsn or torchvision does not load from $_root in $_venv; delete it and retry" >&2
    exit 1
fi
# shellcheck disable=SC1091
source "$_venv/bin/activate"
