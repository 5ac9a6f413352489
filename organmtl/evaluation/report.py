"""``organmtl report RUN_DIR``: learning curves, prediction-vs-reference overlays and an evaluation
table of a run, on one Markdown page (``report.md``) linking the pictures.

RUN_DIR may be an nnU-Net fold folder (``fold_N`` with ``training_log_*.txt`` / checkpoints and
``validation/``), an nnU-Net results folder (``Trainer__Plans__config`` holding ``fold_*``), a
Detectron2 ``OUTPUT_DIR`` (``metrics.json``, ``inference/coco_instances_results.json``) or an
``organmtl demo`` output folder (marker ``.organmtl-demo``)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from organmtl.evaluation import curves
from organmtl.evaluation.results import markdown_table

DEMO_MARKER = ".organmtl-demo"


class ReportError(ValueError):
    """RUN_DIR is missing or of no known kind: one line."""


def _is_fold(d: Path) -> bool:
    return d.is_dir() and (any(d.glob("training_log_*.txt")) or any(d.glob("checkpoint_*.pth"))
                           or (d.name.startswith("fold_") and (d / "validation").is_dir()))


def detect_run_kind(run_dir: Path) -> str:
    """``demo``, ``nnunet_fold``, ``nnunet_results`` or ``detectron2``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a folder")
    if (run_dir / DEMO_MARKER).is_file():
        return "demo"
    if _is_fold(run_dir):
        return "nnunet_fold"
    if any(_is_fold(d) for d in run_dir.glob("fold_*")):
        return "nnunet_results"
    if (run_dir / "metrics.json").is_file() or _coco_results(run_dir):
        return "detectron2"
    raise ReportError(f"{run_dir}: no nnU-Net fold (training_log_*.txt, checkpoint_*.pth), no fold_* folders, "
                      f"no Detectron2 metrics.json and no {DEMO_MARKER} marker: nothing to report")


def _coco_results(run: Path) -> list[Path]:
    """COCOEvaluator's results files: ``inference/coco_instances_results.json`` or, with one folder
    per test dataset, ``inference/<dataset>/coco_instances_results.json``."""
    return sorted((run / "inference").glob("coco_instances_results.json")) + \
        sorted((run / "inference").glob("*/coco_instances_results.json"))


class _Page:
    def __init__(self, out_dir: Path):
        self.out_dir, self.lines = out_dir, []

    def add(self, *lines: str):
        self.lines.extend(lines)

    def image(self, png: Path, caption: str):
        self.add(f"![{caption}]({os.path.relpath(png, self.out_dir)})", "")

    def link(self, path: Path, caption: str):
        self.add(f"- [{caption}]({os.path.relpath(path, self.out_dir)})")


def _evaluate_and_overlay(page: _Page, pred: Path, gt: Path, images: Path | None, dataset_json: Path,
                          out_dir: Path, max_cases: int) -> None:
    """Our evaluation of ``pred`` vs ``gt`` into ``out_dir/evaluation`` (table on the page), then
    overlays of the ``max_cases`` cases with the lowest mean Dice."""
    from organmtl.evaluation.evaluate import run_evaluation
    from organmtl.evaluation.overlays import overlay_case
    from organmtl.evaluation.volumes import EvaluationError

    try:
        summary, paths = run_evaluation(pred, gt, out_dir=out_dir / "evaluation", dataset_json=dataset_json)
    except EvaluationError as e:
        page.add(f"Evaluation skipped: {e}", "")
        return
    page.add(markdown_table(summary), "")
    for what, p in paths.items():
        page.link(p, what)
    page.add("")
    if images is None or not images.is_dir():
        page.add(f"Overlays skipped: image folder {images} not found.", "")
        return
    meta = json.loads(Path(summary["dataset_json"]).read_text())
    ending = meta["file_ending"]
    import csv

    dice: dict[str, list[float]] = {}
    with open(paths["per_case_csv"]) as f:
        for row in csv.DictReader(f):
            dice.setdefault(row["case"], []).append(float(row["dice"]))
    worst = sorted(dice, key=lambda c: sum(dice[c]) / len(dice[c]))[:max_cases]
    for case in worst:
        image = images / f"{case}_0000{ending}"
        if not image.is_file():
            page.add(f"Overlay of {case} skipped: {image} not found.", "")
            continue
        png = overlay_case(image, gt / f"{case}{ending}", pred / f"{case}{ending}", meta["labels"],
                           out_dir / "overlays" / f"{case}.png")
        page.image(png, f"{case} (mean Dice {sum(dice[case]) / len(dice[case]):.3f})")


