"""SOL-Net localisation (FocusNetv2 paper, Table 7): predicted small-organ centres vs the centre of
mass of each organ in the reference label map; error in mm and identification rates at 3/4/5 mm.

Predictions: the ``<case>_centres.json`` files that FocusNet writes for its validation cases
(``fold_X/validation/``) and that ``organmtl predict-centres`` writes for any image folder
(docs/focusnetv2.md "Centres"; format ``organmtl.focusnet.centres/1``:
``{"centres": {organ: {"label", "world_mm": [x, y, z], ...}}}``, physical coordinates of the image).
The reference centre of an organ is the centre of mass of its voxels (label value ``label``) in the
reference label map ``GT/<case><file_ending>``, mapped to the same physical frame, which is the
point SOL-Net is trained to find (``roi.mask_centre``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from organmtl.evaluation import metrics as M

SUFFIX = "_centres.json"
FORMAT = "organmtl.focusnet.centres/1"


def read_centres(path: Path) -> dict[str, dict]:
    """``{organ: {"label": int, "world_mm": array (3,)}}`` of one centres file."""
    try:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
        return {name: {"label": int(c["label"]), "world_mm": np.asarray(c["world_mm"], dtype=float).reshape(3)}
                for name, c in data["centres"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a SOL-Net centres file with centres.<organ>.label/world_mm ({e})") from None


def reference_centres(label_file: Path, labels: dict[str, int]) -> dict[str, np.ndarray | None]:
    """Physical centre of mass (x, y, z mm) of each ``{organ: label value}`` in a label map file;
    ``None`` for an organ absent from it."""
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(label_file))
    except RuntimeError as e:
        raise ValueError(f"{label_file}: unreadable reference label map ({str(e).strip().splitlines()[-1]})") from None
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim != 3:
        raise ValueError(f"{label_file}: SOL-Net centres are 3D; the reference label map has {arr.ndim} dimensions")
    out = {}
    for name, value in labels.items():
        idx = np.argwhere(arr == value)
        if len(idx) == 0:
            out[name] = None
            continue
        z, y, x = idx.mean(0)
        out[name] = np.asarray(img.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z))))
    return out


def evaluate_centre_folder(centres_dir: Path, gt_dir: Path, file_ending: str = ".nii.gz",
                           cases: set[str] | None = None, thresholds=(3, 4, 5)) -> tuple[list[dict], dict]:
    """Rows (case, organ, label, error_mm, status) and a summary (like the landmark evaluation:
    ``error_mm`` statistics, ``identification_rates``, ``per_organ``).

    Evaluated cases: ``cases`` (e.g. those of the segmentation evaluation), else those with a
    centres file. Organs: every organ named in the folder's centres files. An organ present in the reference
    whose prediction is missing (no file for the case, or no entry) has an undefined error and
    counts as not identified; an organ absent from the reference is not scored (``n_no_reference``)."""
    centres_dir, gt_dir = Path(centres_dir), Path(gt_dir)
    files = {p.name[:-len(SUFFIX)]: p for p in sorted(centres_dir.glob(f"*{SUFFIX}"))}
    wanted = sorted(set(cases) if cases is not None else set(files))
    if not any(c in files for c in wanted):
        raise ValueError(f"{centres_dir}: no SOL-Net centres file (<case>{SUFFIX}) for the evaluated cases")
    every = {c: read_centres(p) for c, p in files.items()}
    preds = {c: every[c] for c in wanted if c in every}
    organs: dict[str, int] = {}
    for case, rec in every.items():
        for name, c in rec.items():
            if organs.setdefault(name, c["label"]) != c["label"]:
                raise ValueError(f"{files[case]}: organ {name!r} has label {c['label']}, other files {organs[name]}")
    rows, n_no_ref = [], 0
    for case in wanted:
        ref_file = gt_dir / f"{case}{file_ending}"
        if not ref_file.is_file():
            raise ValueError(f"{ref_file}: no reference label map for centres of case {case!r}")
        refs = reference_centres(ref_file, organs)
        pred = preds.get(case, {})
        for name, ref in refs.items():
            if ref is None:
                n_no_ref += 1
                continue
            p = pred.get(name)
            err = float(M.landmark_errors_mm(p["world_mm"][None], ref[None])[0]) if p is not None else math.nan
            rows.append({"case": case, "organ": name, "label": organs[name], "error_mm": err,
                         "status": "ok" if p is not None else "missing_prediction"})
    if not rows:
        raise ValueError(f"{gt_dir}: none of the organs {sorted(organs)} is in the reference of the evaluated cases")
    errors = [r["error_mm"] for r in rows]
    per_organ = {}
    for name in organs:
        e = [r["error_mm"] for r in rows if r["organ"] == name]
        per_organ[name] = {"n": len(e), "error_mm": M.summarize(e),
                           "identification_rates": M.identification_rates(e, thresholds)}
    summary = {"pred": str(centres_dir), "gt": str(gt_dir), "n_cases": len(wanted), "n_centres": len(rows),
               "n_missing": sum(r["status"] != "ok" for r in rows), "n_no_reference": n_no_ref,
               "error_mm": M.summarize(errors), "identification_rates": M.identification_rates(errors, thresholds),
               "per_organ": per_organ}
    return rows, summary
