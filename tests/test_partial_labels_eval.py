"""``organmtl evaluate --annotated-only / --never-together`` (docs/partial_labels.md) on hand-made
volumes: a source's reference calls the other source's organ background, so only its own classes
are scored; on a full-truth reference, the Dice of the classes never annotated together."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.cli import main
from organmtl.converters.merge import ANNOTATED_KEY

LABELS = {"background": 0, "liver": 1, "spleen": 2}
META = {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "MR"}, "numTraining": 2,
        "organmtl_tasks": {"A": {"label_values": [1], "cases": ["A_0"]}, "B": {"label_values": [2], "cases": ["B_0"]}},
        ANNOTATED_KEY: {"A_0": [1], "B_0": [2]}}


def _write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def _maps():
    liver = np.zeros((2, 4, 4), np.uint8)
    liver[:, :2, :2] = 1                      # 8 voxels
    spleen = np.zeros_like(liver)
    spleen[:, 2:, 2:] = 2                     # 8 voxels
    return liver, spleen


@pytest.fixture()
def folders(tmp_path):
    liver, spleen = _maps()
    ds = tmp_path / "Dataset001_M"
    (ds).mkdir()
    (ds / "dataset.json").write_text(json.dumps(META))
    # A annotated liver only: its reference calls the spleen background; the prediction finds both
    _write(ds / "labelsTr" / "A_0.nii.gz", liver)
    _write(tmp_path / "pred" / "A_0.nii.gz", liver + spleen)
    # B annotated spleen only; the prediction misses half of the spleen, finds the liver
    half = spleen.copy()
    half[1] = 0
    _write(ds / "labelsTr" / "B_0.nii.gz", spleen)
    _write(tmp_path / "pred" / "B_0.nii.gz", liver + half)
    return tmp_path, ds


def _summary(out):
    return json.loads((out / "organmtl_summary.json").read_text())


def test_annotated_only_scores_each_case_on_its_sources_classes(folders, capsys):
    tmp, ds = folders
    common = [str(tmp / "pred"), str(ds / "labelsTr"), "--dataset-json", str(ds / "dataset.json")]
    assert main(["evaluate", *common, "-o", str(tmp / "plain")]) == 0
    plain = _summary(tmp / "plain")["segmentation"]["per_structure"]
    assert plain["liver"]["dice"]["mean"] == pytest.approx(0.5)       # B_0: liver "false positive" -> 0
    assert main(["evaluate", *common, "-o", str(tmp / "ann"), "--annotated-only"]) == 0
    s = _summary(tmp / "ann")
    per = s["segmentation"]["per_structure"]
    assert per["liver"]["dice"]["mean"] == pytest.approx(1.0)         # only A_0 is scored on the liver
    assert per["spleen"]["dice"]["mean"] == pytest.approx(2 * 4 / (4 + 8))
    assert s["per_source"]["A"]["mean"]["dice"] == pytest.approx(1.0)
    assert s["per_source"]["B"]["mean"]["dice"] == pytest.approx(2 / 3)
    assert "source A: mean Dice 1.0" in capsys.readouterr().out


def test_never_together_on_a_full_truth_reference(folders, tmp_path):
    tmp, ds = folders
    liver, spleen = _maps()
    _write(tmp_path / "truth" / "F_0.nii.gz", liver + spleen)
    pred = liver + spleen
    pred[0] = 0                                # half of each organ found
    _write(tmp_path / "fpred" / "F_0.nii.gz", pred)
    assert main(["evaluate", str(tmp_path / "fpred"), str(tmp_path / "truth"), "--dataset-json",
                 str(ds / "dataset.json"), "--never-together"]) == 0
    nt = _summary(tmp_path / "fpred")["never_annotated_together"]
    assert nt["pairs"] == [["liver", "spleen"]] and nt["structures"] == ["liver", "spleen"]
    assert nt["mean_dice"] == pytest.approx(2 * 4 / (4 + 8))


def test_annotated_only_names_a_case_the_record_lacks(folders, tmp_path):
    tmp, ds = folders
    _write(tmp / "pred" / "C_0.nii.gz", np.zeros((2, 4, 4)))
    _write(ds / "labelsTr" / "C_0.nii.gz", np.zeros((2, 4, 4)))
    assert main(["evaluate", str(tmp / "pred"), str(ds / "labelsTr"), "--dataset-json", str(ds / "dataset.json"),
                 "-o", str(tmp_path / "x"), "--annotated-only"]) == 2
