"""Landmark evaluation: predicted vs reference ``landmarks/<case>.json`` files (the converters'
format, docs/converters.md "Landmarks"), matched by landmark name; error in mm (physical LPS
positions) and identification rates at 3/4/5 mm."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from organmtl.evaluation import metrics as M


def read_landmarks(path: Path) -> dict[str, np.ndarray]:
    """{name: LPS position in mm} of one landmark file."""
    try:
        data = json.loads(Path(path).read_text())
        return {lm["name"]: np.asarray(lm["lps_mm"], dtype=float) for lm in data["landmarks"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a landmark file with landmarks[].name/lps_mm ({e})") from None


def evaluate_landmark_folders(pred_dir: Path, gt_dir: Path, thresholds=(3, 4, 5),
                              cases: set[str] | None = None) -> tuple[list[dict], dict]:
    """Rows (case, landmark, error_mm, status) for every reference landmark of the evaluated cases
    and a summary. Evaluated cases: ``cases`` (e.g. those of the segmentation evaluation), else the
    cases with a prediction file (a raw dataset's folder also holds the training cases).

    A reference landmark that the prediction lacks (no file for the case, or no entry of that name)
    has an undefined error and counts as not identified; predicted landmarks absent from the
    reference are counted (``n_extra``) but not scored."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    wanted = set(cases) if cases is not None else {p.stem for p in pred_dir.glob("*.json")}
    refs = sorted(p for p in gt_dir.glob("*.json") if p.stem in wanted)
    if not refs:
        raise ValueError(f"{gt_dir}: no reference landmark file (*.json) for the evaluated cases")
    rows, n_extra = [], 0
    for ref in refs:
        gt = read_landmarks(ref)
        pf = pred_dir / ref.name
        pred = read_landmarks(pf) if pf.is_file() else {}
        n_extra += len(set(pred) - set(gt))
        for name, g in gt.items():
            p = pred.get(name)
            err = float(M.landmark_errors_mm(p[None], g[None])[0]) if p is not None else math.nan
            rows.append({"case": ref.stem, "landmark": name, "error_mm": err,
                         "status": "ok" if p is not None else "missing_prediction"})
    errors = [r["error_mm"] for r in rows]
    per_name = {}
    for name in dict.fromkeys(r["landmark"] for r in rows):
        e = [r["error_mm"] for r in rows if r["landmark"] == name]
        per_name[name] = {"error_mm": M.summarize(e), "identification_rates": M.identification_rates(e, thresholds)}
    summary = {"pred": str(pred_dir), "gt": str(gt_dir), "n_cases": len(refs), "n_landmarks": len(rows),
               "n_missing": sum(r["status"] != "ok" for r in rows), "n_extra": n_extra,
               "error_mm": M.summarize(errors), "identification_rates": M.identification_rates(errors, thresholds),
               "per_landmark": per_name}
    return rows, summary
