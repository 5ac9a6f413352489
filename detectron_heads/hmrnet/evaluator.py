"""HMR-Net evaluation (paper §3.3) next to Detectron2's COCOEvaluator: per-class Dice and
Hausdorff distance in mm (organmtl.evaluation.metrics, pixel spacing from the dataset), the
11-point interpolated mAP the paper reports (pycocotools COCOeval with 11 recall thresholds),
a printed table, a CSV and PNG overlays of predicted contours (red) vs ground truth (green)."""
from __future__ import annotations

import csv
import itertools
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

from organmtl.evaluation.coco_eval import decode_segmentation
from organmtl.evaluation.metrics import dice, hausdorff_distance

LOG = logging.getLogger("organmtl")


def eleven_point_map(coco_gt: COCO, results: list[dict], iou_type: str) -> dict:
    """§3.3: ``mAP = 1/11 sum_{r in {0, 0.1, .., 1}} AP_r`` averaged over IoU 0.5:0.95 (and at 0.5),
    overall and per category name; pycocotools' COCOeval with ``recThrs`` set to the 11 points."""
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())}
    if not results:
        return {"AP11": 0.0, "AP11_50": 0.0, **{f"AP11-{n}": 0.0 for n in names.values()}}
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
    ev.params.recThrs = np.linspace(0.0, 1.0, 11)
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval["precision"][:, :, :, 0, -1]          # IoU x recall x category (all areas, max dets)

    def _mean(p):
        p = p[p > -1]
        return float(p.mean() * 100) if p.size else float("nan")

    out = {"AP11": _mean(prec), "AP11_50": _mean(prec[0])}
    for k, cat in enumerate(ev.params.catIds):
        out[f"AP11-{names[cat]}"] = _mean(prec[:, :, k])
    return out


