"""The task-subset experiments of Moeskops et al. ("Deep learning for multi-task medical image
segmentation in multiple modalities", §3.2, Fig. 1, §4; docs/multitask_cnn.md):
one network per non-empty subset of the tasks (2^T - 1; the paper's seven for three tasks),
evaluated with Dice per class, per-task output masking, cross-task confusion and, for binary
tasks, the Dice-optimal threshold chosen on validation cases.

Behind ``organmtl multitask-experiments``. Steps, all with nnU-Net's own tools:

1. (with source datasets) the ``merge`` converter (as ``organmtl convert merge``) -> one dataset,
   :func:`organmtl.nnunet_plans.plan_tiny` (as ``organmtl plan-tiny``);
2. per task, cases sorted by id. A task whose source had labelled test images (``imagesTs`` with
   ``labelsTs``; ``merge`` lists them as the task's ``test_cases``) is tested on those, read from
   ``imagesTs``/``labelsTs``, and its training cases (``imagesTr``) are only split into training and
   validation (the last ``n_val`` validate); a task without labelled test images holds out the last
   ``n_test`` of its training cases as test cases, the ``n_val`` before them validate, the rest train.
   Test images without a reference label map cannot be scored and are not used;
3. ``splits_final.json`` of the preprocessed dataset gets one "fold" per experiment (fold k trains
   on the training cases of subset k and validates on its validation cases), so experiment k is
   the stock ``nnUNetv2_train ID CONFIG k -tr TRAINER --npz``;
4. ``nnUNetv2_predict ... -f k --save_probabilities`` on the subset's test images;
5. the table (Markdown + CSV) from the saved probabilities
   (:mod:`organmtl.nnunet_trainers.multitask.evaluation`).

Every experiment keeps the union output layer of the merged dataset (the paper resizes it to the
subset's classes); classes of tasks outside the subset are never targets, and giving them to a voxel
counts as a cross-task confusion.
"""
from __future__ import annotations

import csv
import itertools
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from organmtl.nnunet_trainers.multitask.evaluation import (DiceOptimalThreshold, argmax_labels, confusion_rate,
                                                            dice_per_label, head_label_values, load_probabilities,
                                                            task_masked_labels, thresholded_labels)
from organmtl.nnunet_trainers.multitask.tasks import TaskTable
from organmtl.workflows.steps import convert

DEFAULT_TRAINER = "nnUNetTrainerOMTLTriplanar_Tiny"
COLUMNS = ("experiment", "tasks", "task", "class", "label", "n_test", "dice_argmax", "dice_task_masked",
           "dice_pr_threshold", "threshold", "confusion_median_pct", "confusion_mean_pct")


class ExperimentError(ValueError):
    """Bad input for the experiment runner (one line)."""


@dataclass
class Experiment:
    """Experiment ``index`` (1-based, the paper's numbering order: single tasks, pairs, ..., all)."""

    index: int
    tasks: tuple[str, ...]
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    #: the test cases that are the dataset's own test cases (``imagesTs``/``labelsTs``); the others
    #: are training cases held out (``imagesTr``/``labelsTr``)
    test_from_ts: list[str] = field(default_factory=list)

    @property
    def fold(self) -> int:
        return self.index - 1

    @property
    def name(self) -> str:
        return "+".join(self.tasks)


def task_subsets(tasks) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``tasks``, by size then in task order (§3.2: experiments 1-3 one
    task, 4-6 two tasks, 7 all three)."""
    tasks = list(tasks)
    return [c for k in range(1, len(tasks) + 1) for c in itertools.combinations(tasks, k)]


def split_task_cases(table: TaskTable, tasks, n_test: int, n_val: int,
                     labelled_test=None) -> dict[str, dict[str, list[str]]]:
    """Per task: ``{"train", "val", "test", "test_from_ts"}`` case lists (ids sorted).

    A task with test cases of its own (``Task.test_cases`` that are in ``labelled_test``, the test
    cases that have a ``labelsTs`` reference; None: all of them) is tested on those (all are in
    ``test_from_ts``) and its training cases are split into training and the last ``n_val`` for
    validation; ``n_test`` does not apply to it. Any other task holds out the last ``n_test`` of
    its training cases for testing and the ``n_val`` before them for validation."""
    out = {}
    for t in tasks:
        cases = sorted(table.tasks[t].cases)
        own = sorted(c for c in table.tasks[t].test_cases if labelled_test is None or c in labelled_test)
        held = 0 if own else n_test
        if len(cases) < held + n_val + 1:
            raise ExperimentError(f"task {t!r} has {len(cases)} training case(s); {held} test + {n_val} "
                                  f"validation + at least 1 training case are needed")
        test = own or (cases[len(cases) - held:] if held else [])
        val = cases[len(cases) - held - n_val:len(cases) - held] if n_val else []
        out[t] = {"train": cases[:len(cases) - held - n_val], "val": val, "test": test, "test_from_ts": own}
    return out


def plan_experiments(table: TaskTable, tasks, n_test: int = 2, n_val: int = 1, labelled_test=None) -> list[Experiment]:
    """The 2^T - 1 experiments with their case lists (:func:`split_task_cases`)."""
    unknown = [t for t in tasks if t not in table.tasks]
    if unknown:
        raise ExperimentError(f"{table.source}: unknown task(s) {unknown}; tasks are {table.names}")
    splits = split_task_cases(table, tasks, n_test, n_val, labelled_test)
    exps = []
    for i, subset in enumerate(task_subsets(tasks), start=1):
        e = Experiment(i, subset)
        for t in subset:
            e.train += splits[t]["train"]
            e.val += splits[t]["val"]
            e.test += splits[t]["test"]
            e.test_from_ts += splits[t]["test_from_ts"]
        exps.append(e)
    return exps


def write_splits(preprocessed_dataset: Path, experiments: list[Experiment]) -> Path:
    """nnU-Net's ``splits_final.json`` with fold k = experiment k + 1."""
    path = Path(preprocessed_dataset) / "splits_final.json"
    path.write_text(json.dumps([{"train": e.train, "val": e.val} for e in experiments], indent=1) + "\n")
    return path


