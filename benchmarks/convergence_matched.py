"""Matched, seeded nnU-Net comparisons of the convergence benchmark (issue 26): the multi-task CNN
(Moeskops et al.) and the landmark U-Nets (abdomen), on equal terms. Not in CI.

The unmatched studies of ``benchmarks/convergence.py`` ("multitask", "abdomen") stopped at CPU-second
caps, which decided who trained longer, and have 2 seeds. Here, as in its ``--spine-matched``
comparison:

- every arm trains a fixed number of iterations through the stock ``nnUNetv2_train`` with the
  ``_Tiny`` trainers' schedule variables (``ORGANMTL_EPOCHS`` x ``ORGANMTL_ITERS_PER_EPOCH`` = 25,
  ``ORGANMTL_VAL_ITERS`` = 5; ``nnunet_trainers/budget.py``), with no CPU cap and no patience rule
  (:func:`plan` builds the runs, :func:`check_matched` refuses any other plan). Multi-task: the same
  number of iterations *per task* (the paper trains "25000 mini-batches per task"), so the all-tasks
  network gets 3x the iterations of a one-task network;
- every arm keeps nnU-Net's default augmentation (multitask: one trainer class for all arms; abdomen:
  every trainer inherits ``LandmarkChannelsTrainer``'s transforms, nnU-Net's pipeline with the landmark
  maps moved by the spatial transforms only);
- the checkpoint is nnU-Net's ``checkpoint_best.pth`` (EMA pseudo-Dice on the validation cases); its
  epoch is read from the checkpoint. Scoring is on held-out test cases never used for selection;
- seeds 0, 1, 2 through ``ORGANMTL_SEED``.

Data (in ``--work``, default ``~/.cache/organmtl/convergence``, not committed):

- multitask: the demo's brain MR / breast MR / cardiac CTA phantoms with :data:`MT_CASES` cases per task,
  converted and merged as the demo does (Dataset534); the splits of ``organmtl multitask-experiments``
  (:func:`organmtl.workflows.multitask_experiments.plan_experiments`, ``n_test`` = :data:`MT_TEST`,
  ``n_val`` = 1): per task 3 training, 1 validation (selection, and the Dice-optimal threshold of the binary
  tasks), 4 test cases. Arms: experiments 1-3 (one task) and 7 (all three), trainer
  ``nnUNetTrainerOMTLMultiTaskUNet_Tiny`` (the union output layer in every experiment).
  Scores per test case: Dice of the argmax over the union output layer (the paper's brain rule), Dice at
  the validation-chosen Dice-optimal threshold for the binary tasks (the paper's breast / cardiac rule,
  there chosen on the test set), and the task confusion the paper reports: the percentage of a scan's
  voxels labelled with a class of another task.
- abdomen: the demo's fat/water MR phantoms with hip-joint landmark heatmap channels (the demo's conversion)
  with :data:`AB_CASES` cases (Dataset538); one fold: the first 6 cases train, the next 2 validate, the last
  4 are test cases. Scores per test case: Dice and HD95 (mm, ``organmtl.evaluation.metrics``) per organ, on
  all organs and on those near the landmarks (``convergence.NEAR_LANDMARKS``); landmark error (mm) of the
  auxiliary-task arms from ``organmtl predict-landmarks`` on the test cases (and the trainer's logged
  validation-patch error at the selected epoch). The demo's landmark channel is one merged map, whose
  predicted peaks are unnamed: they are assigned to the hip landmarks by least total error (:func:`landmark_errors`).

Statistics: per arm, mean over the seeds (of each seed's mean over test cases) with the 95 % t interval
over seeds (``convergence.seed_ci``); paired differences (multitask: shared minus single-task per class;
abdomen: each landmark arm minus image only), paired by seed and test case, mean with the 95 % t interval
over those pairs (the same test cases recur across seeds, so the interval treats seed x case pairs as
independent units).

Budgets and time (estimated from the unmatched runs' JSONs in ``benchmarks/results/convergence/``:
``cpu_s.train`` / iterations there is ~0.20 CPU-s per training iteration for the multi-task U-Net, 0.17
(image only, early/late fusion) to 0.23 (joint, uncertainty) for the landmark U-Nets, validation iterations
included, after ~20 CPU-s start-up; prediction 20-40 CPU-s per run; one thread):

- multitask :data:`MT_ITERS_PER_TASK` = 400 iterations per task: one-task arms 400 it (16 epochs) ~ 2.5
  CPU-min each, the all-tasks arm 1200 it (48 epochs) ~ 5 CPU-min; 4 arms x 3 seeds ~ 38 CPU-min;
- abdomen :data:`AB_ITERS` = 500 iterations (20 epochs) for every arm: ~2-2.5 CPU-min a run (joint and
  uncertainty the slower); 5 arms x 3 seeds ~ 38 CPU-min.

So each study's matrix fits about 40 CPU-minutes on the shared 2-core machine, one run at a time. These
budgets are shorter than the unmatched runs (650-2150 iterations): classes that a network does not learn at
this budget say nothing about sharing; ``--iters`` sets another budget (every arm alike; records of
different budgets are never paired).

    heavy .venv/bin/python benchmarks/convergence_matched.py --multitask-matched --list
    heavy .venv/bin/python benchmarks/convergence_matched.py --multitask-matched --next     # first missing run
    heavy .venv/bin/python benchmarks/convergence_matched.py --multitask-matched --arm single_1 all --seed 0
    heavy .venv/bin/python benchmarks/convergence_matched.py --abdomen-matched --next
    .venv/bin/python benchmarks/convergence_matched.py --write-docs       # the docs subsections only

Bad options exit 2; a run that fails is reported and the next one runs (exit 1). One JSON per run in
``benchmarks/results/convergence/{multitask,abdomen}/matched/<arm>__seed<S>.json``
(iterations, seed, selected epoch, per-case scores, CPU seconds, ``code_revision``). Results for the
committed folder are refused from a working tree with uncommitted changes (``--results`` elsewhere for a
smoke run). The docs subsections ("Matched comparison (issue 26)" under each study of docs/benchmarks.md
"Convergence") are written from the committed folder only; ``convergence.py`` renders them too.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convergence as conv  # noqa: E402

RESULTS = conv.RESULTS
DOC = conv.DOC
RESUME = "heavy .venv/bin/python benchmarks/convergence_matched.py"
ITERS_PER_EPOCH, VAL_ITERS = 25, 5
SEEDS = (0, 1, 2)
CONFIGURATION = "3d_tiny"

MT_ITERS_PER_TASK = 400
MT_CASES, MT_TEST, MT_VAL = 8, 4, 1
MT_TRAINER = "nnUNetTrainerOMTLMultiTaskUNet_Tiny"
MT_DATASET, MT_SOURCES, MT_NAME = 534, (535, 536, 537), "MultiTaskMatched"
MT_TASK_DIRS = ("brain_mr", "breast_mr", "cardiac_cta")

AB_ITERS = 500
AB_CASES, AB_TRAIN, AB_VAL = 12, 6, 2          # the rest (4) are test cases
AB_DATASET, AB_NAME = 538, "AbdomenMatched"


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    trainer: str
    n_tasks: int = 1             # tasks the arm trains on: its iterations are n_tasks x the per-task budget
    experiment: int | None = None   # multitask: experiment (1-based) of plan_experiments
    landmarks: bool = False      # abdomen: an auxiliary-task arm (predicts landmark coordinates)


@dataclass(frozen=True)
class MatchedStudy:
    key: str                     # "multitask" | "abdomen"
    flag: str
    title: str
    arms: tuple[Arm, ...]
    iters_per_task: int
    baseline: str                # the arm the others are paired against

    def arm(self, key: str) -> Arm:
        for a in self.arms:
            if a.key == key:
                return a
        raise SystemExit(f"--arm {key!r}: {self.flag} has {', '.join(a.key for a in self.arms)}")


MULTITASK = MatchedStudy(
    "multitask", "--multitask-matched", "Brain MR + breast MR + cardiac CTA",
    (Arm("single_1", "task 1 only (brain)", MT_TRAINER, 1, 1),
     Arm("single_2", "task 2 only (breast)", MT_TRAINER, 1, 2),
     Arm("single_3", "task 3 only (cardiac)", MT_TRAINER, 1, 3),
     Arm("all", "all three tasks, one network", MT_TRAINER, 3, 7)),
    MT_ITERS_PER_TASK, "all")
ABDOMEN = MatchedStudy(
    "abdomen", "--abdomen-matched", "Fat/water MR with hip-joint landmarks",
    (Arm("image_only", "image only (nnU-Net)", "nnUNetTrainerOMTLLandmarkImageOnly_Tiny"),
     Arm("early_fusion", "landmarks as input (early fusion)", "nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny"),
     Arm("late_fusion", "landmarks as input (late fusion)", "nnUNetTrainerOMTLLandmarkLateFusion_Tiny"),
     Arm("joint", "landmarks as auxiliary task (joint tail)", "nnUNetTrainerOMTLLandmarkJoint_Tiny", landmarks=True),
     Arm("uncertainty", "auxiliary task, uncertainty weighting", "nnUNetTrainerOMTLLandmarkUncertainty_Tiny",
         landmarks=True)),
    AB_ITERS, "image_only")
STUDIES = {"multitask": MULTITASK, "abdomen": ABDOMEN}


# ---------------------------------------------------------------- the plan: equal iterations per task, no cap

def budget_env(arm: Arm, iters_per_task: int) -> dict[str, str]:
    """The schedule variables of one arm: ``n_tasks x iters_per_task`` iterations in epochs of 25."""
    iters = arm.n_tasks * iters_per_task
    if iters_per_task < 1 or iters % ITERS_PER_EPOCH:
        raise SystemExit(f"--iters {iters_per_task}: give a positive multiple of {ITERS_PER_EPOCH} "
                         f"(iterations per epoch)")
    return {"ORGANMTL_EPOCHS": str(iters // ITERS_PER_EPOCH), "ORGANMTL_ITERS_PER_EPOCH": str(ITERS_PER_EPOCH),
            "ORGANMTL_VAL_ITERS": str(VAL_ITERS)}


def plan(study: MatchedStudy, iters_per_task: int | None = None, seeds=SEEDS) -> list[dict]:
    """Every run of ``study`` (seed-major: all arms of seed 0 first), with what it is given: the
    schedule variables, the seed, no CPU cap and no patience rule."""
    per_task = iters_per_task or study.iters_per_task
    runs = []
    for seed in seeds:
        for arm in study.arms:
            env = {**budget_env(arm, per_task), "ORGANMTL_SEED": str(seed)}
            runs.append({"study": study.key, "arm": arm.key, "seed": seed, "env": env, "n_tasks": arm.n_tasks,
                         "iterations": int(env["ORGANMTL_EPOCHS"]) * int(env["ORGANMTL_ITERS_PER_EPOCH"]),
                         "iterations_per_task": per_task, "cap_cpu_s": None, "patience": None})
    check_matched(runs)
    return runs


def check_matched(runs: list[dict]) -> None:
    """The matched rule, checked: per study, the same iterations per task, validation iterations and epoch
    length for every arm, and no run with a CPU cap or a patience rule. Raises ValueError naming the run."""
    by_study: dict[str, tuple] = {}
    for r in runs:
        env = r["env"]
        iters = int(env["ORGANMTL_EPOCHS"]) * int(env["ORGANMTL_ITERS_PER_EPOCH"])
        if iters != r["iterations"] or iters % r["n_tasks"]:
            raise ValueError(f"{r['arm']} seed {r['seed']}: {iters} iterations for {r['n_tasks']} task(s)")
        if r["cap_cpu_s"] is not None or r["patience"] is not None:
            raise ValueError(f"{r['arm']} seed {r['seed']}: a CPU cap or patience rule would decide its length")
        if env.get("ORGANMTL_SEED") != str(r["seed"]):
            raise ValueError(f"{r['arm']} seed {r['seed']}: ORGANMTL_SEED is {env.get('ORGANMTL_SEED')}")
        key = (iters // r["n_tasks"], env["ORGANMTL_ITERS_PER_EPOCH"], env["ORGANMTL_VAL_ITERS"])
        if by_study.setdefault(r["study"], key) != key:
            raise ValueError(f"{r['arm']} seed {r['seed']}: (iterations per task, iterations per epoch, validation "
                             f"iterations) {key}, other arms {by_study[r['study']]}")


#: the trainer methods that make the training augmentation (and its data loading): every arm of a study must
#: resolve them to the same functions (nnU-Net's default pipeline, for the landmark trainers with the maps
#: protected from intensity transforms alike)
AUGMENTATION_METHODS = ("configure_rotation_dummyDA_mirroring_and_inital_patch_size", "get_training_transforms",
                        "get_validation_transforms", "get_dataloaders")
TRAINER_MODULES = ("organmtl.nnunet_trainers.multitask.trainers", "organmtl.nnunet_trainers.landmarks.input_trainers",
                   "organmtl.nnunet_trainers.landmarks.aux_trainers")


def trainer_class(name: str):
    import importlib

    for module in TRAINER_MODULES:
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    raise ValueError(f"trainer {name!r} is in none of {', '.join(TRAINER_MODULES)}")


def check_same_augmentation(study: MatchedStudy) -> None:
    """Every arm's trainer resolves :data:`AUGMENTATION_METHODS` to the same functions; ValueError otherwise."""
    first = trainer_class(study.arms[0].trainer)
    for arm in study.arms[1:]:
        cls = trainer_class(arm.trainer)
        for m in AUGMENTATION_METHODS:
            if getattr(cls, m) is not getattr(first, m):
                raise ValueError(f"{arm.trainer}.{m} is not {first.__name__}'s: the arms would train with "
                                 "different augmentation")


