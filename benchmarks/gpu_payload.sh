#!/usr/bin/env bash
# The payload of the GPU proof run (docs/scaling.md, "A GPU proof run"), built under .gpu_payload/ (git-ignored):
#   w1/    SimpleITK's cp312 manylinux wheel alone (50 MiB: it fills one call's 64 MiB carry by itself)
#   w2/    every other package the bare GPU machine lacks (cp312 manylinux or pure-Python wheels, pinned as in
#          requirements/constraints.txt; the sdist-only ones built here with pip wheel), organmtl's own wheel
#          (built from this working tree) and detectron2's Python code (sal-detectron2, as scripts/setup.sh uses it)
#   work/  the files of the prepared data that the run reads (gpu_proof.py prepare; run it first), the
#          landmark dataset apart in work_lm/
# and prints what each device call carries against the 64 MiB limit.
#
#   bash benchmarks/gpu_payload.sh                 # wheels + organmtl wheel + data (prepare must have run)
#   WORK=/tmp/gp bash benchmarks/gpu_payload.sh     # prepared data elsewhere (default .gpu_payload/prepared)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
P=.gpu_payload
WORK=${WORK:-$P/prepared}
mkdir -p "$P/w1" "$P/w2"

pin() {   # NAME -> NAME==VERSION from the constraints file (case- and -/_-insensitive)
  local v
  v=$(grep -i -E "^$(echo "$1" | sed 's/[-_]/[-_]/g')==" requirements/constraints.txt | head -1)
  [ -n "$v" ] || { echo "gpu_payload: $1 is not pinned in requirements/constraints.txt" >&2; exit 2; }
  echo "$v"
}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {   # DIR NAME...: binary cp312 wheels, no dependencies (each one is listed)
  local dir=$1; shift
  for name in "$@"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$dir" "$(pin "$name")"
  done
}

# missing on the GPU image (docs/scaling.md lists what it has); imported by nnUNetv2_train/_predict with
# organmtl's trainers, and by train_net.py. Not carried: pydicom, highdicom, monai, nilearn, imagecodecs
# (nothing the run imports needs them), and whatever the image already has (torch, numpy, scipy, ...).
download "$P/w1" simpleitk
download "$P/w2" nnunetv2 batchgenerators batchgeneratorsv2 dynamic_network_architectures blosc2 ndindex numexpr \
  connected-components-3d nibabel pycocotools omegaconf termcolor yacs
for name in acvl_utils fvcore iopath antlr4-python3-runtime; do       # sdists only on PyPI (pure Python)
  ls "$P/w2"/$(echo "$name" | tr - _)-*.whl >/dev/null 2>&1 || "$PY" -m pip wheel -q --no-deps -w "$P/w2" "$(pin "$name")"
done
rm -f "$P"/w2/organmtl-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$P/w2" .
D2=.venv/detectron2-sal
[ -f "$D2/detectron2/__init__.py" ] || { echo "gpu_payload: $D2/detectron2 missing (run scripts/setup.sh)" >&2; exit 2; }
tar czf "$P/w2/detectron2-sal.tar.gz" -C "$D2" --exclude='*.so' --exclude=__pycache__ detectron2

# the prepared data: only what nnUNetv2_train/_predict and train_net.py read. The landmark dataset (6 input
# channels, 44 MiB) goes into its own folder work_lm/ (a third call: see docs/scaling.md); the manifest in
# work/ points at it as ../work_lm/...
if [ -f "$WORK/manifest.json" ]; then
  rm -rf "$P/work" "$P/work_lm"
  "$PY" - "$WORK" "$P/work" "$P/work_lm" <<'EOF'
import json, shutil, sys
from pathlib import Path
src, dst, dst_lm = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), Path(sys.argv[3])
manifest = json.loads((src / "manifest.json").read_text())
assert all(not Path(d[k]).is_absolute() for d in manifest["datasets"].values() for k in ("raw_root", "preprocessed_root")), \
    "manifest paths outside the prepared folder"
def copy(rel, to):
    a, b = src / rel, to / rel
    b.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if a.is_dir() else shutil.copy2)(a, b)
for kind, d in manifest["datasets"].items():
    to = dst_lm if kind == "landmark" else dst
    pre = Path(d["preprocessed_root"]) / d["name"]
    for name in ("dataset.json", "nnUNetPlans.json", "splits_final.json", "dataset_fingerprint.json", "gt_segmentations",
                 f"nnUNetPlans_{d['configuration']}"):
        copy(pre / name, to)
    copy(Path(d["raw_root"]) / d["name"] / "dataset.json", to)
    for image in d["predict_images"]:
        copy(image, to)
    if kind == "landmark":
        for k in ("raw_root", "preprocessed_root"):
            d[k] = str(Path("..") / dst_lm.name / d[k])
        d["predict_images"] = [str(Path("..") / dst_lm.name / i) for i in d["predict_images"]]
copy(manifest["coco"]["root"], dst)
(dst / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
EOF
else
  echo "gpu_payload: no $WORK/manifest.json: run '$PY benchmarks/gpu_proof.py prepare --work $WORK' first (data not packed)" >&2
fi

mib() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {printf "%.1f", s / 1048576}'; }
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f", $1 / 1048576}')
echo "working tree that travels with every call: $tree MiB"
echo "call 1 carries $P/w1:             $(mib "$P/w1") MiB (+ tree)"
echo "call 2 carries $P/w2 $P/work:  $(mib "$P/w2") + $(mib "$P/work") MiB (+ tree)"
echo "call 3 carries $P/work_lm:        $(mib "$P/work_lm") MiB (+ tree)"
echo "limit: 64 MiB per call, tree included"
