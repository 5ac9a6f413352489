"""``organmtl evaluate`` through the console script: a tiny nnU-Net-style folder (anisotropic
spacing, an empty prediction, a structure absent from both, landmarks, small organs) and a tiny
COCO ground-truth / results pair (pixel spacing per image, mAP, a shifted mask)."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from tests.helpers import run_cli

SPACING_XYZ = (0.8, 0.8, 2.5)   # SimpleITK order; array order (z, y, x) is (2.5, 0.8, 0.8)


def _write(arr, path):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(img, str(path))


@pytest.fixture(scope="module")
def volume_folders(tmp_path_factory):
    """3 cases, labels A=1 (large) and B=2 (small organ).
    c0: A predicted shifted by one column (0.8 mm), B exact.  c1: A not predicted at all.
    c2: A exact, B absent from reference and prediction."""
    root = tmp_path_factory.mktemp("vol")
    ds, pred = root / "Dataset900_Tiny", root / "pred"
    (ds / "labelsTs").mkdir(parents=True)
    (ds / "landmarks").mkdir()
    (pred / "landmarks").mkdir(parents=True)
    for i in range(3):
        g = np.zeros((8, 16, 16), np.uint8)
        g[2:6, 4:10, 4:10] = 1
        if i != 2:
            g[3:5, 12:14, 12:14] = 2
        p = g.copy()
        if i == 0:
            p[p == 1] = 0
            p[2:6, 4:10, 5:11] = 1
        if i == 1:
            p[p == 1] = 0
        _write(g, ds / "labelsTs" / f"c{i}.nii.gz")
        _write(p, pred / f"c{i}.nii.gz")
        gt_lm = [{"name": "apex", "lps_mm": [0.0, 0.0, 0.0]}, {"name": "base", "lps_mm": [10.0, 0.0, 0.0]}]
        pr_lm = [{"name": "apex", "lps_mm": [3.0 + i, 4.0, 0.0]}] + ([{"name": "base", "lps_mm": [10.0, 2.0, 0.0]}] if i else [])
        (ds / "landmarks" / f"c{i}.json").write_text(json.dumps({"case": f"c{i}", "landmarks": gt_lm}))
        (pred / "landmarks" / f"c{i}.json").write_text(json.dumps({"case": f"c{i}", "landmarks": pr_lm}))
    # a training case's landmarks (no prediction, not evaluated): must not count as missing
    (ds / "landmarks" / "tr0.json").write_text(json.dumps({"case": "tr0", "landmarks": gt_lm}))
    (ds / "dataset.json").write_text(json.dumps({
        "labels": {"background": 0, "A": 1, "B": 2}, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
        "numTraining": 0, "organmtl_small_organs": ["B"]}))
    return pred, ds


def test_evaluate_nnunet_folder(volume_folders, tmp_path):
    pred, ds = volume_folders
    out = tmp_path / "eval"
    r = run_cli("evaluate", pred, ds / "labelsTs", "-o", out, "--tolerance-mm", "1.0")
    assert r.returncode == 0, r.stderr
    assert "| A |" in r.stdout and "**mean small organs**" in r.stdout and "| landmarks |" in r.stdout
    rows = {(x["case"], x["structure"]): x for x in csv.DictReader(open(out / "per_case.csv"))}
    # c0/A: 144 reference voxels, prediction shifted one column: overlap 4*6*5 = 120
    assert float(rows["c0", "A"]["dice"]) == pytest.approx(2 * 120 / 288)
    assert float(rows["c0", "A"]["iou"]) == pytest.approx(120 / 168)
    assert float(rows["c0", "A"]["hd_mm"]) == pytest.approx(0.8, abs=1e-5)       # one column = 0.8 mm
    assert float(rows["c0", "A"]["vol_ref_mm3"]) == pytest.approx(144 * 0.8 * 0.8 * 2.5, rel=1e-5)
    assert rows["c1", "A"]["status"] == "pred_empty" and rows["c1", "A"]["dice"] == "0.0"
    assert rows["c1", "A"]["hd_mm"] == "" and rows["c1", "A"]["surface_dice"] == "0.0"
    assert rows["c2", "B"]["status"] == "both_empty" and float(rows["c2", "B"]["dice"]) == 1.0
    summary = json.loads((out / "organmtl_summary.json").read_text())
    a = summary["segmentation"]["per_structure"]["A"]
    assert a["hd_mm"]["n"] == 2 and a["hd_mm"]["n_undefined"] == 1          # not averaged in as nan
    assert a["hd_mm"]["mean"] == pytest.approx(0.4, abs=1e-5)
    assert a["dice"]["mean"] == pytest.approx((240 / 288 + 0 + 1) / 3)
    assert summary["segmentation"]["per_structure"]["B"]["n_both_empty"] == 1
    assert summary["segmentation"]["small_organs"]["names"] == ["B"]
    assert summary["segmentation"]["small_organs"]["mean"]["dice"] == pytest.approx(1.0)
    lm = summary["landmarks"]
    # errors: c0 apex 5, base missing; c1 apex sqrt(16+16), base 2; c2 apex sqrt(25+16), base 2
    assert lm["n_landmarks"] == 6 and lm["n_missing"] == 1
    assert lm["error_mm"]["mean"] == pytest.approx((5 + math.sqrt(32) + 2 + math.sqrt(41) + 2) / 5)
    assert lm["identification_rates"] == {"3mm": pytest.approx(2 / 6), "4mm": pytest.approx(2 / 6),
                                          "5mm": pytest.approx(3 / 6)}
    assert (out / "summary.md").read_text().count("| A |") == 1
    assert (out / "landmarks_per_case.csv").is_file()


def test_evaluate_folders_keeps_demo_signature(volume_folders, tmp_path):
    """The demo's call: nnU-Net's mean Dice per label (nnU-Net's own evaluation), plus the full outputs."""
    from organmtl.evaluation.segmentation import evaluate_folders, format_table

    pred, ds = volume_folders
    scores = evaluate_folders(pred, ds / "labelsTs", ds / "dataset.json", output_file=tmp_path / "nn" / "summary.json",
                              full_output_dir=tmp_path / "full")
    assert scores["A"] == pytest.approx((240 / 288 + 0 + 1) / 3)
    assert scores["B"] == pytest.approx(1.0)   # nnU-Net leaves the both-empty case (nan) out of its mean
    assert (tmp_path / "nn" / "summary.json").is_file() and (tmp_path / "full" / "per_case.csv").is_file()
    assert "| A |" in format_table({"run": scores})


def _nnunet_summary(pred, gt):
    """nnU-Net's own evaluation of ``pred`` into ``pred/summary.json`` (as its validation and
    ``nnUNetv2_evaluate_folder`` write it)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    compute_metrics_on_folder(str(gt), str(pred), str(pred / "summary.json"), SimpleITKIO(), ".nii.gz", [1, 2],
                              None, 1)
    return pred / "summary.json"


def test_evaluate_leaves_nnunet_summary_byte_identical_and_loadable(volume_folders, tmp_path):
    """``organmtl evaluate PRED`` (default output: PRED) beside nnU-Net's ``summary.json``: nnU-Net's file
    keeps every byte and nnU-Net's ``load_summary_json`` (what find_best_configuration and
    determine_postprocessing call) still reads it; ours is ``organmtl_summary.json``."""
    import shutil

    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    src, ds = volume_folders
    pred = tmp_path / "validation"
    shutil.copytree(src, pred, ignore=shutil.ignore_patterns("landmarks"))
    nnunet = _nnunet_summary(pred, ds / "labelsTs")
    before = nnunet.read_bytes()
    r = run_cli("evaluate", pred, ds / "labelsTs", "--dataset-json", ds / "dataset.json")
    assert r.returncode == 0, r.stderr
    assert nnunet.read_bytes() == before
    loaded = load_summary_json(str(nnunet))
    assert loaded["mean"][1]["Dice"] == pytest.approx((240 / 288 + 0 + 1) / 3)     # nnU-Net's keys, as ints
    ours = json.loads((pred / "organmtl_summary.json").read_text())
    assert ours["segmentation"]["per_structure"]["A"]["dice"]["mean"] == pytest.approx((240 / 288 + 0 + 1) / 3)
    assert f"summary_json: {pred / 'organmtl_summary.json'}" in r.stdout


def test_evaluate_writes_no_summary_json_of_nnunet_name(volume_folders, tmp_path):
    """In a folder without nnU-Net's summary, ``organmtl evaluate`` writes none either: nnU-Net's tools
    never find a foreign file under their name."""
    import shutil

    from organmtl.evaluation.evaluate import run_evaluation

    src, ds = volume_folders
    pred = tmp_path / "pred"
    shutil.copytree(src, pred, ignore=shutil.ignore_patterns("landmarks"))
    _, paths = run_evaluation(pred, ds / "labelsTs", dataset_json=ds / "dataset.json")     # default output: PRED
    assert paths["summary_json"] == pred / "organmtl_summary.json"
    assert not (pred / "summary.json").exists()
    assert {p.name for p in pred.iterdir()} - {f"c{i}.nii.gz" for i in range(3)} == \
        {"per_case.csv", "organmtl_summary.json", "summary.md"}


def test_evaluate_folders_both_summaries_in_one_folder(volume_folders, tmp_path):
    """``evaluate_folders`` with nnU-Net's summary and ours in the same folder: both kept."""
    import shutil

    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    from organmtl.evaluation.segmentation import evaluate_folders

    src, ds = volume_folders
    pred = tmp_path / "pred"
    shutil.copytree(src, pred, ignore=shutil.ignore_patterns("landmarks"))
    scores = evaluate_folders(pred, ds / "labelsTs", ds / "dataset.json", full_output_dir=pred)
    assert load_summary_json(str(pred / "summary.json"))["mean"][1]["Dice"] == pytest.approx(scores["A"])
    assert "segmentation" in json.loads((pred / "organmtl_summary.json").read_text())


