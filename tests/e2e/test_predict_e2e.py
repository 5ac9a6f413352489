"""``organmtl predict``: a CT-only DICOM folder through the real console script with a trained tiny
nnU-Net model (session fixture ``dicom_rt_model``) to RTSTRUCT + SEG + NIfTI, read back by
independent readers: rt-utils (OpenCV fill of the contours; installed from the pinned version in
requirements/constraints.txt into a private folder without its opencv-python requirement, the
headless OpenCV here provides the same ``cv2``) and highdicom, each at Dice >= 0.98 per ROI
against the predicted label map (``--format nifti``), which must hold foreground; a second,
broken series in the same run fails alone (exit 1). The Detectron2 route (``--detectron-config``)
is checked for plumbing only, with a freshly initialised Mask R-CNN.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from tests.e2e.conftest import DICOM_RT_TRAINER
from tests.helpers import ONE_THREAD, REPO, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

READ_WITH_RT_UTILS = """
import sys, numpy as np
from rt_utils import RTStructBuilder
rt = RTStructBuilder.create_from(dicom_series_path=sys.argv[1], rt_struct_path=sys.argv[2])
np.savez(sys.argv[3], **{name: np.moveaxis(rt.get_roi_mask_by_name(name), 2, 0) for name in rt.get_roi_names()})
"""


def _pinned(name: str) -> str:
    text = (REPO / "requirements" / "constraints.txt").read_text()
    return re.search(rf"^{re.escape(name)}==\S+$", text, flags=re.MULTILINE).group(0)


@pytest.fixture(scope="module")
def rt_utils_path(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("rt_utils")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                        "--target", str(target), _pinned("rt-utils")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return target


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _sorted_ct(folder: Path) -> list[pydicom.Dataset]:
    ct = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in folder.iterdir()]
    normal = np.cross(*np.reshape(np.asarray(ct[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(ct, key=lambda s: float(np.dot(np.asarray(s.ImagePositionPatient, float), normal)))


def test_ct_only_folder_to_rtstruct_and_seg_read_by_independent_readers(dicom_rt_model, rt_utils_path, tmp_path):
    """Two patients, CT only: rt004 (never trained on) and rt003 with a slice missing. The bad
    series is reported in one line naming a file and costs only itself (exit 1); rt004 gets an
    RTSTRUCT, a SEG and a NIfTI label map that agree."""
    ds, root = dicom_rt_model
    inp = tmp_path / "new_patients"
    shutil.copytree(root / "new" / "rt004" / "CT", inp / "rt004" / "CT")
    shutil.copytree(root / "train" / "rt003" / "CT", inp / "rt003" / "CT")
    by_position = sorted((inp / "rt003" / "CT").iterdir(),
                         key=lambda p: float(pydicom.dcmread(str(p), stop_before_pixels=True).ImagePositionPatient[2]))
    by_position[5].unlink()                       # a slice in the middle of the stack
    out = tmp_path / "out"
    r = run_cli("predict", inp, out, "-d", ds.dataset_id, "-c", ds.configuration, "-tr", DICOM_RT_TRAINER,
                "-f", "0", "-device", "cpu", "--format", "rtstruct", "seg", "nifti", env=ds.env)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "rt003: error:" in errors[0] and str(inp / "rt003" / "CT") in errors[0], r.stderr
    assert "missing slice" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["predict_report.json", "rt004.nii.gz", "rt004_RTSTRUCT.dcm",
                                                     "rt004_SEG.dcm"]
    report = json.loads((out / "predict_report.json").read_text())
    assert report["counts"] == {"series": 2, "done": 1, "failed": 1}
    assert [f["case"] for f in report["failed"]] == ["rt003"]
    labels = {int(k): v for k, v in report["labels"].items()}
    assert set(labels.values()) == {"Body", "PAROTID_L", "Parotid_R", "Spinal_Cord", "Vertebra"}
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(rt_utils_path)}
    import highdicom as hd

    for record in report["cases"]:
        case = record["case"]
        ct_folder = inp / case / "CT"
        ct = _sorted_ct(ct_folder)
        assert record["source"]["series_instance_uid"] == ct[0].SeriesInstanceUID
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        label = sitk.GetArrayFromImage(pred)
        present = {v: labels[v] for v in np.unique(label) if v}
        assert present, f"{case}: the tiny model predicted nothing; the comparison would be empty"

        # RTSTRUCT: references the series; rt-utils reads each ROI back
        rs = pydicom.dcmread(str(out / f"{case}_RTSTRUCT.dcm"))
        frame = rs.ReferencedFrameOfReferenceSequence[0]
        assert frame.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        assert frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0].SeriesInstanceUID == \
            ct[0].SeriesInstanceUID
        npz = tmp_path / f"{case}.npz"
        rr = subprocess.run([sys.executable, "-c", READ_WITH_RT_UTILS, str(ct_folder), str(out / f"{case}_RTSTRUCT.dcm"),
                             str(npz)], capture_output=True, text=True, env=env, timeout=300)
        assert rr.returncode == 0, rr.stderr
        masks = np.load(npz)
        assert set(masks.files) == set(present.values())
        for value, name in present.items():       # rt-utils stacks slices along the normal, as we do
            assert _dice(label == value, masks[name]) >= 0.98, (case, name)

        # SEG: highdicom reads one segment per predicted label, frames on the CT slices
        seg = hd.seg.segread(str(out / f"{case}_SEG.dcm"))
        assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct[0].SeriesInstanceUID
        numbers = {seg.get_segment_description(n).segment_label: n for n in seg.get_segment_numbers()}
        assert set(numbers) == set(present.values())
        pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in ct], combine_segments=True)
        for value, name in present.items():
            assert _dice(label == value, pixels == numbers[name]) >= 0.98, (case, name)


def test_detectron_backend_plumbing(dicom_rt_model, tmp_path):
    """--detectron-config/--weights reach organmtl.detectron_heads.volume_predictor: a Mask R-CNN
    with freshly initialised weights (plumbing only: what it predicts is not the point) on a
    CT-only series gives a label map on the CT's grid with values among its structures, and the
    report names the Detectron2 model and its structure names."""
    import torch
    from detectron2.modeling import build_model

    from organmtl.converters.dicom_ct import find_series, load_series
    from organmtl.detectron_heads.volume_predictor import load_config

    _, root = dicom_rt_model
    inp = tmp_path / "ct"
    shutil.copytree(root / "new" / "rt004" / "CT", inp / "CT")
    config = REPO / "detectron_heads" / "configs" / "tiny" / "mask_rcnn_R_18_FPN_baseline_tiny.yaml"
    opts = ["ORGANMTL.SLICES.AXIS", "axial", "ORGANMTL.SLICES.INTENSITY", "ct_window",
            "ORGANMTL.CLASS_NAMES", "['Body','Vertebra']", "MODEL.ROI_HEADS.NUM_CLASSES", "2", "MODEL.DEVICE", "cpu"]
    torch.manual_seed(0)
    weights = tmp_path / "model_final.pth"
    torch.save({"model": build_model(load_config(config, opts)).state_dict()}, weights)
    out = tmp_path / "out"
    r = run_cli("predict", inp, out, "--detectron-config", config, "--weights", weights, "--opts", *opts,
                "-device", "cpu", "--format", "nifti", env=ONE_THREAD)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((out / "predict_report.json").read_text())
    assert report["model"]["backend"] == "Detectron2" and report["labels"] == {"1": "Body", "2": "Vertebra"}
    ct = load_series(find_series(inp).series[0]).image
    pred = sitk.ReadImage(str(out / f"{report['cases'][0]['case']}.nii.gz"))
    assert pred.GetSize() == ct.GetSize()
    assert np.allclose(pred.GetOrigin(), ct.GetOrigin(), atol=1e-4)
    assert np.allclose(pred.GetSpacing(), ct.GetSpacing()) and np.allclose(pred.GetDirection(), ct.GetDirection())
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2}