def check_committed(revision: str, results: Path) -> None:
    """Results for the committed folder come from committed code: refuse a dirty working tree there."""
    if Path(results).resolve() == RESULTS.resolve() and (revision.endswith("+uncommitted changes")
                                                         or revision == "unknown"):
        raise SystemExit(f"{RESULTS}: code revision {revision!r}; commit first (or use --results elsewhere)")


# ---------------------------------------------------------------- per-case scores (pure)

def score_multitask_case(probs, heads, ref, label_values, alien, threshold=None) -> dict:
    """One test case of a multi-task network: Dice per label value of the argmax over all union classes
    (paper §4, brain), Dice at ``threshold`` for a binary task (breast / cardiac), and the task confusion:
    the percentage of the case's voxels given a label of another task (``alien``)."""
    from organmtl.nnunet_trainers.multitask.evaluation import (argmax_labels, confusion_rate, dice_per_label,
                                                                thresholded_labels)

    plain = argmax_labels(probs, heads)
    out = {"confusion_pct": 100.0 * confusion_rate(plain, alien),
           "Dice": {int(v): d for v, d in dice_per_label(plain, ref, label_values).items()}}
    if threshold is not None:
        pred = thresholded_labels(probs, heads, label_values[0], threshold)
        out["Dice PR threshold"] = {int(v): d for v, d in dice_per_label(pred, ref, label_values).items()}
    return out