def test_evaluate_bad_input_is_one_line_exit_2(volume_folders, tmp_path):
    pred, ds = volume_folders
    r = run_cli("evaluate", tmp_path / "missing", ds / "labelsTs")
    assert r.returncode == 2 and "neither a prediction folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _rle(mask):
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def write_coco_pair(folder):
    """COCO ground truth (2 images, liver + kidney, pixel spacing 0.5 x 2.0 mm), results JSON, PNGs.
    Image b's kidney is predicted 2 columns to the right: Dice 8/16, HD 2 columns x 2.0 mm = 4 mm."""
    from PIL import Image
    from pycocotools import mask as mask_utils

    h, w = 24, 20
    liver = np.zeros((h, w), bool)
    liver[4:14, 3:12] = True
    kidney = np.zeros((h, w), bool)
    kidney[16:20, 6:10] = True
    kidney_pred = np.zeros((h, w), bool)
    kidney_pred[16:20, 8:12] = True
    images = [{"id": 1, "file_name": "a.png", "height": h, "width": w, "case": "a", "pixel_spacing": [0.5, 2.0]},
              {"id": 2, "file_name": "b.png", "height": h, "width": w, "case": "b", "pixel_spacing": [0.5, 2.0]}]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    anns, results = [], []
    for img in (1, 2):
        Image.fromarray((liver * 120 + kidney * 200).astype(np.uint8)).save(folder / "images" / images[img - 1]["file_name"])
        for cat, m in ((1, liver), (2, kidney)):
            rle = _rle(m)
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
        results.append({"image_id": img, "category_id": 1, "segmentation": _rle(liver), "score": 0.9})
        results.append({"image_id": img, "category_id": 2, "score": 0.8,
                        "segmentation": _rle(kidney_pred if img == 2 else kidney)})
    results.append({"image_id": 1, "category_id": 2, "segmentation": _rle(liver), "score": 0.1})  # below threshold
    gt = folder / "instances_val.json"
    gt.write_text(json.dumps({"images": images, "annotations": anns, "organmtl_small_organs": ["kidney"],
                              "categories": [{"id": 1, "name": "liver"}, {"id": 2, "name": "kidney"}]}))
    res = folder / "coco_instances_results.json"
    res.write_text(json.dumps(results))
    return res, gt


