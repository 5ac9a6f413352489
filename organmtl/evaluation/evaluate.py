"""``organmtl evaluate PRED GT``: picks the volume (nnU-Net folder) or the COCO (results JSON)
evaluation from what PRED is, adds landmarks when landmark folders are found, and writes the
per-case CSV, summary JSON (``organmtl_summary.json``, never nnU-Net's ``summary.json``) and Markdown table."""
from __future__ import annotations

from pathlib import Path

from organmtl.evaluation.results import write_outputs
from organmtl.evaluation.volumes import EvaluationError


def default_out_dir(pred: Path) -> Path:
    """PRED itself for a prediction folder (beside nnU-Net's ``PRED/summary.json``, which is left as it
    is: ours is ``organmtl_summary.json``); for a COCO results file, ``<results stem>_evaluation`` beside it."""
    pred = Path(pred)
    return pred if pred.is_dir() else pred.parent / f"{pred.stem}_evaluation"


def run_evaluation(pred: Path, gt: Path, out_dir: Path | None = None, dataset_json: Path | None = None,
                   tolerance_mm: float = 2.0, score_threshold: float = 0.5, small_organs: list[str] | None = None,
                   landmarks_pred: Path | None = None, landmarks_gt: Path | None = None,
                   centres: Path | None = None, annotated_only: bool = False,
                   never_together: bool = False, reference_labels: Path | None = None) -> tuple[dict, dict]:
    """Evaluate and write the outputs; returns ``(summary, {output: path})``.

    PRED a folder -> nnU-Net volumes (GT: reference folder); PRED a ``.json`` file -> COCO instance
    results (GT: COCO ground-truth JSON). Landmarks: ``landmarks_pred``/``landmarks_gt`` folders of
    ``<case>.json``; by default ``PRED/landmarks/`` (or ``PRED/<case>.json`` beside the predicted
    volumes) and ``GT/../landmarks/`` when both exist. SOL-Net centres (FocusNet): ``centres``, a
    folder of ``<case>_centres.json``, by default PRED when it holds one for an evaluated case,
    against the organs' centres of mass in GT (:mod:`organmtl.evaluation.centres`).
    ``annotated_only``/``never_together``: partially labelled datasets (:mod:`organmtl.evaluation.partial`).
    ``reference_labels``: a second annotator's labels, scored against GT on the same cases as the
    "human reference" (:mod:`organmtl.evaluation.human_reference`)."""
    from organmtl.evaluation.centres import SUFFIX, evaluate_centre_folder
    from organmtl.evaluation.landmarks import evaluate_landmark_folders

    pred, gt = Path(pred), Path(gt)
    if tolerance_mm <= 0:
        raise EvaluationError(f"--tolerance-mm {tolerance_mm}: must be positive")
    if pred.is_dir():
        from organmtl.evaluation.volumes import evaluate_volume_folders

        rows, summary = evaluate_volume_folders(pred, gt, dataset_json, tolerance_mm, small_organs,
                                                annotated_only, never_together)
    elif pred.suffix == ".json" and pred.is_file():
        if annotated_only or never_together:
            raise EvaluationError(f"{pred}: --annotated-only / --never-together apply to nnU-Net prediction folders")
        from organmtl.evaluation.coco_eval import evaluate_coco

        rows, summary = evaluate_coco(pred, gt, tolerance_mm, score_threshold, small_organs)
    else:
        raise EvaluationError(f"{pred}: neither a prediction folder nor a COCO results .json file")
    lm_pred, lm_gt = landmarks_pred, landmarks_gt or gt.parent / "landmarks"
    cases = {str(r["case"]) for r in rows} if summary["kind"] == "nnunet" else None
    if lm_pred is None and pred.is_dir():
        # landmark predictions in PRED/landmarks/, or as PRED/<case>.json beside the volumes
        if (pred / "landmarks").is_dir():
            lm_pred = pred / "landmarks"
        elif any((pred / f"{c}.json").is_file() for c in cases or ()):
            lm_pred = pred
    lm_rows = None
    if landmarks_pred or landmarks_gt or (lm_pred is not None and lm_gt.is_dir()):
        for folder in (lm_pred, lm_gt):
            if folder is None or not Path(folder).is_dir():
                raise EvaluationError(f"{folder}: landmark folder not found (give --landmarks-pred and --landmarks-gt)")
        try:
            lm_rows, summary["landmarks"] = evaluate_landmark_folders(lm_pred, lm_gt, cases=cases)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
    centre_rows = None
    if centres is not None and not Path(centres).is_dir():
        raise EvaluationError(f"{centres}: centres folder not found")
    if centres is None and pred.is_dir() and any((pred / f"{c}{SUFFIX}").is_file() for c in cases or ()):
        centres = pred
    if centres is not None:
        if summary["kind"] != "nnunet":
            raise EvaluationError(f"{centres}: SOL-Net centres are scored against an nnU-Net reference folder")
        ending = summary["file_ending"]
        try:
            centre_rows, summary["centres"] = evaluate_centre_folder(centres, gt, ending, cases=cases)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
    if reference_labels is not None:     # a second annotator scored like a method (human_reference.py)
        from organmtl.evaluation.human_reference import add_human_reference

        add_human_reference(summary, rows, reference_labels, small_organs)
    paths = write_outputs(rows, summary, Path(out_dir) if out_dir else default_out_dir(pred), lm_rows, centre_rows)
    return summary, paths