def score_abdomen_case(pred, ref, spacing_zyx, organs: dict[str, int]) -> dict:
    """Dice and HD95 (mm; nan where a mask is empty) per organ of one test case."""
    from organmtl.evaluation.metrics import dice, hausdorff_distance

    return {"Dice": {n: dice(pred == v, ref == v) for n, v in organs.items()},
            "HD95 mm": {n: hausdorff_distance(pred == v, ref == v, spacing_zyx, 95.0) for n, v in organs.items()}}


def landmark_errors(pred: dict, ref: dict) -> dict[str, float]:
    """Error (mm) of each reference landmark (name -> LPS position). A prediction with the landmark's name
    is its own; the unnamed peaks of a merged map (``organmtl predict-landmarks`` names them ``<channel> peak
    <k>``: one map holds every landmark) go to the remaining landmarks by the assignment of least total
    error (scipy's ``linear_sum_assignment``); a landmark left without a prediction: nan."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    out = {n: float(np.linalg.norm(np.asarray(pred[n], float) - np.asarray(g, float))) for n, g in ref.items()
           if n in pred}
    left = [n for n in ref if n not in out]
    peaks = [n for n in pred if n not in ref]
    if left and peaks:
        cost = np.array([[np.linalg.norm(np.asarray(pred[p], float) - np.asarray(ref[n], float)) for p in peaks]
                         for n in left])
        for i, j in zip(*linear_sum_assignment(cost)):
            out[left[i]] = float(cost[i, j])
    return {n: out.get(n, float("nan")) for n in ref}


# ---------------------------------------------------------------- statistics over records (pure)

def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def case_value(case: dict, metric: str, names) -> float:
    """Mean of ``metric`` over ``names`` (classes / organs) of one case's scores; nan if none is defined."""
    per = case.get(metric) or {}
    vals = [per[n] for n in names if n in per and _finite(per[n])]
    return sum(vals) / len(vals) if vals else float("nan")


def seed_means(records: list[dict], metric: str, names, cases=None) -> list[float]:
    """Per record (seed): the mean over its test cases (``cases``: only those) of :func:`case_value`."""
    out = []
    for r in sorted(records, key=lambda r: r["seed"]):
        vals = [case_value(c, metric, names) for k, c in sorted(r["per_case"].items()) if cases is None or k in cases]
        vals = [v for v in vals if _finite(v)]
        if vals:
            out.append(sum(vals) / len(vals))
    return out


def paired_differences(a: list[dict], b: list[dict], metric: str, names) -> list[float]:
    """``a`` minus ``b`` of :func:`case_value`, paired by seed and test case (both defined), in (seed, case) order."""
    by_seed = {r["seed"]: r for r in b}
    out = []
    for ra in sorted(a, key=lambda r: r["seed"]):
        rb = by_seed.get(ra["seed"])
        if rb is None:
            continue
        for case in sorted(set(ra["per_case"]) & set(rb["per_case"])):
            x, y = case_value(ra["per_case"][case], metric, names), case_value(rb["per_case"][case], metric, names)
            if _finite(x) and _finite(y):
                out.append(x - y)
    return out


