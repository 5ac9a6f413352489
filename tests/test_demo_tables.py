"""The demo's comparison tables read the evaluation it ran (organmtl.workflows.demo)."""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.workflows.demo import _comparison_table, _evaluate_test_set


def _write(path, array, spacing=(1.0, 1.0, 2.0)):
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_test_set_table_carries_dice_and_hd95_of_each_structure(tmp_path):
    raw, pred = tmp_path / "raw", tmp_path / "pred"
    (raw / "labelsTs").mkdir(parents=True)
    pred.mkdir()
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "nerve": 2},
                                                  "file_ending": ".nii.gz", "channel_names": {"0": "CT"}}))
    gt = np.zeros((8, 16, 16))
    gt[2:6, 4:10, 4:10] = 1
    gt[3:5, 12:14, 12:14] = 2
    shifted = np.zeros_like(gt)
    shifted[2:6, 5:11, 4:10] = 1                     # organ shifted by one voxel (1 mm) along y
    shifted[3:5, 12:14, 12:14] = 2                   # nerve exact
    _write(raw / "labelsTs" / "c1.nii.gz", gt)
    _write(pred / "c1.nii.gz", shifted)
    columns = {"method": _evaluate_test_set(raw, pred, tmp_path / "eval")}
    organ, nerve = columns["method"]["organ"], columns["method"]["nerve"]
    assert abs(organ["Dice"] - 2 * 4 * 5 * 6 / (2 * 4 * 6 * 6)) < 1e-6
    assert organ["HD95 mm"] == 1.0 and nerve["Dice"] == 1.0 and nerve["HD95 mm"] == 0.0
    table = _comparison_table(columns)
    assert "| organ | 0.833 | 1.000 |" in table and "| nerve | 1.000 | 0.000 |" in table


def _fold(tmp_path, meta, rows):
    """A fold folder with nnU-Net's validation/summary.json for ``rows`` (case -> {label: Dice}) and the
    dataset.json ``meta``; nnU-Net's ``mean`` is the nan-mean over every case, as nnU-Net computes it."""
    import math

    raw, fold = tmp_path / "raw", tmp_path / "fold_0"
    (fold / "validation").mkdir(parents=True)
    raw.mkdir()
    (raw / "dataset.json").write_text(json.dumps(meta))
    labels = sorted({label for r in rows.values() for label in r})
    mean = {}
    for label in labels:
        vals = [r[label] for r in rows.values() if not math.isnan(r[label])]
        mean[label] = {"Dice": sum(vals) / len(vals)}
    per_case = [{"reference_file": f"/gt/{case}.nii.gz", "metrics": {k: {"Dice": v} for k, v in r.items()}}
                for case, r in rows.items()]
    (fold / "validation" / "summary.json").write_text(json.dumps({"mean": mean, "metric_per_case": per_case}))
    return fold, raw


def test_validation_scores_average_a_structure_over_the_cases_that_annotate_it(tmp_path):
    from organmtl.workflows.demo import _validation_scores

    nan = float("nan")
    meta = {"labels": {"background": 0, "GM": 1, "pectoral_muscle": 2}, "file_ending": ".nii.gz",
            "organmtl_annotated_labels": {"Brain_0": [1], "Brain_1": [1], "Breast_0": [2]}}
    # stray GM voxels on the breast case score 0 there; the brain cases never hold pectoral muscle
    rows = {"Brain_0": {"1": 0.9, "2": nan}, "Brain_1": {"1": 0.8, "2": 0.0}, "Breast_0": {"1": 0.0, "2": 0.95}}
    fold, raw = _fold(tmp_path, meta, rows)
    scores = _validation_scores(fold, raw)
    assert scores["GM"]["Dice"] == pytest.approx(0.85)              # nnU-Net's mean: 0.567
    assert scores["pectoral_muscle"]["Dice"] == pytest.approx(0.95)  # nnU-Net's mean: 0.475


def test_validation_scores_are_nnunets_mean_on_a_fully_annotated_dataset(tmp_path):
    from organmtl.workflows.demo import _validation_scores

    meta = {"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}
    rows = {"a": {"1": 0.9, "2": 0.0}, "b": {"1": 0.7, "2": 0.5}}
    fold, raw = _fold(tmp_path, meta, rows)
    scores = _validation_scores(fold, raw)
    assert scores == {"liver": {"Dice": pytest.approx(0.8)}, "spleen": {"Dice": pytest.approx(0.25)}}