def test_evaluate_coco_pair(tmp_path):
    res, gt = write_coco_pair(tmp_path)
    r = run_cli("evaluate", res, gt, "--tolerance-mm", "1.0")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "coco_instances_results_evaluation"
    rows = {(x["case"], x["structure"]): x for x in csv.DictReader(open(out / "per_case.csv"))}
    assert float(rows["a", "kidney"]["dice"]) == 1.0 and float(rows["a", "liver"]["hd_mm"]) == 0.0
    assert float(rows["b", "kidney"]["dice"]) == pytest.approx(0.5)
    assert float(rows["b", "kidney"]["hd_mm"]) == pytest.approx(4.0)
    assert float(rows["b", "kidney"]["vol_ref_mm3"]) == pytest.approx(16 * 0.5 * 2.0)   # area in mm^2
    summary = json.loads((out / "organmtl_summary.json").read_text())
    segm = summary["detection"]["segm"]
    assert segm["per_category"]["liver"] == pytest.approx(1.0)
    assert 0 < segm["per_category"]["kidney"] < 1 and 0 < segm["mAP"] < 1
    assert summary["segmentation"]["small_organs"]["names"] == ["kidney"]
    assert "| segm |" in r.stdout


def test_regions_and_ignore_label(tmp_path):
    """nnU-Net regions (a structure = several label values) and the ignore label (removed from both masks)."""
    from organmtl.evaluation.volumes import evaluate_volume_folders

    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    g = np.zeros((4, 10, 10), np.uint8)
    g[1:3, 2:5, 2:5] = 1
    g[1:3, 5:8, 2:5] = 2
    g[1:3, 0:2, 0:2] = 3                  # ignore
    p = np.where(g == 3, 1, g).astype(np.uint8)   # predicts label 1 inside the ignored region
    p[1:3, 5:8, 2:5] = 1                  # label 2 predicted as 1: region "whole" still right
    _write(g, gt_dir / "x.nii.gz")
    _write(p, pred_dir / "x.nii.gz")
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2], "inner": 2, "ignore": 3},
                              "regions_class_order": [1, 2], "channel_names": {"0": "CT"},
                              "file_ending": ".nii.gz", "numTraining": 1}))
    rows, summary = evaluate_volume_folders(pred_dir, gt_dir, ds)
    by = {r["structure"]: r for r in rows}
    assert set(by) == {"whole", "inner"}
    assert by["whole"]["dice"] == 1.0 and by["whole"]["hd_mm"] == 0.0   # ignored voxels do not count
    assert by["inner"]["status"] == "pred_empty" and by["inner"]["dice"] == 0.0


def test_landmarks_beside_the_volumes(volume_folders, tmp_path):
    """Landmark trainers write PRED/<case>.json next to PRED/<case>.nii.gz: found by default."""
    import shutil

    from organmtl.evaluation.evaluate import run_evaluation

    pred, ds = volume_folders
    flat = tmp_path / "pred"
    shutil.copytree(pred, flat, ignore=shutil.ignore_patterns("landmarks", "*.csv", "organmtl_summary.json", "summary.*"))
    for f in (pred / "landmarks").glob("*.json"):
        shutil.copy(f, flat / f.name)
    summary, paths = run_evaluation(flat, ds / "labelsTs", out_dir=tmp_path / "out")
    assert summary["landmarks"]["n_landmarks"] == 6 and summary["landmarks"]["n_missing"] == 1
    assert paths["landmarks_csv"].is_file()