def ci_text(values, digits: int = 3, signed: bool = False) -> str:
    """``mean [lo, hi] (n)`` with :func:`convergence.seed_ci`'s 95 % t interval; one value: no interval."""
    if not values:
        return "-"
    mean, lo, hi = conv.seed_ci(list(values))
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return (f.format(mean) + (f" [{f.format(lo)}, {f.format(hi)}]" if lo == lo else "") + f" (n={len(values)})")


def confusion_summary(records: list[dict], task: str) -> dict:
    """The paper's task-confusion figure for ``task``: median (and max) over the scans of every seed of
    the percentage of voxels labelled with another task's class."""
    vals = [c["confusion_pct"] for r in records for c in r["per_case"].values() if c.get("task") == task]
    if not vals:
        return {"n": 0, "median_pct": None, "max_pct": None}
    return {"n": len(vals), "median_pct": float(statistics.median(vals)), "max_pct": float(max(vals))}


# ---------------------------------------------------------------- records

def record_path(results: Path, study: str, arm: str, seed: int) -> Path:
    return Path(results) / study / "matched" / f"{arm}__seed{seed}.json"


def load_records(results: Path = RESULTS) -> dict[tuple[str, str, int], dict]:
    out = {}
    for study in STUDIES:
        for p in sorted((Path(results) / study / "matched").glob("*__seed*.json")):
            r = json.loads(p.read_text())
            out[(r["study"], r["arm"], int(r["seed"]))] = r
    return out


def save_record(results: Path, record: dict) -> Path:
    return conv.write_record(record_path(results, record["study"], record["arm"], record["seed"]), record)


# ---------------------------------------------------------------- rendering (docs/benchmarks.md)

HEADING = "#### Matched comparison (issue 26): equal iterations per task, no cap, >= 3 seeds, held-out test cases"

CLAIMS = {
    "multitask": ("Moeskops et al. (§4, Fig. 2), each network trained \"with 25000 mini-batches per task\": "
                  "\"Including multiple tasks in the training procedure resulted in a segmentation performance "
                  "equivalent to that of a network trained specifically for the task\", and \"Confusion between "
                  "tasks was very low. For the network trained with three tasks, the median percentage of voxels "
                  "per scan labelled with a class alien to the target [...] was <0.0005% for all tasks.\""),
    "abdomen": ("Landmark-input U-Net report (abstract, conclusion; landmarks as distance maps): adding the "
                "landmarks \"improves the performance of both models on one organ\", distance maps \"improved the "
                "dice score of the segmentation of most of the organs\", and \"the improvement gained from the early "
                "fusion of landmarks outweigh those obtained with a late fusion\". Multi-task thesis (§4, landmarks "
                "as an auxiliary task): \"all three learning algorithms converge to similar performance levels, with "
                "the baseline generally performing slightly better\". Here: heatmap channels (the demo's "
                "conversion), organs near the landmarks = " + ", ".join(conv.NEAR_LANDMARKS) + "."),
}


PROTOCOLS = {
    "multitask": (f"Protocol: {MT_CASES} phantom cases per task, split as `organmtl multitask-experiments` does "
                  f"({MT_CASES - MT_TEST - MT_VAL} training / {MT_VAL} validation / {MT_TEST} test cases per task); "
                  f"`{MT_TRAINER}` (union output layer) for experiments 1-3 (one task) and 7 (all three); "
                  f"{MT_ITERS_PER_TASK} iterations per task, so the all-tasks network trains "
                  f"{3 * MT_ITERS_PER_TASK}; no CPU cap, no patience rule; nnU-Net's default augmentation; "
                  "`checkpoint_best.pth` (EMA pseudo-Dice on the validation cases), scored on the test cases; "
                  f"seeds {', '.join(map(str, SEEDS))}; an estimated 38 CPU-minutes for the 12 runs."),
    "abdomen": (f"Protocol: {AB_CASES} phantom cases with a merged landmark heatmap channel, one fold: "
                f"{AB_TRAIN} training / {AB_VAL} validation / {AB_CASES - AB_TRAIN - AB_VAL} test cases; "
                f"{AB_ITERS} iterations for every arm; no CPU cap, no patience rule; nnU-Net's default "
                "augmentation (landmark maps moved by the spatial transforms only, in every arm); "
                "`checkpoint_best.pth` (EMA pseudo-Dice on the validation cases), scored on the test cases; "
                f"seeds {', '.join(map(str, SEEDS))}; an estimated 38 CPU-minutes for the 15 runs."),
}


def _class_names(records) -> list[str]:
    return list(dict.fromkeys(n for r in records for c in r["per_case"].values() for n in c.get("Dice", {})))


def _budget_groups(study: MatchedStudy, records: dict) -> dict[int, dict]:
    groups: dict[int, dict] = {}
    for (st, arm, seed), r in sorted(records.items()):
        if st == study.key:
            groups.setdefault(int(r["iterations_per_task"]), {})[(arm, seed)] = r
    return groups


def _not_run(study: MatchedStudy) -> str:
    return (f"Not yet run: `{RESUME} {study.flag} --next` ({len(study.arms)} arms x {len(SEEDS)} seeds, "
            f"{study.iters_per_task} iterations per task; one run per command).")


