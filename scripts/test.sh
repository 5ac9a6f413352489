#!/usr/bin/env bash
# Set up (or reuse) the virtual environment, then run the whole test suite.
# Extra arguments go to pytest (e.g. -k converters, -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-0} nnUNet_def_n_proc=${nnUNet_def_n_proc:-1}
exec "${ORGANMTL_VENV:-.venv}/bin/python" -m pytest -p no:cacheprovider --durations=15 "$@"