# ---------------------------------------------------------------- evaluation of one experiment

def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ExperimentError(f"{path}: reference label map not found")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def evaluate_experiment(exp: Experiment, table: TaskTable, labels: dict, gt_dir: Path, val_prob_dir: Path,
                        test_prob_dir: Path, file_ending: str = ".nii.gz", test_gt_dir: Path | None = None) -> list[dict]:
    """Rows of the table for one experiment (§4): Dice per class with argmax, with per-task
    masking and (binary tasks) with the validation-chosen Dice-optimal threshold; confusion rates.
    References: ``gt_dir`` (``labelsTr``), ``test_gt_dir`` (``labelsTs``) for ``exp.test_from_ts``."""
    heads = head_label_values(labels)
    names = {int(v): k for k, v in labels.items()}
    thresholds: dict[str, float] = {}
    for t in exp.tasks:
        values = table.tasks[t].label_values
        if len(values) != 1:
            continue
        acc = DiceOptimalThreshold()
        for case in (c for c in exp.val if table.task_of(c) == t):
            probs = load_probabilities(val_prob_dir / f"{case}.npz")
            channel = int(np.flatnonzero(heads == values[0])[0])
            acc.add(probs[channel], _read_labels(gt_dir / f"{case}{file_ending}") == values[0])
        thresholds[t] = acc.best()[0]
    rows = []
    for t in exp.tasks:
        task = table.tasks[t]
        alien = table.alien_labels(t)
        scores = {k: {v: [] for v in task.label_values} for k in ("argmax", "masked", "threshold")}
        confusion = []
        cases = [c for c in exp.test if table.task_of(c) == t]
        for case in cases:
            probs = load_probabilities(test_prob_dir / f"{case}.npz")
            ref = _read_labels((test_gt_dir if case in exp.test_from_ts else gt_dir) / f"{case}{file_ending}")
            plain = argmax_labels(probs, heads)
            confusion.append(confusion_rate(plain, alien))
            variants = {"argmax": plain, "masked": task_masked_labels(probs, heads, task.classes)}
            if t in thresholds:
                variants["threshold"] = thresholded_labels(probs, heads, task.label_values[0], thresholds[t])
            for k, pred in variants.items():
                for v, d in dice_per_label(pred, ref, task.label_values).items():
                    scores[k][v].append(d)
        for v in task.label_values:
            mean = {k: (float(np.mean(s[v])) if s[v] else float("nan")) for k, s in scores.items()}
            rows.append({"experiment": exp.index, "tasks": exp.name, "task": t, "class": names.get(v, str(v)),
                         "label": v, "n_test": len(cases), "dice_argmax": mean["argmax"],
                         "dice_task_masked": mean["masked"],
                         "dice_pr_threshold": mean["threshold"] if t in thresholds else None,
                         "threshold": thresholds.get(t),
                         "confusion_median_pct": 100 * float(np.median(confusion)) if confusion else float("nan"),
                         "confusion_mean_pct": 100 * float(np.mean(confusion)) if confusion else float("nan")})
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The experiments table in Markdown (one row per experiment and class)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """``experiments.md`` and ``experiments.csv`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / "experiments.md", out / "experiments.csv"
    md.write_text(markdown_table(rows))
    with open(cs, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r[c] is None else r[c]) for c in COLUMNS})
    return md, cs


# ---------------------------------------------------------------- the runner

def copy_test_images(exp: Experiment, raw: Path, out: Path, n_channels: int, ending: str) -> Path:
    """Every channel of the experiment's test cases into ``out`` (the ``nnUNetv2_predict -i`` folder):
    the dataset's own test cases from ``imagesTs``, held-out training cases from ``imagesTr``."""
    out.mkdir(parents=True)
    for case in exp.test:
        images = Path(raw) / ("imagesTs" if case in exp.test_from_ts else "imagesTr")
        for c in range(n_channels):
            src = images / f"{case}_{c:04d}{ending}"
            if not src.is_file():
                raise ExperimentError(f"{src}: test image not found")
            shutil.copyfile(src, out / src.name)
    return out