def render_study(key: str, records: dict) -> str:
    """The "Matched comparison (issue 26)" subsection of one study; "Not yet run" without records."""
    study = STUDIES[key]
    lines = [HEADING, "", f"Claim as the paper states it: {CLAIMS[key]}", "", PROTOCOLS[key], ""]
    groups = _budget_groups(study, records)
    if not groups:
        return "\n".join(lines + [_not_run(study)])
    for per_task, recs in sorted(groups.items()):
        missing = [(a.key, s) for s in SEEDS for a in study.arms if (a.key, s) not in recs]
        any_r = next(iter(recs.values()))
        revs = sorted({r["code_revision"] for r in recs.values()})
        lines += [f"Budget: {per_task} iterations per task (epochs of {ITERS_PER_EPOCH}, {VAL_ITERS} validation "
                  f"iterations), no CPU cap, no patience rule; nnU-Net's default augmentation; checkpoint_best (EMA "
                  f"pseudo-Dice on the validation cases); scored on {any_r['n_test_cases']} held-out test cases"
                  f"{' per task' if key == 'multitask' else ''}. Code: {', '.join(revs)}. Cells: mean over seeds "
                  "of the per-seed mean over test cases [95 % t interval over seeds] (n = seeds); paired "
                  "differences: mean [95 % t interval] over seed x test-case pairs.", ""]
        if missing:
            lines += ["Not yet run: " + ", ".join(f"`{study.flag} --arm {a} --seed {s}`" for a, s in missing)
                      + (f" (`--iters {per_task}`)" if per_task != study.iters_per_task else "") + ".", ""]
        lines += (_render_multitask if key == "multitask" else _render_abdomen)(study, recs)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def reading(diffs: dict[str, list[float]]) -> str:
    """Which paired-difference intervals lie above 0, below 0 or include it (fewer than 2 pairs: undecided)."""
    groups = {"above 0": [], "below 0": [], "including 0": []}
    for name, d in diffs.items():
        if len(d) < 2:
            groups["including 0"].append(f"{name} (n={len(d)})")
            continue
        _, lo, hi = conv.seed_ci(d)
        groups["above 0" if lo > 0 else "below 0" if hi < 0 else "including 0"].append(name)
    return "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items() if v) or "no pairs"


def _arm_records(recs: dict, arm: str) -> list[dict]:
    return [r for (a, _), r in sorted(recs.items()) if a == arm]


def _render_multitask(study: MatchedStudy, recs: dict) -> list[str]:
    shared = _arm_records(recs, "all")
    singles = {a.key: _arm_records(recs, a.key) for a in study.arms if a.n_tasks == 1}
    rows = ["| arm | iterations | seeds | selected iteration per seed | class | Dice (argmax) | Dice (PR threshold) |",
            "|---|---|---|---|---|---|---|"]
    for arm in study.arms:
        rs = _arm_records(recs, arm.key)
        if not rs:
            continue
        steps = ", ".join(str(r["selected_iteration"]) for r in rs)
        for name in _class_names(rs):
            thr = seed_means(rs, "Dice PR threshold", [name])
            rows.append(f"| {arm.label} | {rs[0]['iterations']} | {len(rs)} | {steps} | {name} | "
                        f"{ci_text(seed_means(rs, 'Dice', [name]))} | {ci_text(thr) if thr else '-'} |")
    out = rows + ["", "Shared minus single-task, paired by seed and test case:", "",
                  "| class | Dice (argmax) | Dice (PR threshold) |", "|---|---|---|"]
    diffs = {}
    for arm, rs in singles.items():
        for name in _class_names(rs):
            d = paired_differences(shared, rs, "Dice", [name])
            t = paired_differences(shared, rs, "Dice PR threshold", [name])
            if d:
                diffs[name] = d
            out.append(f"| {name} | {ci_text(d, signed=True)} | {ci_text(t, signed=True) if t else '-'} |")
    if not diffs:
        out.append("| - | not yet measured (needs the all-tasks arm and a one-task arm at the same seed) | - |")
    out += ["", "Task confusion (percentage of a test scan's voxels labelled with another task's class; median and "
                "max over the test scans of all seeds):", "", "| arm | task | scans | median % | max % |",
            "|---|---|---|---|---|"]
    for arm in study.arms:
        rs = _arm_records(recs, arm.key)
        for task in dict.fromkeys(c["task"] for r in rs for c in r["per_case"].values()):
            s = confusion_summary(rs, task)
            out.append(f"| {arm.label} | {task} | {s['n']} | {s['median_pct']:.3g} | {s['max_pct']:.3g} |")
    shared_conf = {t: confusion_summary(shared, t)["median_pct"] for t in
                   dict.fromkeys(c["task"] for r in shared for c in r["per_case"].values())}
    out += ["", "Reading (an interval that excludes 0 supports a difference; one that includes it does not decide at "
                "this size): shared minus single-task Dice (argmax), " + (reading(diffs) if diffs else "no pairs yet")
            + ". Median confusion of the all-tasks network: "
            + (", ".join(f"{t} {v:.3g} %" for t, v in shared_conf.items()) or "not yet measured")
            + " (paper: < 0.0005 %)."]
    return out


def _render_abdomen(study: MatchedStudy, recs: dict) -> list[str]:
    base = _arm_records(recs, study.baseline)
    rows = ["| arm | iterations | seeds | selected iteration per seed | Dice (mean) | Dice (near landmarks) | "
            "HD95 mm (mean) | landmark error mm (test) |", "|---|---|---|---|---|---|---|---|"]
    organs = _class_names(base or [r for r in recs.values()])
    near = [o for o in organs if o in conv.NEAR_LANDMARKS]
    for arm in study.arms:
        rs = _arm_records(recs, arm.key)
        if not rs:
            continue
        steps = ", ".join(str(r["selected_iteration"]) for r in rs)
        lm = [r["landmark_error_mm"] for r in rs if _finite(r.get("landmark_error_mm"))]
        missing = sum(r.get("landmarks_missing") or 0 for r in rs)
        rows.append(f"| {arm.label} | {rs[0]['iterations']} | {len(rs)} | {steps} | "
                    f"{ci_text(seed_means(rs, 'Dice', organs))} | {ci_text(seed_means(rs, 'Dice', near))} | "
                    f"{ci_text(seed_means(rs, 'HD95 mm', organs), digits=1)} | "
                    f"{ci_text(lm, digits=1) if lm else '-'}{f'; {missing} not found' if missing else ''} |")
    out = rows + ["", f"Each arm minus {study.arm(study.baseline).label}, paired by seed and test case:", "",
                  "| arm | Dice (mean) | Dice (near landmarks) | HD95 mm (mean) |", "|---|---|---|---|"]
    near_diffs, all_diffs = {}, {}
    for arm in study.arms:
        if arm.key == study.baseline:
            continue
        rs = _arm_records(recs, arm.key)
        if not rs or not base:
            out.append(f"| {arm.label} | not yet measured | - | - |")
            continue
        all_diffs[arm.key] = paired_differences(rs, base, 'Dice', organs)
        near_diffs[arm.key] = paired_differences(rs, base, 'Dice', near)
        out.append(f"| {arm.label} | {ci_text(all_diffs[arm.key], signed=True)} | "
                   f"{ci_text(near_diffs[arm.key], signed=True)} | "
                   f"{ci_text(paired_differences(rs, base, 'HD95 mm', organs), digits=1, signed=True)} |")
    if near_diffs:
        out += ["", "Reading (an interval that excludes 0 supports a difference; one that includes it does not decide "
                    f"at this size), minus image only: Dice near the landmarks, {reading(near_diffs)}; Dice of all "
                    f"organs, {reading(all_diffs)}."]
    return out + ["", "HD95 averages the organs and cases where both masks are non-empty; landmark error: mean over "
                      "the test cases' identified landmarks from `organmtl predict-landmarks` (auxiliary-task arms only)."]


