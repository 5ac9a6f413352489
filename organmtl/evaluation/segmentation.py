"""Per-label segmentation metrics of a prediction folder, computed by nnU-Net's own evaluation
(``compute_metrics_on_folder``: Dice, IoU, TP/FP/FN per case and mean), plus a text table."""
from __future__ import annotations

import json
from pathlib import Path


def evaluate_folders(pred: Path, gt: Path, dataset_json: Path, output_file: Path | None = None,
                     num_processes: int = 1, full_output_dir: Path | None = None, tolerance_mm: float = 2.0) -> dict:
    """nnU-Net's metrics of ``pred`` against ``gt``; returns ``{label_name: mean Dice, ...}`` and
    writes nnU-Net's full summary JSON to ``output_file`` (default ``pred/summary.json``).

    With ``full_output_dir`` (may be the folder of ``output_file``), also runs organmtl's evaluation
    (``organmtl.evaluation.evaluate.run_evaluation``: HD/HD95 in mm, surface Dice at ``tolerance_mm``,
    volumes, landmarks) and writes per_case.csv, organmtl_summary.json and summary.md there."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    meta = json.loads(Path(dataset_json).read_text())
    ending = meta["file_ending"]
    example = next(Path(gt).glob(f"*{ending}"), None)
    if example is None:
        raise FileNotFoundError(f"{gt}: no files ending in {ending}")
    rw = determine_reader_writer_from_dataset_json(meta, str(example))()
    lm = LabelManager(meta["labels"], regions_class_order=meta.get("regions_class_order"))
    output_file = Path(output_file or Path(pred) / "summary.json")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    result = compute_metrics_on_folder(str(gt), str(pred), str(output_file), rw, ending,
                                       lm.foreground_labels, lm.ignore_label, num_processes)
    names = {v: k for k, v in meta["labels"].items() if isinstance(v, int)}
    if full_output_dir is not None:
        from organmtl.evaluation.evaluate import run_evaluation

        run_evaluation(pred, gt, out_dir=full_output_dir, dataset_json=dataset_json, tolerance_mm=tolerance_mm)
    return {names[label]: float(m["Dice"]) for label, m in result["mean"].items()}


def format_table(columns: dict[str, dict[str, float]], metric: str = "Dice") -> str:
    """Markdown table: one row per structure, one column per run (mean ``metric``)."""
    rows = list(dict.fromkeys(k for col in columns.values() for k in col))
    header = f"| structure | {' | '.join(columns)} |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for r in rows + ["mean"]:
        cells = []
        for col in columns.values():
            vals = list(col.values())
            v = (sum(vals) / len(vals) if vals else float("nan")) if r == "mean" else col.get(r)
            cells.append("-" if v is None else f"{v:.3f}")
        lines.append(f"| {r} | {' | '.join(cells)} |")
    return f"{metric} per structure\n" + "\n".join(lines)
