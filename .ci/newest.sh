#!/usr/bin/env bash
# The newest end of pyproject.toml's torch range: the default suite in an environment built
# with .ci/constraints-newest.txt (cached like the default one; .ci/run calls this last).
set -euo pipefail
cd "$(dirname "$0")/.."
AVALANCHE_TSN_CONSTRAINTS="$PWD/.ci/constraints-newest.txt" source .ci/env.sh
python -c "import torch, torchvision; print('newest end: torch', torch.__version__, '| torchvision', torchvision.__version__)"
python -m pytest -q