def replace_subsection(text: str, study_heading: str, block: str) -> str:
    """``text`` with the matched block of the ``study_heading`` (``### ...``) section replaced by ``block``,
    or ``block`` appended at the end of that section; the rest of the page is kept byte for byte."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.rstrip("\n") == study_heading), None)
    if start is None:
        raise SystemExit(f"{DOC}: no section {study_heading!r} (run benchmarks/convergence.py --write-docs)")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("## ", "### "))), len(lines))
    mine = next((i for i in range(start + 1, end) if lines[i].rstrip("\n") == HEADING), None)
    head = lines[:mine if mine is not None else end]
    while head and not head[-1].strip():
        head.pop()
    tail = lines[end:]
    return "".join(head) + "\n" + block.rstrip("\n") + "\n" + ("\n" + "".join(tail) if tail else "")


def write_docs(results: Path = RESULTS, doc: Path = DOC) -> None:
    records = load_records(results)
    text = doc.read_text()
    for key in STUDIES:
        text = replace_subsection(text, f"### {conv.study(key).title}", render_study(key, records))
    doc.write_text(text)


# ---------------------------------------------------------------- datasets (in --work)

def multitask_dataset(work: Path) -> Path:
    """The demo's three multi-modal tasks with MT_CASES cases each, converted and merged as the demo does."""
    from organmtl.demo_data import write_demo_data
    from organmtl.nnunet_plans import plan_tiny
    from organmtl.workflows.steps import convert, output_to

    os.environ.update(conv.nnunet_env(work))
    data = conv._prepared(work, "demo_multimodal_matched",
                          lambda f: write_demo_data(f, seed=0, families=["multimodal"], n_cases=MT_CASES))
    raw_root = work / "nnUNet_raw"
    names = [f"{d.split('_')[0].capitalize()}Matched" for d in MT_TASK_DIRS]

    def make(_folder):
        with output_to(work / "prepare_multitask_matched.log"):
            for d, i, n in zip(MT_TASK_DIRS, MT_SOURCES, names):
                convert("volumes", data / "multimodal" / d, "--dataset-id", str(i), "--name", n)
            convert("merge", *(raw_root / f"Dataset{i:03d}_{n}" for i, n in zip(MT_SOURCES, names)),
                    "--dataset-id", str(MT_DATASET), "--name", MT_NAME)
            plan_tiny(MT_DATASET, configurations=(CONFIGURATION,), num_processes=1)
    conv._prepared(work, "dataset_multitask_matched", make)
    return raw_root / f"Dataset{MT_DATASET:03d}_{MT_NAME}"