def _nnunet_fold(page: _Page, fold: Path, out_dir: Path, max_cases: int) -> None:
    series, source = curves.read_nnunet_progress(fold)
    page.add(f"## nnU-Net {fold.parent.parent.name} {fold.parent.name} {fold.name}", "")
    if series:
        page.add(f"Learning curves from {source}.", "")
        for png in curves.plot_nnunet_progress(series, out_dir, f"{fold.parent.parent.name} {fold.parent.name} {fold.name}"):
            page.image(png, png.stem)
    else:
        page.add("No training log or checkpoint with a logging dict found.", "")
    val = fold / "validation"
    dataset_json = fold.parent / "dataset.json"
    dataset = fold.parent.parent.name
    pre, raw = os.environ.get("nnUNet_preprocessed"), os.environ.get("nnUNet_raw")
    gt = Path(pre) / dataset / "gt_segmentations" if pre else None
    if val.is_dir() and gt is not None and gt.is_dir() and dataset_json.is_file():
        page.add("### Validation predictions", "")
        images = Path(raw) / dataset / "imagesTr" if raw else None
        _evaluate_and_overlay(page, val, gt, images, dataset_json, out_dir, max_cases)
    elif val.is_dir():
        page.add(f"Validation not evaluated: reference {gt} (nnUNet_preprocessed/{dataset}/gt_segmentations) "
                 "or dataset.json not found.", "")


def _detectron(page: _Page, run: Path, out_dir: Path, coco_gt: Path | None, coco_images: Path | None) -> None:
    page.add(f"## Detectron2 {run.name}", "")
    metrics = run / "metrics.json"
    if metrics.is_file():
        records = curves.read_detectron_metrics(metrics)
        page.add(f"Learning curves from {metrics} ({len(records)} records).", "")
        for png in curves.plot_detectron_metrics(records, out_dir, run.name):
            page.image(png, png.stem)
    final = run / "final_metrics.json"
    if final.is_file():
        page.add("Final COCOEvaluator metrics:", "", "```", final.read_text().strip(), "```", "")
    results = _coco_results(run)
    if coco_gt and results:
        from organmtl.evaluation.evaluate import run_evaluation
        from organmtl.evaluation.overlays import overlay_coco

        for res in results:
            sub = out_dir if len(results) == 1 else out_dir / res.parent.name
            page.add(f"### {res.relative_to(run)} vs {coco_gt}", "")
            summary, paths = run_evaluation(res, coco_gt, out_dir=sub / "evaluation")
            page.add(markdown_table(summary), "")
            for what, p in paths.items():
                page.link(p, what)
            page.add("")
            images = coco_images or Path(coco_gt).parent.parent / "images"
            if images.is_dir():
                page.image(overlay_coco(coco_gt, res, images, sub / "overlays" / "coco.png"), "overlays")
    elif results:
        page.add("Pass --coco-gt (and --coco-images) for the evaluation table and overlays of "
                 + ", ".join(str(r.relative_to(run)) for r in results) + ".", "")


def _demo(page: _Page, run: Path, out_dir: Path, max_cases: int) -> None:
    if (run / "summary.md").is_file():
        page.link(run / "summary.md", "demo summary")
        page.add("")
    raws = sorted((run / "nnUNet_raw").glob("Dataset*"))
    for pred in sorted((run / "predictions").glob("*")):
        if not pred.is_dir():
            continue
        page.add(f"## Predictions {pred.name}", "")
        ds = next((r for r in raws if (r / "labelsTs").is_dir()), None)
        if ds is None:
            page.add("No nnUNet_raw/Dataset*/labelsTs to compare with.", "")
            continue
        _evaluate_and_overlay(page, pred, ds / "labelsTs", ds / "imagesTs", ds / "dataset.json",
                              out_dir / pred.name, max_cases)
    for fold in sorted((run / "nnUNet_results").glob("*/*/fold_*")):
        if _is_fold(fold):     # one folder per dataset: studies share trainers (the stock baseline)
            _nnunet_fold(page, fold, out_dir / fold.parent.parent.name / fold.parent.name, 0)
    for det in sorted((run / "detectron2").glob("*")):
        if (det / "metrics.json").is_file():
            coco = next(iter(sorted((run / "coco").glob("*/annotations/instances_val.json"))), None)
            _detectron(page, det, out_dir / det.name, coco, None)


def write_report(run_dir: Path, out_dir: Path | None = None, max_cases: int = 3, coco_gt: Path | None = None,
                 coco_images: Path | None = None) -> Path:
    """Write the pictures and ``report.md`` into ``out_dir`` (default ``RUN_DIR/report``)."""
    run_dir = Path(run_dir).resolve()
    kind = detect_run_kind(run_dir)
    out_dir = Path(out_dir or run_dir / "report").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    page = _Page(out_dir)
    page.add(f"# Report: {run_dir.name}", "", f"- run folder: `{run_dir}` ({kind})",
             f"- written: {time.strftime('%Y-%m-%d %H:%M:%S')}", "")
    if kind == "nnunet_fold":
        _nnunet_fold(page, run_dir, out_dir, max_cases)
    elif kind == "nnunet_results":
        for fold in sorted(run_dir.glob("fold_*")):
            if _is_fold(fold):
                _nnunet_fold(page, fold, out_dir / fold.name, max_cases)
    elif kind == "detectron2":
        _detectron(page, run_dir, out_dir, coco_gt, coco_images)
    else:
        _demo(page, run_dir, out_dir, max_cases)
    md = out_dir / "report.md"
    md.write_text("\n".join(page.lines) + "\n")
    return md
