"""benchmarks/gpu_proof.py (the prepared GPU proof run, docs/scaling.md) at ``--device cpu --smoke``: the same
stock commands (``nnUNetv2_train`` / ``nnUNetv2_predict`` of every nnU-Net family, ``train_net.py`` of
HMR-Net and Mask R-CNN) at 1 iteration on the session's tiny-planned demo data, so that the script does not rot
while no GPU is at hand. Asserts on the JSON it writes. Two families at a time (``--jobs 2``, one thread each):
the run starts 25 processes, each importing torch and nnU-Net (``GPU_PROOF_TEST_JOBS=1``: one at a time, for a
one-core slot)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ONE_THREAD, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def _gpu_proof():
    spec = importlib.util.spec_from_file_location("gpu_proof", REPO / "benchmarks" / "gpu_proof.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _private_copy(ds, root: Path) -> Path:
    """The session dataset's preprocessed folder copied (the fixtures are read-only) with one validation case."""
    pre = root / "pre"
    shutil.copytree(ds.preprocessed, pre / ds.name)
    return pre


def test_smoke_run_of_every_family_writes_finite_losses_and_predictions(tmp_path, han_dataset, abdomen_dataset,
                                                                        spine_coco, monkeypatch):
    gp = _gpu_proof()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    datasets = {}
    for kind, ds in (("plain", han_dataset), ("landmark", abdomen_dataset)):
        pre = _private_copy(ds, tmp_path / kind)
        gp.one_validation_case(pre / ds.name)
        datasets[kind] = gp.dataset_entry(ds.dataset_id, ds.name, ds.raw.parent, pre, "3d_tiny")
    work = tmp_path / "work"
    work.mkdir()
    gp.write_manifest(work, datasets, {"root": str(spine_coco), "name": "gpu_proof_smoke_spine"}, smoke=True)

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_proof.py"), "run", "--work", str(work),
                        "--device", "cpu", "--smoke", "--jobs", os.environ.get("GPU_PROOF_TEST_JOBS", "2")],
                       capture_output=True, text=True, timeout=1500,
                       env={**os.environ, **ONE_THREAD})
    result = json.loads((work / "run_cpu" / "gpu_proof_cpu_smoke.json").read_text())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = result["rows"]
    assert set(rows) == set(gp.FAMILIES) and result["failed"] == []
    for key, row in rows.items():
        assert "error" not in row, (key, row)
        assert row["losses_finite"] and all(math.isfinite(v) for v in row["loss_first_last"]), (key, row)
        assert row["step_s"] > 0 and Path(row["prediction"]).is_file(), (key, row)
    # one step per epoch; FocusNetV2 ran each of its five phases
    assert rows["stock"]["steps"] == 1 and rows["focusnetv2"]["steps"] == 5
    assert set(rows["focusnetv2"]["phase_step_s"]) == {"snet", "sol", "ae", "sos", "joint"}
    assert all(v > 0 for v in rows["focusnetv2"]["phase_step_s"].values())
    # ratios to the baselines of the same run
    assert rows["stock"]["step_ratio"] == 1.0 and rows["mask_rcnn"]["step_ratio"] == 1.0
    assert rows["triplanar"]["step_ratio"] == pytest.approx(rows["triplanar"]["step_s"] / rows["stock"]["step_s"], rel=1e-2)
    # the memory plan: the organmtl trainers' own record; without CUDA the target falls back to 24 GiB
    for key in ("focusnetv2", "landmark_joint", "landmark_late_fusion", "multitask_unet", "triplanar", "partial_labels"):
        assert rows[key]["plan"]["target_gib"] == 24.0 and rows[key]["plan"]["predicted_gib"] > 1.5, key
    assert rows["stock"]["plan"]["predicted_gib"] > 1.5
    # the prediction is a label map on the case's grid
    import SimpleITK as sitk

    pred = sitk.ReadImage(rows["stock"]["prediction"])
    ref = sitk.ReadImage(datasets["plain"]["predict_images"][0])
    assert pred.GetSize() == ref.GetSize()
    assert "| focusnetv2 |" in r.stdout and "| hmrnet |" in r.stdout