def abdomen_dataset(work: Path) -> tuple[Path, list[str], list[str], list[str]]:
    """The demo abdomen with AB_CASES cases (landmark heatmap channels) and its one fold: (raw, train, val, test)."""
    from organmtl.demo_data import write_demo_data
    from organmtl.nnunet_plans import plan_tiny
    from organmtl.workflows.steps import convert, output_to

    os.environ.update(conv.nnunet_env(work))
    data = conv._prepared(work, "demo_abdomen_matched",
                          lambda f: write_demo_data(f, seed=0, families=["abdomen_mr"], n_cases=AB_CASES))

    def make(_folder):
        with output_to(work / "prepare_abdomen_matched.log"):
            convert("volumes", data / "abdomen_mr", "--dataset-id", str(AB_DATASET), "--name", AB_NAME,
                    "--landmark-channels", "heatmap")
            plan_tiny(AB_DATASET, configurations=(CONFIGURATION,), num_processes=1)
    conv._prepared(work, "dataset_abdomen_matched", make)
    raw = work / "nnUNet_raw" / f"Dataset{AB_DATASET:03d}_{AB_NAME}"
    ending = json.loads((raw / "dataset.json").read_text())["file_ending"]
    cases = sorted(p.name[:-len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}"))
    train, val, test = cases[:AB_TRAIN], cases[AB_TRAIN:AB_TRAIN + AB_VAL], cases[AB_TRAIN + AB_VAL:]
    (work / "nnUNet_preprocessed" / raw.name / "splits_final.json").write_text(
        json.dumps([{"train": train, "val": val}], indent=1) + "\n")
    return raw, train, val, test


# ---------------------------------------------------------------- one run

def _selected(fold_dir: Path) -> dict:
    """The epoch nnU-Net's checkpoint_best.pth was written at (``current_epoch`` is stored + 1) and its EMA."""
    import torch

    ck = torch.load(fold_dir / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    epoch = int(ck["current_epoch"]) - 1
    return {"selected_epoch": epoch, "selected_iteration": (epoch + 1) * ITERS_PER_EPOCH,
            "selected_ema_pseudo_dice": float(ck["_best_ema"]),
            "landmark_error_val_mm": (lambda e: float(e[min(epoch, len(e) - 1)]) if e else None)(
                ck.get("logging", {}).get("landmark_error_mm") or [])}


def _train(dataset_id: int, fold: int, arm: Arm, run: dict, work: Path, out: Path):
    """Stock ``nnUNetv2_train`` with the run's schedule and seed; no cap, no patience (runs to the end)."""
    method = conv.Method(arm.key, arm.label, arm.trainer, math.inf, None,
                         {k: v for k, v in run["env"].items() if k != "ORGANMTL_SEED"}, arm.experiment)
    env, result = conv._train_nnunet(dataset_id, CONFIGURATION, fold, method, run["seed"], work, out / "train.log")
    last = result["curve"][-1]["step"] if result["curve"] else 0
    if result["stop_reason"] != "schedule end" or last != run["iterations"]:
        raise RuntimeError(f"{out / 'train.log'}: stopped by {result['stop_reason']} at "
                           f"{last} of {run['iterations']} iterations")
    return env, result


def run_multitask(arm: Arm, run: dict, work: Path) -> dict:
    import numpy as np
    import SimpleITK as sitk

    from organmtl.nnunet_trainers.multitask.evaluation import (DiceOptimalThreshold, head_label_values,
                                                                load_probabilities)
    from organmtl.nnunet_trainers.multitask.tasks import TaskTable
    from organmtl.workflows.multitask_experiments import (Experiment, copy_test_images, plan_experiments,
                                                          write_splits)

    raw = multitask_dataset(work)
    meta = json.loads((raw / "dataset.json").read_text())
    table = TaskTable.from_dataset_json(meta, source=str(raw / "dataset.json"))
    ending, n_channels = meta["file_ending"], len(meta["channel_names"])
    labelled = {c for t in table.names for c in table.tasks[t].test_cases if (raw / "labelsTs" / f"{c}{ending}").is_file()}
    exps = plan_experiments(table, table.names, n_test=MT_TEST, n_val=MT_VAL, labelled_test=labelled)
    write_splits(work / "nnUNet_preprocessed" / raw.name, exps)
    exp = exps[arm.experiment - 1]
    if set(exp.test) & set(exp.val):
        raise RuntimeError(f"experiment {exp.index}: cases {sorted(set(exp.test) & set(exp.val))} are test and validation")
    out = work / "runs" / "multitask_matched" / f"{arm.key}__seed{run['seed']}"
    if out.exists():
        shutil.rmtree(out)
    fold_dir = work / "nnUNet_results" / raw.name / f"{arm.trainer}__nnUNetPlans__{CONFIGURATION}" / f"fold_{exp.fold}"
    if fold_dir.exists():
        shutil.rmtree(fold_dir)
    env, result = _train(MT_DATASET, exp.fold, arm, run, work, out)
    images = copy_test_images(Experiment(exp.index, exp.tasks, test=exp.test + exp.val, test_from_ts=exp.test_from_ts),
                              raw, out / "images", n_channels, ending)
    predict_s = conv._predict(env, MT_DATASET, CONFIGURATION, exp.fold, arm.trainer, images, out / "pred",
                              out / "predict.log", probabilities=True)
    heads = head_label_values(meta["labels"])
    names = {int(v): k for k, v in meta["labels"].items() if isinstance(v, int)}

    def ref(case):
        folder = raw / ("labelsTs" if case in exp.test_from_ts else "labelsTr")
        return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}{ending}")))
    thresholds = {}
    for t in exp.tasks:
        values = table.tasks[t].label_values
        if len(values) == 1:
            acc = DiceOptimalThreshold()
            channel = int(np.flatnonzero(heads == values[0])[0])
            for case in (c for c in exp.val if table.task_of(c) == t):
                acc.add(load_probabilities(out / "pred" / f"{case}.npz")[channel], ref(case) == values[0])
            thresholds[t] = float(acc.best()[0])
    per_case = {}
    for case in exp.test:
        t = table.task_of(case)
        task = table.tasks[t]
        s = score_multitask_case(load_probabilities(out / "pred" / f"{case}.npz"), heads, ref(case), task.label_values,
                                 table.alien_labels(t), thresholds.get(t))
        per_case[case] = {"task": t, "confusion_pct": s["confusion_pct"],
                          **{m: {f"{t}: {names[v]}": d for v, d in s[m].items()} for m in ("Dice", "Dice PR threshold")
                             if m in s}}
    return {"experiment": {"index": exp.index, "tasks": list(exp.tasks), "train": exp.train, "val": exp.val,
                           "test": exp.test}, "n_test_cases": MT_TEST, "thresholds": thresholds, "per_case": per_case,
            "curve": result["curve"], "stop_reason": result["stop_reason"], **_selected(fold_dir),
            "cpu_s": {"train": result["cpu_s"], "predict": predict_s, "total": result["cpu_s"] + predict_s}}


def run_abdomen(arm: Arm, run: dict, work: Path) -> dict:
    import SimpleITK as sitk

    from organmtl.evaluation.landmarks import read_landmarks
    from organmtl.procs import run_in_group

    raw, train, val, test = abdomen_dataset(work)
    meta = json.loads((raw / "dataset.json").read_text())
    ending = meta["file_ending"]
    out = work / "runs" / "abdomen_matched" / f"{arm.key}__seed{run['seed']}"
    if out.exists():
        shutil.rmtree(out)
    fold_dir = work / "nnUNet_results" / raw.name / f"{arm.trainer}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    if fold_dir.exists():
        shutil.rmtree(fold_dir)
    env, result = _train(AB_DATASET, 0, arm, run, work, out)
    images = out / "images"
    images.mkdir(parents=True)
    for case in test:
        for f in raw.glob(f"imagesTr/{case}_*"):
            shutil.copyfile(f, images / f.name)
    if arm.landmarks:     # segmentation (nnU-Net's export) and <case>.json landmark coordinates
        before = conv._children_cpu_s()
        run_in_group([conv._bin("organmtl"), "predict-landmarks", "-i", str(images), "-o", str(out / "pred"), "-d",
                      str(AB_DATASET), "-c", CONFIGURATION, "-f", "0", "-tr", arm.trainer, "-chk", "checkpoint_best.pth",
                      "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env=env, log_file=out / "predict.log")
        predict_s = conv._children_cpu_s() - before
    else:
        predict_s = conv._predict(env, AB_DATASET, CONFIGURATION, 0, arm.trainer, images, out / "pred",
                                  out / "predict.log")
    organs = {k: int(v) for k, v in meta["labels"].items() if isinstance(v, int) and v > 0 and k != "ignore"}
    per_case = {}
    for case in test:
        gt_img = sitk.ReadImage(str(raw / "labelsTr" / f"{case}{ending}"))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pred" / f"{case}{ending}")))
        per_case[case] = score_abdomen_case(pred, sitk.GetArrayFromImage(gt_img), gt_img.GetSpacing()[::-1], organs)
    landmark_error, landmarks_missing = None, None
    if arm.landmarks:
        rows = []
        for case in test:
            pf = out / "pred" / f"{case}.json"
            errs = landmark_errors(read_landmarks(pf) if pf.is_file() else {},
                                   read_landmarks(raw / "landmarks" / f"{case}.json"))
            per_case[case]["landmark errors mm"] = errs
            rows += list(errs.values())
        errors = [e for e in rows if _finite(e)]
        landmark_error = sum(errors) / len(errors) if errors else None
        landmarks_missing = len(rows) - len(errors)
    return {"split": {"train": train, "val": val, "test": test}, "n_test_cases": len(test), "per_case": per_case,
            "landmark_error_mm": landmark_error, "landmarks_missing": landmarks_missing, "curve": result["curve"],
            "stop_reason": result["stop_reason"], **_selected(fold_dir),
            "cpu_s": {"train": result["cpu_s"], "predict": predict_s, "total": result["cpu_s"] + predict_s}}


def run_one(study: MatchedStudy, run: dict, work: Path, results: Path) -> dict:
    revision = conv.git_revision()
    check_committed(revision, results)
    arm = study.arm(run["arm"])
    os.environ.update(conv.nnunet_env(work))      # before anything imports nnunetv2.paths (read at import)
    check_same_augmentation(study)
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    result = (run_multitask if study.key == "multitask" else run_abdomen)(arm, run, work)
    record = {"study": study.key, "arm": arm.key, "label": arm.label, "trainer": arm.trainer, "seed": run["seed"],
              "iterations": run["iterations"], "iterations_per_task": run["iterations_per_task"],
              "n_tasks": arm.n_tasks, "env": run["env"], "cap_cpu_s": None, "patience": None,
              "configuration": CONFIGURATION, **result, "code_revision": revision,
              "started_utc": started.isoformat(timespec="seconds"),
              "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
              "threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    path = save_record(results, record)
    print(f"{study.key}_matched/{arm.key} seed {run['seed']}: {run['iterations']} iterations, selected "
          f"{record['selected_iteration']}, {record['cpu_s']['total']:.0f} CPU s -> {path}", flush=True)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--multitask-matched", action="store_true", help="the multi-task CNN study")
    which.add_argument("--abdomen-matched", action="store_true", help="the landmark U-Net study")
    which.add_argument("--write-docs", action="store_true", help="only rewrite the docs subsections")
    p.add_argument("--arm", nargs="+", help="arms to run, one after the other (default: all of the study)")
    p.add_argument("--seed", type=int, nargs="+", default=[0])
    p.add_argument("--iters", type=int, help="iterations per task, a multiple of 25 (default: the study's budget)")
    p.add_argument("--next", action="store_true", help="run the first planned run without a record")
    p.add_argument("--list", action="store_true", help="list the planned runs and which have a record")
    p.add_argument("--force", action="store_true", help="run again although a record exists")
    p.add_argument("--work", type=Path, default=conv.DEFAULT_WORK, help="datasets, checkpoints, logs (not committed)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the run JSONs go")
    args = p.parse_args(argv)
    if args.write_docs:
        write_docs()
        return 0
    study = MULTITASK if args.multitask_matched else ABDOMEN
    if args.iters is not None and (args.iters < 1 or args.iters % ITERS_PER_EPOCH):
        p.error(f"--iters {args.iters}: give a positive multiple of {ITERS_PER_EPOCH} (iterations per epoch)")
    unknown = [a for a in args.arm or [] if a not in {x.key for x in study.arms}]
    if unknown:
        p.error(f"--arm {unknown[0]}: {study.flag} has {', '.join(a.key for a in study.arms)}")
    records = load_records(args.results)
    full = plan(study, args.iters)
    if args.list:
        for r in full:
            rec = records.get((study.key, r["arm"], r["seed"]))
            same = rec is not None and rec["iterations_per_task"] == r["iterations_per_task"]
            print(r["arm"], r["seed"], r["iterations"], "done" if same else "not run")
        return 0
    if args.next:
        todo = [r for r in full if (rec := records.get((study.key, r["arm"], r["seed"]))) is None
                or rec["iterations_per_task"] != r["iterations_per_task"]]
        if not todo:
            print("every planned run has a record")
            return 0
        runs = todo[:1]
    else:
        arms = args.arm or [a.key for a in study.arms]
        runs = [r for r in plan(study, args.iters, args.seed) if r["arm"] in arms]
    failed = 0
    for r in runs:
        if (study.key, r["arm"], r["seed"]) in records and not args.force and not args.next:
            print(f"{r['arm']} seed {r['seed']}: recorded in {record_path(args.results, study.key, r['arm'], r['seed'])} "
                  "(--force to run again)")
            continue
        try:
            run_one(study, r, args.work.resolve(), args.results)
        except Exception as e:      # one failed run does not cost the others; exit 1 = partial
            print(f"{study.key}_matched/{r['arm']} seed {r['seed']}: FAILED: {e}", file=sys.stderr, flush=True)
            failed += 1
            continue
        if args.results.resolve() == RESULTS.resolve():   # the docs show the committed results only
            write_docs()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
