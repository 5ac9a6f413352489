"""Per-structure metric rows shared by the volume (nnU-Net) and slice (COCO) evaluations, their
summary (means that count undefined values separately, volume correlation, small-organ averages)
and the three outputs: per-case CSV, summary JSON and a Markdown table."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from organmtl.evaluation import metrics as M

#: (row key, Markdown column title) of every per-structure metric, in table order.
METRICS = [("dice", "Dice"), ("iou", "IoU"), ("hd_mm", "HD mm"), ("hd95_mm", "HD95 mm"),
           ("hd95_mean_directed_mm", "HD95 mean-dir mm"), ("asd_mm", "ASD mm"), ("surface_dice", "SDice")]

CONVENTIONS = {
    "spacing": "physical spacing of each image (nnU-Net reader properties / COCO pixel_spacing), mm",
    "dice_iou_both_empty": 1.0,
    "dice_iou_one_empty": 0.0,
    "surface_dice_both_empty": 1.0,
    "surface_dice_one_empty": 0.0,
    "distances_with_an_empty_mask": "undefined: written empty in the CSV, counted in n_undefined, never averaged",
    "hd_mm": "max of the two directed maximum border distances (MONAI edges and distances)",
    "hd95_mm": "max of the two directed 95th-percentile border distances",
    "hd95_mean_directed_mm": "mean of the two directed 95th-percentile border distances (FocusNetv2's 95HD)",
    "asd_mm": "mean over the border voxels of both masks of the distance to the other border",
}


def structure_row(pred: np.ndarray, gt: np.ndarray, spacing, tolerance_mm: float) -> dict:
    """Every metric of one structure in one case (2D or 3D boolean masks, ``spacing`` in array-axis
    order). Borders and distances are computed once and reduced to every distance metric."""
    p_any, g_any = bool(pred.any()), bool(gt.any())
    status = "ok" if p_any and g_any else ("both_empty" if not (p_any or g_any)
                                           else ("pred_empty" if g_any else "ref_empty"))
    row = {"status": status, "dice": M.dice(pred, gt), "iou": M.iou(pred, gt),
           "vol_ref_mm3": M.volume_mm3(gt, spacing), "vol_pred_mm3": M.volume_mm3(pred, spacing)}
    sd = M.surface_distances(pred, gt, spacing)
    if sd is None:
        row.update(hd_mm=math.nan, hd95_mm=math.nan, hd95_mean_directed_mm=math.nan, asd_mm=math.nan,
                   surface_dice=1.0 if status == "both_empty" else 0.0)
    else:
        row.update(hd_mm=sd.hausdorff(100), hd95_mm=sd.hausdorff(95),
                   hd95_mean_directed_mm=sd.hausdorff_mean_directed(95), asd_mm=sd.average(),
                   surface_dice=sd.surface_dice(tolerance_mm))
    return row


def summarize_rows(rows: list[dict], structures: list[str], small_organs: list[str] | None = None,
                   group_key: str = "case") -> dict:
    """Per-structure summaries of ``rows`` (dicts with ``structure`` and the METRICS keys), the
    mean over structures of each metric, and the same mean over the declared small organs.

    Volume correlation: Pearson r over ``group_key`` groups (cases) of the summed reference vs
    predicted volumes (areas for 2D slices) of each structure."""
    per = {}
    for s in structures:
        mine = [r for r in rows if r["structure"] == s]
        entry = {k: M.summarize(r[k] for r in mine) for k, _ in METRICS}
        entry["n_both_empty"] = sum(r["status"] == "both_empty" for r in mine)
        vols: dict = {}
        for r in mine:
            ref, pred = vols.get(r[group_key], (0.0, 0.0))
            vols[r[group_key]] = (ref + r["vol_ref_mm3"], pred + r["vol_pred_mm3"])
        ref, pred = zip(*vols.values()) if vols else ((), ())
        entry["volume_correlation"] = {"r": _none(M.pearson_r(ref, pred)), "n": len(vols)}
        per[s] = entry
    out = {"per_structure": per, "mean": _mean_over(per, structures)}
    small = [s for s in (small_organs or []) if s in per]
    if small_organs:
        missing = sorted(set(small_organs) - set(per))
        out["small_organs"] = {"names": small, "not_evaluated": missing, "mean": _mean_over(per, small)}
    return out


def _none(v: float):
    return None if v is None or not math.isfinite(v) else float(v)


def _mean_over(per: dict, names: list[str]) -> dict:
    out = {}
    for k, _ in METRICS:
        vals = [per[s][k]["mean"] for s in names if per[s][k]["mean"] is not None]
        out[k] = float(np.mean(vals)) if vals else None
    r = [per[s]["volume_correlation"]["r"] for s in names if per[s]["volume_correlation"]["r"] is not None]
    out["volume_correlation"] = float(np.mean(r)) if r else None
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    """Per-case rows as CSV (undefined values as empty cells)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return path


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj, path: Path) -> Path:
    """JSON with undefined values (nan/inf) written as null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")
    return path


def _cell(stats: dict | float | None, digits: int = 3) -> str:
    if isinstance(stats, dict):
        if stats["mean"] is None:
            return f"- ({stats['n_undefined']} undef.)" if stats["n_undefined"] else "-"
        text = f"{stats['mean']:.{digits}f}"
        return text + (f" ({stats['n_undefined']} undef.)" if stats["n_undefined"] else "")
    return "-" if stats is None else f"{stats:.{digits}f}"


def markdown_table(summary: dict) -> str:
    """One row per structure (+ mean, + small-organ mean): mean of every metric, undefined counts,
    volume correlation; then detection AP and landmark lines when present."""
    seg = summary.get("segmentation")
    lines = []
    if seg:
        tol = summary.get("tolerance_mm")
        titles = [t if k != "surface_dice" else f"SDice@{tol:g}mm" for k, t in METRICS] + ["vol r"]
        lines += ["| structure | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
        for s, e in seg["per_structure"].items():
            cells = [_cell(e[k]) for k, _ in METRICS] + [_cell(e["volume_correlation"]["r"])]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        for title, block in [("**mean**", seg["mean"]), ("**mean small organs**", seg.get("small_organs", {}).get("mean"))]:
            if block:
                lines.append(f"| {title} | " + " | ".join(_cell(block[k]) for k, _ in METRICS)
                             + f" | {_cell(block['volume_correlation'])} |")
        if summary.get("human_reference"):
            from organmtl.evaluation.human_reference import markdown_rows, per_structure_dice

            lines += markdown_rows(summary["human_reference"]) + ["", per_structure_dice(summary)]
    det = summary.get("detection")
    if det:
        lines += ["", "| detection | mAP@[.5:.95] | AP50 | AP75 |", "|---|---|---|---|"]
        for iou_type, d in det.items():
            if isinstance(d, dict) and "mAP" in d:
                lines.append(f"| {iou_type} | {_cell(d['mAP'])} | {_cell(d['AP50'])} | {_cell(d['AP75'])} |")
    lm = summary.get("landmarks")
    if lm:
        rates = " | ".join(f"{v * 100:.1f}%" if v is not None else "-" for v in lm["identification_rates"].values())
        lines += ["", "| landmarks | n | mean error mm | median mm | " +
                  " | ".join(f"ID rate <= {k}" for k in lm["identification_rates"]) + " |",
                  "|---" * (4 + len(lm["identification_rates"])) + "|",
                  f"| all | {lm['n_landmarks']} | {_cell(lm['error_mm']['mean'], 2)} | "
                  f"{_cell(lm['error_mm']['median'], 2)} | {rates} |"]
    ce = summary.get("centres")
    if ce:
        keys = list(ce["identification_rates"])
        lines += ["", "| SOL-Net centres | n | mean error mm | median mm | "
                  + " | ".join(f"ID rate <= {k}" for k in keys) + " |", "|---" * (4 + len(keys)) + "|"]
        for name, e in [("all", ce), *ce["per_organ"].items()]:
            rates = " | ".join(_rate(e["identification_rates"][k]) for k in keys)
            lines.append(f"| {name} | {e['error_mm']['n'] + e['error_mm']['n_undefined']} | "
                         f"{_cell(e['error_mm']['mean'], 2)} | {_cell(e['error_mm']['median'], 2)} | {rates} |")
    return "\n".join(lines)


def _rate(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v * 100:.1f}%"


#: our summary's file name: never nnU-Net's ``summary.json``, which ``load_summary_json`` (and with it
#: ``nnUNetv2_find_best_configuration`` / ``nnUNetv2_determine_postprocessing``) reads in the same folders
SUMMARY_JSON = "organmtl_summary.json"


def write_outputs(rows: list[dict], summary: dict, out_dir: Path, landmark_rows: list[dict] | None = None,
                  centre_rows: list[dict] | None = None) -> dict:
    """``per_case.csv`` (+ ``landmarks_per_case.csv``, ``centres_per_case.csv``), ``organmtl_summary.json``
    (:data:`SUMMARY_JSON`), ``summary.md`` in ``out_dir``; returns their paths. None of these names is
    one nnU-Net writes, so an nnU-Net prediction or validation folder keeps its own files."""
    out_dir = Path(out_dir)
    paths = {}
    if rows:
        paths["per_case_csv"] = write_csv(rows, out_dir / "per_case.csv")
    if landmark_rows:
        paths["landmarks_csv"] = write_csv(landmark_rows, out_dir / "landmarks_per_case.csv")
    if centre_rows:
        paths["centres_csv"] = write_csv(centre_rows, out_dir / "centres_per_case.csv")
    paths["summary_json"] = write_json(summary, out_dir / SUMMARY_JSON)
    md = out_dir / "summary.md"
    md.write_text(f"# Evaluation of {summary.get('pred')}\n\nreference: {summary.get('gt')}\n\n"
                  + markdown_table(summary) + "\n")
    paths["summary_md"] = md
    return paths