class HMRNetEvaluator(DatasetEvaluator):
    """Per class over the dataset's images (§3.3): Dice and Hausdorff distance (mm) of the union of
    the detections of that class with score >= ``score_thresh`` vs the union of its ground-truth
    instances (slices where both are empty are skipped; HD only where both are non-empty), 11-point
    bbox/segm mAP, ``hmrnet_metrics.csv`` and ``overlays/*.png`` in ``output_dir``. Returns
    ``{"hmrnet": {"Dice-<cls>", "HD-<cls>", "mDice", "mHD", "bbox_AP11", "segm_AP11", ...}}``."""

    def __init__(self, dataset_name: str, output_dir: str | None = None, score_thresh: float = 0.5,
                 num_overlays: int = 8, distributed: bool = True):
        self.dataset_name = dataset_name
        self.output_dir = Path(output_dir) if output_dir else None
        self.score_thresh, self.num_overlays, self.distributed = score_thresh, num_overlays, distributed
        self.metadata = MetadataCatalog.get(dataset_name)
        self.classes = list(self.metadata.thing_classes)
        self._records = None

    def reset(self):
        self._rows, self._coco, self._overlays = [], [], 0

    def _record(self, image_id):
        if self._records is None:
            self._records = {r["image_id"]: r for r in DatasetCatalog.get(self.dataset_name)}
        if image_id not in self._records:
            raise KeyError(f"{self.dataset_name}: image_id {image_id} not in the registered dataset")
        return self._records[image_id]

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            rec = self._record(inp["image_id"])
            h, w = rec["height"], rec["width"]
            spacing = rec.get("pixel_spacing", [1.0, 1.0])
            self._coco.extend(instances_to_coco_json(inst, inp["image_id"]))
            gt = defaultdict(lambda: np.zeros((h, w), bool))
            for a in rec.get("annotations", []):
                if not a.get("iscrowd", 0):
                    gt[a["category_id"]] |= decode_segmentation(a["segmentation"], h, w)
            pred = defaultdict(lambda: np.zeros((h, w), bool))
            if inst.has("pred_masks"):
                keep = (inst.scores >= self.score_thresh).numpy()
                masks = inst.pred_masks.numpy()[keep]
                for c, m in zip(inst.pred_classes.numpy()[keep], masks):
                    pred[int(c)] |= m.astype(bool)
            for c in sorted(set(gt) | set(pred)):
                g, p = gt[c], pred[c]
                hd = hausdorff_distance(p, g, spacing) if (g.any() and p.any()) else float("nan")
                self._rows.append((c, dice(p, g), hd))
            if self.output_dir and self._overlays < self.num_overlays and comm.is_main_process():
                self._write_overlay(rec, inst)
                self._overlays += 1

    def _write_overlay(self, rec, inst):
        img = Image.open(rec["file_name"]).convert("RGB")
        draw = ImageDraw.Draw(img)
        for a in rec.get("annotations", []):
            if "contour_points" in a:
                pts = np.asarray(a["contour_points"], float).reshape(-1, 2)
                draw.line([tuple(p) for p in np.vstack([pts, pts[:1]])], fill=(0, 255, 0), width=1)
        keep = inst.scores >= self.score_thresh
        if inst.has("pred_points"):
            for pts in inst.pred_points[keep].numpy():
                draw.line([tuple(p) for p in np.vstack([pts, pts[:1]])], fill=(255, 0, 0), width=1)
        elif inst.has("pred_masks"):
            from skimage import measure
            for m in inst.pred_masks[keep].numpy():
                for cnt in measure.find_contours(m.astype(float), 0.5):
                    draw.line([(x + 0.5, y + 0.5) for y, x in cnt], fill=(255, 0, 0), width=1)
        path = self.output_dir / "overlays" / (Path(rec["file_name"]).stem + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(path)

    def evaluate(self):
        rows, coco = self._rows, self._coco
        if self.distributed:
            comm.synchronize()
            rows = list(itertools.chain(*comm.gather(rows, dst=0)))
            coco = list(itertools.chain(*comm.gather(coco, dst=0)))
            if not comm.is_main_process():
                return {}
        coco_gt = COCO(self.metadata.json_file)
        rev = {v: k for k, v in getattr(self.metadata, "thing_dataset_id_to_contiguous_id", {}).items()}
        for r in coco:
            r["category_id"] = rev.get(r["category_id"], r["category_id"])
        res, table = {}, []
        for iou_type in ("bbox", "segm"):
            usable = [r for r in coco if iou_type != "segm" or "segmentation" in r]
            for k, v in eleven_point_map(coco_gt, usable, iou_type).items():
                res[f"{iou_type}_{k}"] = v
        dices, hds = [], []
        for c, name in enumerate(self.classes):
            d = [r[1] for r in rows if r[0] == c]
            hd = [r[2] for r in rows if r[0] == c and np.isfinite(r[2])]
            res[f"Dice-{name}"] = float(np.mean(d)) if d else float("nan")
            res[f"HD-{name}"] = float(np.mean(hd)) if hd else float("nan")
            dices += d
            hds += hd
            table.append([name, res[f"Dice-{name}"], res[f"HD-{name}"], len(d),
                          res.get(f"bbox_AP11-{name}", float("nan")), res.get(f"segm_AP11-{name}", float("nan"))])
        res["mDice"] = float(np.nanmean([t[1] for t in table])) if table else float("nan")
        res["mHD"] = float(np.nanmean([t[2] for t in table])) if any(np.isfinite(t[2]) for t in table) else float("nan")
        header = ["class", "Dice", "HD (mm)", "slices", "bbox AP11", "segm AP11"]
        table.append(["mean", res["mDice"], res["mHD"], len(rows), res["bbox_AP11"], res["segm_AP11"]])
        LOG.info("HMR-Net evaluation of %s:\n%s", self.dataset_name, tabulate(table, header, floatfmt=".3f"))
        print(tabulate(table, header, floatfmt=".3f"))
        if self.output_dir:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "hmrnet_metrics.csv", "w", newline="") as f:
                wr = csv.writer(f)
                wr.writerow(header)
                wr.writerows(table)
        return {"hmrnet": res}


def predict_with_boxes(model, batched_inputs: list[dict], boxes: list, classes: list) -> list[dict]:
    """Oracle-box inference: run ``model``'s ROI heads (mask head, or HMR-Net's shape head whose
    points are decoded from each box and rasterised) on the given boxes instead of its own
    detections, Detectron2's ``GeneralizedRCNN.inference(detected_instances=...)`` path
    (``roi_heads.forward_with_given_boxes``). ``boxes[i]``: (n, 4) XYXY in the original image's
    pixels (as the dataset dict's ``height`` x ``width``), ``classes[i]``: (n,) contiguous class ids.
    Every given box gets score 1. -> the model's outputs ``[{"instances": ...}]`` in original-image
    coordinates, so the segm AP of the result measures the shape/mask given perfect boxes."""
    import torch
    from detectron2.structures import Boxes, Instances

    detected = []
    for inp, b, c in zip(batched_inputs, boxes, classes):
        h_in, w_in = inp["image"].shape[-2:]
        sy, sx = h_in / inp.get("height", h_in), w_in / inp.get("width", w_in)
        b = torch.as_tensor(np.asarray(b, np.float32).reshape(-1, 4)) * torch.tensor([sx, sy, sx, sy])
        inst = Instances((h_in, w_in))
        inst.pred_boxes = Boxes(b)
        inst.pred_classes = torch.as_tensor(np.asarray(c, np.int64).reshape(-1))
        inst.scores = torch.ones(len(b))
        detected.append(inst)
    with torch.no_grad():
        return model.inference(batched_inputs, detected_instances=detected, do_postprocess=True)
