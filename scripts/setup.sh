#!/usr/bin/env bash
# Create (or update) the project's virtual environment with pinned versions.
#   ORGANMTL_VENV       venv folder (default: .venv in the repository)
#   ORGANMTL_DETECTRON2 "sal" (default: the PyPI wheel sal-detectron2's Python code, CPU, no _C)
#                       "official" (pip install from facebookresearch/detectron2 git; needs internet,
#                       a compiler and, for GPUs, CUDA)
# Idempotent: a stamp of the inputs makes a second run take a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ORGANMTL_VENV:-.venv}
D2=${ORGANMTL_DETECTRON2:-sal}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

# dciodvfy (Debian package dicom3tools), the DICOM validator the export tests run; its own check
# (on PATH or not), apart from the venv's stamp. Installed with apt-get as root (or sudo -n).
if ! command -v dciodvfy >/dev/null; then
  echo "[setup] dicom3tools (dciodvfy, for the export tests)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
  if ! { command -v apt-get >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
         $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dicom3tools \
           >/dev/null && command -v dciodvfy >/dev/null; }; then
    echo "[setup] error: dciodvfy missing and dicom3tools could not be installed (needs apt-get as root);" \
         "install dicom3tools and rerun" >&2
    exit 1
  fi
fi

stamp_inputs() { cat pyproject.toml requirements/*.txt scripts/setup.sh; echo "$D2"; }
want=$(stamp_inputs | sha256sum | cut -c1-16)
if [ -f "$VENV/.organmtl-setup" ] && [ "$(cat "$VENV/.organmtl-setup")" = "$want" ]; then
  exit 0
fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
echo "[setup] torch (from requirements/torch.txt)"
$PIP install -r requirements/torch.txt
echo "[setup] organmtl and its dependencies (pinned by requirements/constraints.txt)"
$PIP install -c requirements/constraints.txt -r requirements/detectron2-runtime.txt -e ".[test]"

SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$D2" = "official" ]; then
  echo "[setup] detectron2 from source (official route)"
  $PIP install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2'
  rm -f "$SITE/organmtl_detectron2_sal.pth"
else
  echo "[setup] detectron2 Python code from the sal-detectron2 wheel"
  D2DIR="$(cd "$VENV" && pwd)/detectron2-sal"
  if [ ! -f "$D2DIR/detectron2/__init__.py" ]; then
    tmp=$(mktemp -d)
    $PIP install --no-deps --only-binary=:all: --python-version 3.10 --implementation cp \
      --target "$tmp" -c requirements/constraints.txt sal-detectron2
    rm -rf "$D2DIR"; mkdir -p "$D2DIR"
    mv "$tmp/detectron2" "$D2DIR/"          # only the package, not the wheel's top-level tools/
    rm -rf "$tmp"
  fi
  echo "$D2DIR" > "$SITE/organmtl_detectron2_sal.pth"
fi
"$VENV/bin/organmtl" install-hooks
echo "$want" > "$VENV/.organmtl-setup"
echo "[setup] done in $(( $(date +%s) - start )) s; venv $(du -sh "$VENV" | cut -f1)"
