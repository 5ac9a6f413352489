"""Evaluation of Detectron2/COCO instance results (the ``coco_instances_results.json`` list that
Detectron2's COCOEvaluator writes) against a COCO ground-truth JSON: pycocotools' COCOeval for
mAP@[.5:.95] (segm, and bbox), and per slice and category the same pixel metrics as the volume
evaluation, in mm with each image's ``pixel_spacing`` (row, column) written by ``organmtl convert
... --to coco``."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from organmtl.evaluation.results import CONVENTIONS, structure_row, summarize_rows
from organmtl.evaluation.volumes import EvaluationError


def _load_results(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise EvaluationError(f"{path}: cannot read COCO results JSON ({e})") from None
    if isinstance(data, dict) and "annotations" in data:  # a GT-style file used as predictions
        data = [dict(a, score=a.get("score", 1.0)) for a in data["annotations"]]
    if not isinstance(data, list):
        raise EvaluationError(f"{path}: expected a list of instance results (image_id, category_id, segmentation, score)")
    return data


def decode_segmentation(seg, h: int, w: int) -> np.ndarray:
    """Boolean (h, w) mask of a COCO ``segmentation``: polygons, uncompressed or compressed RLE."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) or isinstance(seg.get("counts"), list) else seg
    m = mask_utils.decode(rle)
    return (m.max(axis=2) if m.ndim == 3 else m).astype(bool)


def detection_map(coco_gt, results: list[dict], iou_types=("segm", "bbox")) -> dict:
    """COCOeval (pycocotools) mAP@[.5:.95], AP50, AP75 and per-category mAP for each IoU type.
    No result at all gives AP 0 for every category with ground truth (nothing was detected)."""
    from pycocotools.cocoeval import COCOeval

    out = {}
    cat_names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    for iou_type in iou_types:
        usable = [r for r in results if ("segmentation" in r if iou_type == "segm" else "bbox" in r or "segmentation" in r)]
        if not usable:
            out[iou_type] = {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_category": {n: 0.0 for n in cat_names.values()},
                             "note": "no detections"}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in usable])
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        precision = ev.eval["precision"]  # [T, R, K, A, M]
        per_cat = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k, 0, -1]
            per_cat[cat_names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else None
        out[iou_type] = {"mAP": float(max(ev.stats[0], 0.0)), "AP50": float(max(ev.stats[1], 0.0)),
                         "AP75": float(max(ev.stats[2], 0.0)), "per_category": per_cat}
    return out


def evaluate_coco(results_json: Path, gt_json: Path, tolerance_mm: float = 2.0, score_threshold: float = 0.5,
                  small_organs: list[str] | None = None) -> tuple[list[dict], dict]:
    """Per (image, category) rows and a summary. The predicted mask of a category on an image is the
    union of its instances scoring >= ``score_threshold``; the reference is the union of its
    annotations. Pairs where both are empty are not rows (slices without the organ)."""
    from pycocotools.coco import COCO

    if not Path(gt_json).is_file():
        raise EvaluationError(f"{gt_json}: COCO ground-truth JSON not found")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_json))
    results = _load_results(results_json)
    gt_ids = set(coco_gt.getImgIds())
    unknown = {r.get("image_id") for r in results} - gt_ids
    if unknown:
        raise EvaluationError(f"{results_json}: image_id {sorted(unknown, key=str)[0]} is not in {gt_json}")
    cats = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    by_image: dict = {}
    for r in results:
        if r.get("score", 1.0) >= score_threshold and "segmentation" in r:
            by_image.setdefault(r["image_id"], []).append(r)
    rows, no_spacing = [], 0
    for img in tqdm(coco_gt.loadImgs(sorted(gt_ids)), desc="evaluate", unit="image", disable=None):
        h, w = int(img["height"]), int(img["width"])
        spacing = img.get("pixel_spacing")
        if spacing is None:
            no_spacing += 1
            spacing = (1.0, 1.0)
        gts = {c: np.zeros((h, w), bool) for c in cats}
        for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[img["id"]], iscrowd=None)):
            gts[a["category_id"]] |= coco_gt.annToMask(a).astype(bool)
        preds = {c: np.zeros((h, w), bool) for c in cats}
        for r in by_image.get(img["id"], []):
            if r["category_id"] not in cats:
                raise EvaluationError(f"{results_json}: category_id {r['category_id']} is not in {gt_json}")
            preds[r["category_id"]] |= decode_segmentation(r["segmentation"], h, w)
        for c, name in cats.items():
            if not gts[c].any() and not preds[c].any():
                continue
            rows.append({"case": img.get("case", img["id"]), "image_id": img["id"], "file_name": img.get("file_name"),
                         "slice_index": img.get("slice_index"), "structure": name,
                         **structure_row(preds[c], gts[c], spacing, tolerance_mm),
                         "spacing_mm": "x".join(f"{float(s):g}" for s in spacing)})
    gt_meta = json.loads(Path(gt_json).read_text())
    small = small_organs if small_organs is not None else (
        gt_meta.get("organmtl_small_organs") or gt_meta.get("info", {}).get("organmtl_small_organs"))
    summary = {"kind": "coco", "pred": str(results_json), "gt": str(gt_json), "n_images": len(gt_ids),
               "n_cases": len({r["case"] for r in rows}), "tolerance_mm": tolerance_mm,
               "score_threshold": score_threshold, "images_without_pixel_spacing": no_spacing,
               "conventions": dict(CONVENTIONS, coco_rows="one per (image, category) where the reference or "
                                   "the prediction is non-empty; volume correlation over cases of summed slice areas (mm^2)"),
               "segmentation": summarize_rows(rows, list(cats.values()), small),
               "detection": detection_map(coco_gt, results)}
    return rows, summary