def _dataset_folders(dataset_id: int) -> tuple[Path, Path, Path]:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    for var, value in (("nnUNet_raw", nnUNet_raw), ("nnUNet_preprocessed", nnUNet_preprocessed),
                       ("nnUNet_results", nnUNet_results)):
        if value is None or not str(value):
            raise ExperimentError(f"environment variable {var} is not set")
    try:
        name = convert_id_to_dataset_name(dataset_id)
    except RuntimeError:
        raise ExperimentError(f"dataset {dataset_id} not found under nnUNet_raw/nnUNet_preprocessed") from None
    return Path(str(nnUNet_raw)) / name, Path(str(nnUNet_preprocessed)) / name, Path(str(nnUNet_results)) / name


def prepare_dataset(sources, dataset_id: int, name: str, configuration: str, num_processes: int = 1) -> None:
    """Merge ``sources`` into dataset ``dataset_id`` (the ``merge`` converter) and plan/preprocess it
    (``plan_tiny``). A bad source raises :class:`~organmtl.converters.ConversionError`."""
    from organmtl.nnunet_plans import plan_tiny

    convert("merge", *sources, "--dataset-id", dataset_id, "--name", name)
    plan_tiny(dataset_id, configurations=(configuration,), num_processes=num_processes)


def run_experiments(dataset_id: int, out: Path, sources=None, name: str = "MultiTask", tasks=None,
                    trainer: str = DEFAULT_TRAINER, configuration: str = "3d_tiny", n_test: int = 2, n_val: int = 1,
                    epochs: int | None = None, iterations: int | None = None, val_iterations: int | None = None,
                    device: str = "cpu", timeout: float | None = None) -> dict:
    """Train and evaluate every task subset; returns ``{"rows", "markdown", "csv", "experiments"}``."""
    from organmtl.procs import run_in_group, venv_bin

    out = Path(out)
    if sources:
        prepare_dataset(sources, dataset_id, name, configuration)
    raw, pre, results = _dataset_folders(dataset_id)
    meta = json.loads((raw / "dataset.json").read_text())
    plans = pre / "nnUNetPlans.json"
    if not plans.is_file() or configuration not in json.loads(plans.read_text())["configurations"]:
        raise ExperimentError(f"{plans}: configuration {configuration!r} not planned (run organmtl plan-tiny -d "
                              f"{dataset_id} -c {configuration})")
    if "organmtl_tasks" not in meta:
        raise ExperimentError(f"{raw / 'dataset.json'}: no organmtl_tasks (make the dataset with organmtl convert merge)")
    table = TaskTable.from_dataset_json(meta, source=str(raw / "dataset.json"))
    tasks = list(tasks or table.names)
    if len(tasks) < 1:
        raise ExperimentError("no tasks to run")
    ending = meta["file_ending"]
    labelled_test = {c for t in tasks if t in table.tasks for c in table.tasks[t].test_cases
                     if (raw / "labelsTs" / f"{c}{ending}").is_file()}
    experiments = plan_experiments(table, tasks, n_test, n_val, labelled_test)
    write_splits(pre, experiments)
    n_channels = len(meta["channel_names"])
    env = {k: str(v) for k, v in (("ORGANMTL_EPOCHS", epochs), ("ORGANMTL_ITERS_PER_EPOCH", iterations),
                                  ("ORGANMTL_VAL_ITERS", val_iterations)) if v is not None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiments.json").write_text(json.dumps(
        {"dataset_id": dataset_id, "trainer": trainer, "configuration": configuration,
         "experiments": [e.__dict__ for e in experiments]}, indent=1) + "\n")
    rows = []
    for exp in tqdm(experiments, desc="multitask experiments", unit="experiment"):
        folder = out / f"experiment_{exp.index}"
        if folder.exists():
            shutil.rmtree(folder)
        inp = copy_test_images(exp, raw, folder / "test_images", n_channels, ending)
        run_in_group([venv_bin("nnUNetv2_train"), str(dataset_id), configuration, str(exp.fold), "-tr", trainer,
                      "-device", device, "--npz"], env=env, log_file=folder / "train.log", timeout=timeout)
        run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(inp), "-o", str(folder / "prediction"), "-d",
                      str(dataset_id), "-c", configuration, "-f", str(exp.fold), "-tr", trainer, "-device", device,
                      "--save_probabilities", "--disable_tta", "-npp", "1", "-nps", "1"],
                     env=env, log_file=folder / "predict.log", timeout=timeout)
        fold_dir = results / f"{trainer}__nnUNetPlans__{configuration}" / f"fold_{exp.fold}"
        rows += evaluate_experiment(exp, table, meta["labels"], raw / "labelsTr", fold_dir / "validation",
                                    folder / "prediction", ending, raw / "labelsTs")
        write_table(rows, out)
    md, cs = write_table(rows, out)
    return {"rows": rows, "markdown": md, "csv": cs, "experiments": experiments}
