#!/usr/bin/env bash
# Set up the environment (first run downloads torch) and run the embedded quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/env.sh
python examples/quickstart.py "$@"
