"""Evaluation of models trained on partially labelled, merged datasets (docs/partial_labels.md).

- ``organmtl evaluate PRED GT --annotated-only``: every case is scored only on the classes its
  source annotated (``organmtl_annotated_labels`` of the merged dataset.json, written by ``convert
  merge``; else its task's labels): a source's reference calls the other sources' organs
  background, so scoring them there would count correct predictions as false positives. The
  summary adds ``per_source``: the same metrics per source dataset, over its own classes.
- ``--never-together``: on a reference with the full truth (the demo's ``full_truth`` phantoms),
  the classes that no training case of the dataset annotated together with some other class, their
  pairs and their mean Dice (``never_annotated_together`` in the summary).
"""
from __future__ import annotations

from organmtl.nnunet_trainers.multitask.partial_labels import AnnotatedLabels
from organmtl.nnunet_trainers.multitask.tasks import TaskTable


def annotated_labels(meta: dict, source: str) -> AnnotatedLabels:
    """Which labels each case of the dataset annotated (errors name ``source``)."""
    n = 1 + max(int(v) for k, v in meta["labels"].items() if not isinstance(v, (list, tuple)) and k != "ignore")
    return AnnotatedLabels.from_dataset_json(meta, n, source)


def annotated_structures(structures: dict, ann: AnnotatedLabels, case: str) -> dict:
    """The structures (``{name: value}``) of ``structures`` that ``case``'s source annotated."""
    values = ann.of(case)
    return {name: v for name, v in structures.items() if isinstance(v, int) and v in values}


def _task_table(meta: dict, source: str) -> TaskTable | None:
    if meta.get("organmtl_tasks") is None:
        return None
    return TaskTable.from_dataset_json(meta, source)


def per_source_summary(rows: list[dict], meta: dict, structures: dict, source: str, summarize) -> dict:
    """``{task: summary of its cases' rows over its own structures}`` (``summarize(rows, names)``)."""
    table = _task_table(meta, source)
    if table is None:
        return {}
    out = {}
    for task in table.names:
        mine = [r for r in rows if table.task_of_prediction(str(r["case"])) == task]
        if not mine:
            continue
        own = set(table.tasks[task].label_values)
        out[task] = summarize(mine, [n for n, v in structures.items() if isinstance(v, int) and v in own])
    return out


def training_cases(meta: dict, ann: AnnotatedLabels) -> list[str]:
    """The training cases (``organmtl_tasks`` cases, else every case the record lists)."""
    tasks = meta.get("organmtl_tasks")
    if tasks:
        return [c for t in tasks.values() for c in t.get("cases", ())]
    return ann.cases()


def never_together_summary(meta: dict, seg_summary: dict, source: str) -> dict:
    """Pairs of structures no training case annotated together, the structures in them and their
    mean Dice on this evaluation (meaningful on a full-truth reference)."""
    ann = annotated_labels(meta, source)
    names = {int(v): k for k, v in meta["labels"].items() if not isinstance(v, (list, tuple))}
    pairs = ann.never_together(training_cases(meta, ann))
    in_pairs = sorted({v for p in pairs for v in p})
    per = seg_summary["per_structure"]
    dice = {names[v]: per[names[v]]["dice"]["mean"] for v in in_pairs if names.get(v) in per}
    vals = [d for d in dice.values() if d is not None]
    return {"pairs": [[names[a], names[b]] for a, b in pairs], "structures": list(dice), "dice": dice,
            "mean_dice": sum(vals) / len(vals) if vals else None}
