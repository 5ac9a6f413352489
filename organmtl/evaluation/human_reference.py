"""The human reference beside the methods: a second annotator's labels scored against the ground truth
(``organmtl evaluate PRED GT --reference-labels DIR``), with the same metrics as the predictions.

``DIR`` is either a PDDCA-layout folder (``DIR/<case>/structures/<Name>.nrrd``, names matched to the
dataset's label names case-insensitively; ``organmtl demo-data --han-source atlas`` writes one as
``han_pddca/reference``) or a folder of label maps like GT (``DIR/<case><file_ending>``, the same label
values). The cases scored are the evaluated ones (those of PRED). A structure whose file the reference
lacks is left out for that case (listed in ``missing``)."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from organmtl.evaluation.results import METRICS, _cell, structure_row, summarize_rows


def _pddca_structures(folder: Path) -> dict[str, Path]:
    return {p.name[: -len(".nrrd")].lower(): p for p in sorted(folder.glob("*.nrrd"))}


def evaluate_reference(reference: Path, gt: Path, cases: list[str], ending: str, rw, structures: dict,
                       small: list[str] | None, tolerance_mm: float, ignore=None) -> tuple[list[dict], dict]:
    """Rows and summary of the reference annotator against GT for ``cases`` (the evaluated ones)."""
    from organmtl.evaluation.volumes import EvaluationError, _mask, _squeeze

    reference = Path(reference)
    if not reference.is_dir():
        raise EvaluationError(f"{reference}: reference-labels folder not found")
    pddca = any((reference / c / "structures").is_dir() for c in cases)
    rows, missing = [], []
    for case in cases:
        g, props = rw.read_seg(str(gt / f"{case}{ending}"))
        g, spacing = _squeeze(g, props["spacing"])
        valid = None if ignore is None else g != ignore
        if pddca:
            files = _pddca_structures(reference / case / "structures")
            if not files:
                raise EvaluationError(f"{reference / case / 'structures'}: no reference structure files for case {case}")
        else:
            path = reference / f"{case}{ending}"
            if not path.is_file():
                raise EvaluationError(f"{path}: no reference label file for case {case}")
            r, _ = _squeeze(rw.read_seg(str(path))[0], props["spacing"])
            if r.shape != g.shape:
                raise EvaluationError(f"{path}: shape {r.shape} differs from GT {g.shape} of case {case}")
        for name, value in structures.items():
            gm = _mask(g, value)
            if pddca:
                path = files.get(name.lower())
                if path is None:
                    missing.append(f"{case}/{name}")
                    continue
                rm = sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0
                if rm.shape != gm.shape:
                    raise EvaluationError(f"{path}: shape {rm.shape} differs from GT {gm.shape} of case {case}")
            else:
                rm = _mask(r, value)
            if valid is not None:
                gm, rm = gm & valid, rm & valid
            rows.append({"case": case, "structure": name, **structure_row(rm, gm, spacing, tolerance_mm)})
    summary = summarize_rows(rows, list(structures), small)
    summary.update(reference=str(reference), layout="pddca" if pddca else "label maps",
                   n_cases=len(cases), missing=missing)
    return rows, summary


def markdown_rows(block: dict) -> list[str]:
    """The "human reference" rows of the evaluation table (mean, and small-organ mean when declared)."""
    lines = []
    for title, b in [("**human reference**", block["mean"]),
                     ("**human reference small organs**", block.get("small_organs", {}).get("mean"))]:
        if b:
            lines.append(f"| {title} | " + " | ".join(_cell(b[k]) for k, _ in METRICS)
                         + f" | {_cell(b['volume_correlation'])} |")
    return lines


def per_structure_dice(summary: dict) -> str:
    """A two-column table: each structure's mean Dice of the prediction and of the human reference."""
    seg, hr = summary["segmentation"]["per_structure"], summary["human_reference"]["per_structure"]
    lines = ["| structure | Dice | human reference Dice |", "|---|---|---|"]
    for s in seg:
        lines.append(f"| {s} | {_cell(seg[s]['dice'])} | {_cell(hr.get(s, {}).get('dice'))} |")
    return "\n".join(lines)



def add_human_reference(summary: dict, rows: list[dict], reference: Path, small_organs: list[str] | None = None) -> list[dict]:
    """Score ``reference`` on the cases of an nnU-Net evaluation (``summary``/``rows`` of
    :func:`organmtl.evaluation.volumes.evaluate_volume_folders`), store it as
    ``summary["human_reference"]`` and return its rows."""
    import json

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from organmtl.evaluation.volumes import EvaluationError, structures_of

    if summary.get("kind") != "nnunet":
        raise EvaluationError(f"{reference}: --reference-labels applies to nnU-Net prediction folders")
    meta = json.loads(Path(summary["dataset_json"]).read_text())
    ending, gt = summary["file_ending"], Path(summary["gt"])
    cases = list(dict.fromkeys(str(r["case"]) for r in rows))
    rw = determine_reader_writer_from_dataset_json(meta, str(gt / f"{cases[0]}{ending}"))()
    small = small_organs if small_organs is not None else meta.get("organmtl_small_organs")
    ref_rows, block = evaluate_reference(reference, gt, cases, ending, rw, structures_of(meta), small,
                                         summary["tolerance_mm"], meta["labels"].get("ignore"))
    summary["human_reference"] = block
    return ref_rows
