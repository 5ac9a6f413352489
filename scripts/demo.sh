#!/usr/bin/env bash
# Set up (or reuse) the virtual environment, then run the main job end to end on the demo data.
# Extra arguments go to `organmtl demo` (e.g. --out DIR, --epochs N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${ORGANMTL_VENV:-.venv}/bin/organmtl" demo "$@"
