"""Evaluation of an nnU-Net prediction folder against a reference folder (volumes + dataset.json):
every structure (label or region) of every case, in mm with each case's own spacing."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from organmtl.evaluation.results import CONVENTIONS, structure_row, summarize_rows


class EvaluationError(ValueError):
    """Bad evaluation input (missing file, shape mismatch...): one line naming the thing."""


def find_dataset_json(pred: Path, gt: Path, dataset_json: Path | None = None) -> Path:
    """``dataset_json`` if given, else ``PRED/dataset.json`` (nnUNetv2_predict copies it there), else
    the raw dataset's ``GT/../dataset.json``."""
    candidates = [dataset_json] if dataset_json else [Path(pred) / "dataset.json", Path(gt).parent / "dataset.json"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise EvaluationError(f"dataset.json not found (looked at {', '.join(map(str, candidates))}); pass --dataset-json")


def structures_of(meta: dict) -> dict[str, object]:
    """{structure name: label value, or tuple of values for an nnU-Net region} of the dataset's
    foreground labels (background and ``ignore`` excluded), in dataset.json order."""
    out = {}
    for name, value in meta["labels"].items():
        if name in ("background", "ignore"):
            continue
        key = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)
        if key not in (0, (0,)):
            out[name] = key
    return out


def _mask(seg: np.ndarray, value) -> np.ndarray:
    return np.isin(seg, value) if isinstance(value, tuple) else seg == value


def _squeeze(arr: np.ndarray, spacing) -> tuple[np.ndarray, tuple]:
    """nnU-Net readers give (1, z, y, x); 2D datasets have z = 1 (spacing 999 for PNGs): drop it."""
    arr = arr[0]
    spacing = tuple(float(s) for s in spacing)
    if arr.ndim == 3 and arr.shape[0] == 1:
        return arr[0], spacing[1:]
    return arr, spacing


def evaluate_volume_folders(pred: Path, gt: Path, dataset_json: Path | None = None, tolerance_mm: float = 2.0,
                            small_organs: list[str] | None = None, annotated_only: bool = False,
                            never_together: bool = False) -> tuple[list[dict], dict]:
    """Per-case rows and the summary of an nnU-Net prediction folder.

    Files are read with the reader nnU-Net picks for the dataset (``file_ending``); TP/FP/FN are
    counted by nnU-Net's ``compute_tp_fp_fn_tn``; voxels of the ignore label (if declared) are
    removed from both masks. The prediction folder's cases are evaluated (each needs a reference);
    reference cases without a prediction are listed in the summary, as nnU-Net does.
    ``annotated_only`` / ``never_together``: partially labelled datasets (:mod:`organmtl.evaluation.partial`)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    pred, gt = Path(pred), Path(gt)
    for folder, what in [(pred, "prediction"), (gt, "reference")]:
        if not folder.is_dir():
            raise EvaluationError(f"{folder}: {what} folder not found")
    ds_json = find_dataset_json(pred, gt, dataset_json)
    meta = json.loads(ds_json.read_text())
    ending = meta.get("file_ending")
    if not ending:
        raise EvaluationError(f"{ds_json}: no file_ending")
    preds = sorted(pred.glob(f"*{ending}"))
    if not preds:
        raise EvaluationError(f"{pred}: no prediction files ending in {ending}")
    orphans = [p.name for p in preds if not (gt / p.name).is_file()]
    if orphans:
        raise EvaluationError(f"{gt}: no reference for prediction {orphans[0]} ({len(orphans)} in all)")
    # like nnU-Net's compute_metrics_on_folder: the cases of the prediction folder are evaluated;
    # reference cases without a prediction are listed in the summary
    unpredicted = sorted(r.name[: -len(ending)] for r in gt.glob(f"*{ending}") if not (pred / r.name).is_file())
    refs = [gt / p.name for p in preds]
    rw = determine_reader_writer_from_dataset_json(meta, str(refs[0]))()
    structures = structures_of(meta)
    ignore = meta["labels"].get("ignore")
    small = small_organs if small_organs is not None else meta.get("organmtl_small_organs")
    ann = None
    if annotated_only or never_together:
        from organmtl.evaluation import partial

        try:
            ann = partial.annotated_labels(meta, str(ds_json))
        except ValueError as e:
            raise EvaluationError(str(e)) from None
    rows = []
    for ref in tqdm(refs, desc="evaluate", unit="case", disable=None):
        case = ref.name[: -len(ending)]
        if annotated_only:
            try:
                case_structures = partial.annotated_structures(structures, ann, case)
            except KeyError as e:
                raise EvaluationError(f"{pred / ref.name}: {e.args[0]}") from None
        else:
            case_structures = structures
        g, g_props = rw.read_seg(str(ref))
        p, _ = rw.read_seg(str(pred / ref.name))
        if g.shape != p.shape:
            raise EvaluationError(f"{pred / ref.name}: shape {p.shape[1:]} differs from reference {g.shape[1:]}")
        g, spacing = _squeeze(g, g_props["spacing"])
        p, _ = _squeeze(p, g_props["spacing"])
        valid = None if ignore is None else g != ignore
        for name, value in case_structures.items():
            gm, pm = _mask(g, value), _mask(p, value)
            if valid is not None:
                gm, pm = gm & valid, pm & valid
            rows.append({"case": case, "structure": name, **structure_row(pm, gm, spacing, tolerance_mm),
                         "spacing_mm": "x".join(f"{s:g}" for s in spacing)})
    summary = {"kind": "nnunet", "pred": str(pred), "gt": str(gt), "dataset_json": str(ds_json),
               "file_ending": ending, "n_cases": len(refs), "reference_cases_without_prediction": unpredicted, "tolerance_mm": tolerance_mm, "conventions": CONVENTIONS,
               "segmentation": summarize_rows(rows, list(structures), small)}
    if annotated_only:
        summary["annotated_only"] = True
        summary["per_source"] = partial.per_source_summary(rows, meta, structures, str(ds_json),
                                                           lambda r, names: summarize_rows(r, names, None))
    if never_together:
        summary["never_annotated_together"] = partial.never_together_summary(meta, summary["segmentation"], str(ds_json))
    return rows, summary
