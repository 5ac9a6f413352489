"""The demo's comparison tables read the evaluation it ran (organmtl.workflows.demo)."""
import json

import numpy as np
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
