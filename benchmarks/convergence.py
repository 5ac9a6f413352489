"""Convergence benchmark (issue 16; not in CI): each paper's claim tested on the demo phantoms, every
method trained through the stock commands until validation stops improving or a CPU-time cap.

One *run* is (study, method, seed). Each run trains with the stock command as a subprocess
(``nnUNetv2_train``, or ``python -m organmtl.detectron_heads.train_net``), follows its validation
curve while it runs and stops it by the patience rule (:class:`Patience`) or the run's CPU-time cap,
then scores the checkpoint that validation picked (nnU-Net's ``checkpoint_best.pth`` through
``nnUNetv2_predict -chk``; Detectron2's best periodic evaluation). The result is a small JSON per run
in ``benchmarks/results/convergence/<study>/`` (metrics, per-step curve, CPU seconds, code revision,
seed) that is committed, so a fresh machine resumes where the last session stopped; datasets and
checkpoints live in ``--work`` (default ``~/.cache/organmtl/convergence``) and are never committed.
After each run the "## Convergence" section of docs/benchmarks.md and the learning-curve PNGs in
docs/figures/ are rewritten from all cached runs.

    heavy .venv/bin/python benchmarks/convergence.py --list                       # runs, done or not
    heavy .venv/bin/python benchmarks/convergence.py --study spine --method mask_rcnn --seed 0
    heavy .venv/bin/python benchmarks/convergence.py --next                         # first missing run
    .venv/bin/python benchmarks/convergence.py --write-docs                       # table + figures only

Seeds. Detectron2: ``SEED S``. nnU-Net has no seed option (its data sampling uses numpy's unseeded
global state; the network init torch's default, fixed, seed): the ``_Tiny`` trainers honour
``ORGANMTL_SEED`` (``nnunet_trainers/budget.py``, unset = nnU-Net's behaviour), which seeds
torch, numpy and ``random`` before the network is built. One run per command, so each command
stays within one ~10 minute CPU slot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "convergence"
DOC = ROOT / "docs" / "benchmarks.md"
FIGURES = ROOT / "docs" / "figures"
SECTION = "## Convergence"
DEFAULT_WORK = Path(os.environ.get("ORGANMTL_CONVERGENCE_WORK", Path.home() / ".cache" / "organmtl" / "convergence"))
_STAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)?: ?")   # nnU-Net's log timestamp
RESUME = "heavy .venv/bin/python benchmarks/convergence.py"


# ---------------------------------------------------------------- pure logic: stop rule, cache, table

@dataclass
class Patience:
    """Stop when ``patience`` evaluations in a row did not beat the best by more than ``min_delta``,
    but never before ``min_evaluations`` evaluations (a warm-up at score 0 is not convergence).
    A NaN evaluation counts as no improvement."""

    patience: int
    min_delta: float = 0.0
    min_evaluations: int = 0
    best: float = -math.inf
    best_index: int = -1
    count: int = 0

    def update(self, value: float) -> bool:
        """Feed one evaluation; True when the run should stop."""
        if value == value and value > self.best + self.min_delta:
            self.best, self.best_index = float(value), self.count
        self.count += 1
        return self.count >= self.min_evaluations and self.count - 1 - self.best_index >= self.patience


def ema(values, beta: float = 0.9) -> list[float]:
    """nnU-Net's moving average of the pseudo-Dice (``nnUNetLogger``: first value as is, then
    ``0.9 * previous + 0.1 * value``), the quantity its ``checkpoint_best`` follows."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else beta * out[-1] + (1 - beta) * v)
    return out


def mean_finite(values) -> float:
    vals = [v for v in values if v is not None and v == v and not math.isinf(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def run_path(results: Path, study: str, method: str, seed: int) -> Path:
    return Path(results) / study / f"{method}__seed{seed}.json"


def load_runs(results: Path) -> dict[tuple[str, str, int], dict]:
    """Every cached run, by (study, method, seed); a file that is not a finished run's JSON is an error."""
    runs = {}
    for path in sorted(Path(results).glob("*/*__seed*.json")):
        try:
            record = json.loads(path.read_text())
            key = (record["study"], record["method"], int(record["seed"]))
        except (ValueError, KeyError) as e:
            raise SystemExit(f"{path}: not a convergence run record ({e})") from None
        if path != run_path(results, *key):
            raise SystemExit(f"{path}: holds the run {key}, expected at {run_path(results, *key)}")
        runs[key] = record
    return runs


def write_record(path: Path, record: dict) -> Path:
    """``record`` as sorted, indented JSON at ``path``, written whole or not at all (a temporary file renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def save_run(results: Path, record: dict) -> Path:
    return write_record(run_path(results, record["study"], record["method"], record["seed"]), record)


def missing_runs(plan, runs: dict) -> list[tuple[str, str, int]]:
    """The planned (study, method, seed) in plan order that have no cached result."""
    return [key for key in plan if key not in runs]


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def _mean_sd(values) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return _fmt(m)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{_fmt(m)} ± {_fmt(sd)}"


def summary_value(record: dict, metric: str, structures=None) -> float:
    """Mean of ``metric`` over the run's structures (or the given ones)."""
    per = record["metrics"]
    names = [s for s in (structures if structures is not None else per) if s in per]
    return mean_finite(per[s].get(metric) for s in names)


def render_study(study: "StudySpec", runs: dict) -> str:
    """Markdown of one study: a method table (one row per method; mean ± SD over seeds; rows with a
    missing seed say how to resume) and a per-structure table of the main metric."""
    metrics = study.summary_metrics
    lines = [f"### {study.title}", "", study.description, "",
             "| method | seeds done | " + " | ".join(_header(m, subset) for m, subset in metrics) +
             " | stopped (step of best / last) | CPU s per run | cap per run |",
             "|---|---|" + "---|" * len(metrics) + "---|---|---|"]
    for method in study.methods:
        seeds = study.seeds_of(method)
        done = [runs[(study.key, method.key, s)] for s in seeds if (study.key, method.key, s) in runs]
        todo = [s for s in seeds if (study.key, method.key, s) not in runs]
        cells = [_mean_sd([summary_value(r, metric, study.structure_set(r, subset)) for r in done])
                 for metric, subset in metrics]
        stops = ", ".join(f"{r['stop_reason']} ({r['best_step']} / {r['last_step']})" for r in done) or "-"
        cpu = ", ".join(f"{r['cpu_s']['total']:.0f}" for r in done) or "-"
        name = method.label
        if todo:
            resume = ", ".join(f"`--study {study.key} --method {method.key} --seed {s}`" for s in todo)
            name += f" — not run yet: {resume}"
        lines.append(f"| {name} | {len(done)}/{len(seeds)} | " + " | ".join(cells) +
                     f" | {stops} | {cpu} | {method.cap_text} |")
    metric = study.structure_metric
    names = list(dict.fromkeys(s for m in study.methods for seed in study.seeds
                               for s in runs.get((study.key, m.key, seed), {}).get("metrics", {})))
    if names:
        lines += ["", f"{metric} per structure (mean over seeds):", "",
                  "| structure | " + " | ".join(m.label for m in study.methods) + " |",
                  "|---|" + "---|" * len(study.methods)]
        for s in names:
            cells = []
            for m in study.methods:
                vals = [runs[(study.key, m.key, seed)]["metrics"].get(s, {}).get(metric) for seed in study.seeds
                        if (study.key, m.key, seed) in runs]
                cells.append(_fmt(mean_finite(vals)) if vals else "-")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    mine = [r for k, r in runs.items() if k[0] == study.key]
    capped = sum(r["stop_reason"] == "cap" for r in mine)
    without = sum(m.patience is None for m in study.methods)
    if without == len(study.methods):
        ender = "their schedule"
    elif without:
        ender = "their patience rule or schedule"
    else:
        ender = "the patience rule"
    note = (f" Caveat: {capped} of the {len(mine)} runs were stopped by the CPU cap before {ender} ended them, so "
            "this compares equal CPU budgets, not converged models." if capped else "")
    lines += ["", f"Claim ({study.claim}): {study.verdict(runs)}{note}"]
    if study.figure and any(k[0] == study.key for k in runs):
        lines += ["", f"![{study.title} learning curves](figures/{study.figure})"]
    if study.key == "spine":
        lines += ["", render_spine_matched(load_matched())]
    if study.key in ("multitask", "abdomen"):
        lines += ["", render_nnunet_matched(study.key).rstrip("\n")]
    return "\n".join(lines)


def render_nnunet_matched(key: str) -> str:
    """The matched multitask / abdomen subsection (issue 26), written by benchmarks/convergence_matched.py."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import convergence_matched

    return convergence_matched.render_study(key, convergence_matched.load_records(RESULTS))


SUBSETS = {"small": "small organs", "large": "large organs", "near": "near landmarks"}


def _header(metric: str, subset: str | None) -> str:
    return f"{metric} ({SUBSETS[subset]})" if subset else f"{metric} (mean)"


def replace_section(text: str, section: str, heading: str = SECTION) -> str:
    """``text`` with its ``heading`` section (up to the next ``## `` heading) replaced by ``section``,
    or ``section`` appended when the page has none; the rest of the page is kept byte for byte."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    block = section.rstrip("\n") + "\n"
    if start is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + "\n" + block
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + tail if tail else "")


# ---------------------------------------------------------------- the studies

@dataclass(frozen=True)
class Method:
    key: str
    label: str
    trainer: str                 # nnU-Net trainer class, or a Detectron2 config (package-relative)
    cap_cpu_s: float
    patience: Patience | None    # template (copied per run); None: the whole schedule, cap only
    budget: dict = field(default_factory=dict)   # ORGANMTL_* (nnU-Net) or config overrides (Detectron2)
    subset: int | None = None    # multitask: the experiment (1-based) of multitask_experiments
    seeds: tuple[int, ...] | None = None   # the study's seeds this method runs (None: all of them)

    @property
    def cap_text(self) -> str:
        b = self.budget
        if "ORGANMTL_EPOCHS" in b:
            its = int(b["ORGANMTL_EPOCHS"]) * int(b["ORGANMTL_ITERS_PER_EPOCH"])
            sched = f"≤ {b['ORGANMTL_EPOCHS']} epochs x {b['ORGANMTL_ITERS_PER_EPOCH']} it (= {its} it)"
        else:
            sched = f"≤ {b.get('SOLVER.MAX_ITER', '?')} it"
        rule = (f"patience {self.patience.patience} evals (after {self.patience.min_evaluations})"
                if self.patience else "no patience (whole schedule)")
        return f"{self.cap_cpu_s:.0f} CPU s; {sched}; {rule}"


NNUNET_BUDGET = {"ORGANMTL_EPOCHS": "200", "ORGANMTL_ITERS_PER_EPOCH": "25", "ORGANMTL_VAL_ITERS": "5"}
NNUNET_PATIENCE = Patience(patience=10, min_delta=1e-3, min_evaluations=20)   # epochs of 25 iterations
#: the stock U-Net on the HaN phantom predicts background only until ~2500 iterations, and it learns the second
#: side of each left/right pair only late, as its learning rate decays (docs/demo.md "Left and right"): a
#: patience rule stopped it on the plateau before (best at 3500 of 5000 iterations, one parotid label on both
#: parotids). So the HaN methods run their whole schedule or the shared CPU cap, like FocusNet, with no patience.
DET_BUDGET = {"SOLVER.MAX_ITER": "1500", "SOLVER.STEPS": "(1200,)", "TEST.EVAL_PERIOD": "50"}
DET_PATIENCE = Patience(patience=6, min_delta=0.5, min_evaluations=6)          # evaluations every 50 it
# caps: two Detectron2 runs, three multi-task runs or two abdomen runs fit one ~10 minute slot; HaN: one
# CPU cap for all four methods, enough for FocusNet's whole 60-epoch schedule (~600 CPU s on the tiny plan)
NNUNET_CAP_S, DET_CAP_S, MULTITASK_CAP_S, ABDOMEN_CAP_S = 800.0, 250.0, 150.0, 200.0
#: FocusNetv2 with S-Net alone's iterations in its S-Net phase (S-Net alone: 2300-2450 within the 800 CPU-s
#: cap, seeds 0 and 1), then sol/ae/sos/joint 6/6/12/12 epochs as in the 60-epoch schedule; one seed (~25 CPU-min)
MATCHED_SNET_EPOCHS, MATCHED_CAP_S = 92, 1800.0
MATCHED_PHASES = (("snet", MATCHED_SNET_EPOCHS), ("sol", 6), ("ae", 6), ("sos", 12), ("joint", 12))
MATCHED_BUDGET = {**NNUNET_BUDGET, "ORGANMTL_EPOCHS": str(sum(n for _, n in MATCHED_PHASES)),
                  "ORGANMTL_FOCUSNET_PHASE_EPOCHS": ",".join(f"{p}={n}" for p, n in MATCHED_PHASES)}


def _nn(key, label, trainer, cap=NNUNET_CAP_S, patience=NNUNET_PATIENCE, budget=None, subset=None, seeds=None):
    return Method(key, label, trainer, cap, patience, dict(budget or NNUNET_BUDGET), subset, seeds)


def _det(key, label, config):
    return Method(key, label, config, DET_CAP_S, DET_PATIENCE, dict(DET_BUDGET))


@dataclass(frozen=True)
class StudySpec:
    key: str
    title: str
    description: str
    claim: str
    methods: tuple[Method, ...]
    seeds: tuple[int, ...]
    summary_metrics: tuple[tuple[str, str | None], ...]   # (metric, structure subset name)
    structure_metric: str
    figure: str

    def seeds_of(self, method: Method) -> tuple[int, ...]:
        return tuple(s for s in self.seeds if method.seeds is None or s in method.seeds)

    def method(self, key: str) -> Method:
        for m in self.methods:
            if m.key == key:
                return m
        raise SystemExit(f"--method {key!r}: study {self.key} has {', '.join(m.key for m in self.methods)}")

    def structure_set(self, record: dict, subset: str | None):
        names = list(record["metrics"])
        if subset == "small":
            return [n for n in names if is_small_organ(n)]
        if subset == "large":
            return [n for n in names if not is_small_organ(n)]
        if subset == "near":
            return [n for n in names if n in NEAR_LANDMARKS]
        return names

    def verdict(self, runs: dict) -> str:
        return VERDICTS[self.key](self, runs)


def is_small_organ(name: str) -> bool:
    """The paper's small organs of the PDDCA layout: the chiasm and the optic nerves."""
    n = name.lower()
    return "chiasm" in n or "optic" in n


#: the abdomen organs next to the hip-joint landmarks of the phantoms (organmtl/demo_data/abdomen.py)
NEAR_LANDMARKS = ("bladder",)

STUDIES = (
    StudySpec("spine", "Spine sagittal MR slices (COCO): Mask R-CNN vs HMR-Net and its ablations",
              "Demo spine COCO (`organmtl convert volumes --to coco`), tiny R18-FPN configs, `train_net` with "
              "`TEST.EVAL_PERIOD 50`; the score is the best periodic COCO segm AP (0-100) on the validation "
              "slices (the same slices decide the stop; 5 slices, so ±10 AP between evaluations is noise).",
              "HMR-Net >= Mask R-CNN on all slices (our question; the paper compares shape head vs segmentation head on artefact / ambiguous-boundary organs, Tables 5-6: see the matched comparison)",
              (_det("mask_rcnn", "Mask R-CNN R18-FPN", "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml"),
               _det("hmrnet", "HMR-Net R18-FPN", "hmrnet/configs/tiny/hmrnet_R_18_FPN_tiny.yaml"),
               _det("hmrnet_mask_head", "HMR-Net, mask head", "hmrnet/configs/tiny/hmrnet_R_18_FPN_mask_head_tiny.yaml"),
               _det("hmrnet_no_cross_stitch", "HMR-Net, no cross-stitch",
                    "hmrnet/configs/tiny/hmrnet_R_18_FPN_no_cross_stitch_tiny.yaml"),
               _det("hmrnet_no_manifold", "HMR-Net, no manifold loss",
                    "hmrnet/configs/tiny/hmrnet_R_18_FPN_no_manifold_tiny.yaml")),
              (0, 1), (("segm AP", None), ("Dice", None)), "segm AP", "convergence_spine.png"),
    StudySpec("multitask", "Brain MR + breast MR + cardiac CTA: one network per task vs one multi-task network",
              "Merged demo dataset (`organmtl convert merge`), 3d_tiny, `nnUNetTrainerOMTLMultiTaskUNet_Tiny` for "
              "every run; experiments 1-3 (one task each) and 7 (all three) of `organmtl multitask-experiments` "
              "(its splits and evaluation: Dice of the argmax over the union output layer on each task's test "
              "cases); prediction with `checkpoint_best.pth`.",
              "Moeskops et al.: no loss from sharing one network",
              (_nn("single_1", "task 1 only (brain)", "nnUNetTrainerOMTLMultiTaskUNet_Tiny", cap=MULTITASK_CAP_S, subset=1),
               _nn("single_2", "task 2 only (breast)", "nnUNetTrainerOMTLMultiTaskUNet_Tiny", cap=MULTITASK_CAP_S, subset=2),
               _nn("single_3", "task 3 only (cardiac)", "nnUNetTrainerOMTLMultiTaskUNet_Tiny", cap=MULTITASK_CAP_S, subset=3),
               # the paper trains every network "with 25000 mini-batches per task": three tasks, three times the budget
               _nn("all", "all three tasks, one network", "nnUNetTrainerOMTLMultiTaskUNet_Tiny", cap=3 * MULTITASK_CAP_S,
                   subset=7)),
              (0, 1), (("Dice", None),), "Dice", "convergence_multitask.png"),
    StudySpec("abdomen", "Fat/water MR with hip-joint landmarks: image only vs landmark input vs auxiliary task",
              "Demo abdomen MR with Gaussian landmark channels (the demo's conversion), 3d_tiny, fold 0 of "
              "nnU-Net's 5-fold split; scored on that fold's validation cases with `nnUNetv2_predict -chk "
              "checkpoint_best.pth` (Dice, HD95 mm); landmark error: the joint trainers' logged validation "
              "error at the best epoch. \"near\" = organs next to the hip landmarks (bladder).",
              "landmark input and the auxiliary task help the organs near the landmarks",
              (_nn("image_only", "image only (nnU-Net)", "nnUNetTrainerOMTLLandmarkImageOnly_Tiny", cap=ABDOMEN_CAP_S),
               _nn("early_fusion", "landmarks as input (early fusion)", "nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny", cap=ABDOMEN_CAP_S),
               _nn("late_fusion", "landmarks as input (late fusion)", "nnUNetTrainerOMTLLandmarkLateFusion_Tiny", cap=ABDOMEN_CAP_S),
               _nn("joint", "landmarks as auxiliary task (joint tail)", "nnUNetTrainerOMTLLandmarkJoint_Tiny", cap=ABDOMEN_CAP_S),
               _nn("uncertainty", "auxiliary task, uncertainty weighting", "nnUNetTrainerOMTLLandmarkUncertainty_Tiny", cap=ABDOMEN_CAP_S)),
              (0, 1), (("Dice", None), ("Dice", "near"), ("HD95 mm", None), ("landmark error mm", None)),
              "Dice", "convergence_abdomen.png"),
    StudySpec("han", "Head-and-neck CT (PDDCA layout): nnU-Net vs S-Net vs FocusNetv1 vs FocusNetv2",
              "Demo HaN phantoms with the demo's 4 held-out test cases (`imagesTs`), 3d_tiny, fold 0; "
              "`nnUNetv2_predict -chk checkpoint_best.pth` on the test cases; Dice and HD95 (mm); small = "
              "chiasm + optic nerves, large = the other six. Every method has the same CPU cap and no patience rule: "
              "each runs its whole schedule (FocusNet: stopping inside an early phase would skip SOS-Net; the "
              "stock U-Net learns the second side of the left/right pairs only late) or stops at the cap.",
              "paper Table 6: FocusNetv2 best on the small organs, S-Net alone worst on them",
              (_nn("nnunet", "stock nnU-Net", "nnUNetTrainerOMTLBaseline_Tiny", patience=None),
               _nn("snet", "S-Net", "nnUNetTrainerOMTLSNet_Tiny", patience=None),
               _nn("focusnetv1", "FocusNetv1", "nnUNetTrainerOMTLFocusNetV1_Tiny", patience=None,
                   budget={**NNUNET_BUDGET, "ORGANMTL_EPOCHS": "60"}),
               _nn("focusnetv2", "FocusNetv2", "nnUNetTrainerOMTLFocusNetV2_Tiny", patience=None,
                   budget={**NNUNET_BUDGET, "ORGANMTL_EPOCHS": "60"}),
               # §4.2 trains S-Net first, then adds the small-organ parts. In the 60-epoch schedule S-Net gets
               # 24 epochs (600 iterations) against S-Net alone's ~2300 within the cap, so this variant gives
               # the S-Net phase S-Net alone's iterations and the other phases their 60-epoch share, under a
               # cap that lets it finish: it asks whether the small-organ parts add to a trained S-Net.
               _nn("focusnetv2_matched",
                   f"FocusNetv2, S-Net phase {MATCHED_SNET_EPOCHS * int(NNUNET_BUDGET['ORGANMTL_ITERS_PER_EPOCH'])} it",
                   "nnUNetTrainerOMTLFocusNetV2_Tiny", patience=None, cap=MATCHED_CAP_S, seeds=(0,),
                   budget=MATCHED_BUDGET)),
              (0, 1), (("Dice", "small"), ("Dice", "large"), ("HD95 mm", "small")), "Dice", "convergence_han.png"),
)
#: run order of ``--next``: spine and multitask first, HaN last; seed 0 of every method before seed 1
PLAN = [(s.key, m.key, seed) for seed in (0, 1) for s in STUDIES for m in s.methods if seed in s.seeds_of(m)]


def study(key: str) -> StudySpec:
    for s in STUDIES:
        if s.key == key:
            return s
    raise SystemExit(f"--study {key!r}: one of {', '.join(s.key for s in STUDIES)}")


def _means(spec: StudySpec, runs: dict, method: str, metric: str, subset=None) -> list[float]:
    return [summary_value(r, metric, spec.structure_set(r, subset)) for (st, m, _), r in sorted(runs.items())
            if st == spec.key and m == method]


def _avg(values):
    return sum(values) / len(values) if values else None


def _verdict_spine(spec, runs):
    mask, hmr = _avg(_means(spec, runs, "mask_rcnn", "segm AP")), _avg(_means(spec, runs, "hmrnet", "segm AP"))
    if mask is None or hmr is None:
        return "not yet measured (needs Mask R-CNN and HMR-Net runs)."
    word = "reproduced" if hmr >= mask else "not reproduced"
    stops = sorted({r["stop_reason"] for k, r in runs.items() if k[0] == spec.key and k[1] in ("mask_rcnn", "hmrnet")})
    return (f"{word} on all validation slices at the same CPU cap (unmatched runs: different iteration counts, "
            f"augmentations and clipping; the same 5 validation slices pick and score; the matched comparison is "
            f"below): HMR-Net segm AP {hmr:.1f} vs Mask R-CNN "
            f"{mask:.1f} (mean over {len(_means(spec, runs, 'hmrnet', 'segm AP'))} / "
            f"{len(_means(spec, runs, 'mask_rcnn', 'segm AP'))} seeds; runs stopped by: {', '.join(stops)})." + _ablations(spec, runs, hmr))


def _ablations(spec, runs, full: float) -> str:
    """The ablations against the full HMR-Net: what removing each part changes (segm AP)."""
    parts = []
    for m in spec.methods:
        if m.key.startswith("hmrnet_"):
            v = _avg(_means(spec, runs, m.key, "segm AP"))
            if v is not None:
                parts.append(f"{m.label} {v:.1f} ({v - full:+.1f})")
    return (" Ablations against the full HMR-Net (segm AP, difference): " + "; ".join(parts) + "." if parts else "")


SHARING_TOLERANCE = 0.03


#: below this Dice in both networks a class counts as not learned (no evidence about sharing)
LEARNED_DICE = 0.1


def _verdict_multitask(spec, runs):
    multi = [runs[k] for k in runs if k[0] == spec.key and k[1] == "all"]
    singles = [runs[k] for k in runs if k[0] == spec.key and k[1].startswith("single_")]
    if not multi or not singles:
        return "not yet measured (needs the all-tasks run and at least one single-task run)."
    diffs, unlearned = [], []
    for structure in dict.fromkeys(s for r in singles for s in r["metrics"]):
        one = mean_finite(r["metrics"][structure]["Dice"] for r in singles if structure in r["metrics"])
        shared = mean_finite(r["metrics"].get(structure, {}).get("Dice") for r in multi)
        if one == one and shared == shared:
            # a class neither network learned says nothing about sharing
            (diffs if max(one, shared) >= LEARNED_DICE else unlearned).append((structure, shared - one))
    if not diffs:
        return "not yet measured (no class learned by either network)."
    mean = sum(d for _, d in diffs) / len(diffs)
    word = "reproduced" if mean >= -SHARING_TOLERANCE else "not reproduced"
    worst = min(diffs, key=lambda x: x[1])
    text = (f"{word} for the {len(diffs)} classes learned by either network: shared minus single-task Dice "
            f"{mean:+.3f} on average (tolerance -{SHARING_TOLERANCE}), worst {worst[0]} {worst[1]:+.3f}.")
    if unlearned:
        text += (f" Not evidence either way: {', '.join(s for s, _ in unlearned)} (Dice below {LEARNED_DICE} in both "
                 "networks: not learned at this budget).")
    return text


def _verdict_abdomen(spec, runs):
    base = _avg(_means(spec, runs, "image_only", "Dice", "near"))
    others = {m.key: _avg(_means(spec, runs, m.key, "Dice", "near")) for m in spec.methods[1:]}
    others = {k: v for k, v in others.items() if v is not None}
    if base is None or not others:
        return "not yet measured (needs the image-only run and a landmark run)."
    better = [k for k, v in others.items() if v > base]
    word = ("reproduced" if len(better) == len(others) else "partly reproduced" if better else "not reproduced")
    vals = ", ".join(f"{k} {v:.3f}" for k, v in others.items())
    return (f"{word}: Dice of the organs near the landmarks, image only {base:.3f} vs {vals} "
            f"({_seeds_text(spec, runs)}).")


def _verdict_han(spec, runs):
    main = [m for m in spec.methods if m.seeds is None]
    small = {m.key: _avg(_means(spec, runs, m.key, "Dice", "small")) for m in main}
    if any(v is None for v in small.values()):
        missing = [k for k, v in small.items() if v is None]
        have = ", ".join(f"{k} {v:.3f}" for k, v in small.items() if v is not None)
        return f"not yet measured (missing {', '.join(missing)}; small-organ Dice so far: {have or 'none'})."
    best, worst = max(small, key=small.get), min(small, key=small.get)
    word = "reproduced" if best == "focusnetv2" and worst == "snet" else "not reproduced"
    text = (f"{word}: small-organ Dice " + ", ".join(f"{k} {v:.3f}" for k, v in small.items())
            + f" ({_seeds_text(spec, runs)}).")
    for m in spec.methods:
        if m.seeds is None:
            continue
        seeds = [seed for st, key, seed in sorted(runs) if st == spec.key and key == m.key]
        if not seeds:
            text += f" {m.label}: not run yet."
            continue
        vals = _avg(_means(spec, runs, m.key, "Dice", "small"))
        snet = [summary_value(r, "Dice", spec.structure_set(r, "small"))
                for r in (runs.get((spec.key, "snet", seed)) for seed in seeds) if r is not None]
        against = f" against S-Net alone's {_avg(snet):.3f} at the same seed{'s' if len(seeds) > 1 else ''}" if snet else ""
        text += (f" {m.label} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}): small-organ Dice "
                 f"{vals:.3f}{against}.")
    return text


def _seeds_text(spec, runs) -> str:
    """How many seeds each mean of a verdict averages, e.g. "means over 1 seed" or "means over 1-2 seeds"."""
    counts = [sum(1 for st, key, _ in runs if st == spec.key and key == m.key) for m in spec.methods
              if m.seeds is None]            # a method run at fewer seeds gets its own sentence
    counts = sorted({c for c in counts if c})
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"means over {span} seed{'s' if counts[-1] > 1 else ''}"


VERDICTS = {"spine": _verdict_spine, "multitask": _verdict_multitask, "abdomen": _verdict_abdomen, "han": _verdict_han}


def render_section(runs: dict) -> str:
    cpu = sum(r["cpu_s"]["total"] for r in runs.values())
    head = [SECTION, "",
            "Written by `benchmarks/convergence.py` (issue 16; not in CI) from the cached runs in "
            "`benchmarks/results/convergence/`. Every method is trained through the stock command until its "
            "validation stops improving (nnU-Net: nnU-Net's EMA pseudo-Dice, the value its `checkpoint_best` "
            "follows, once per epoch; Detectron2: COCO segm AP every 50 iterations) or until the CPU-time cap "
            "of the run (the last column; one thread, a shared 2-core machine), then the validation-best "
            "checkpoint is scored. Seeds: Detectron2 `SEED`, nnU-Net `ORGANMTL_SEED` (the `_Tiny` trainers "
            "seed torch/numpy/random with it; unset = nnU-Net's own unseeded behaviour). These are CPU-sized "
            "phantoms and tiny networks: the papers' numbers are not expected, only their direction.",
            "", f"Cached runs: {len(runs)}, {cpu / 60:.1f} CPU-minutes in total. Resume with "
            f"`{RESUME} --next` (one run per command, in the plan's order), or `{RESUME}` with the options "
            "a row names. Method rows: mean ± SD over the seeds done; \"stopped\": why the run ended "
            "(converged = patience rule, cap = CPU-time cap, schedule end) and the iteration of the "
            "validation-best checkpoint / of the last evaluation.", ""]
    return "\n".join(head) + "\n" + "\n\n".join(render_study(s, runs) for s in STUDIES) + "\n"


def write_figures(runs: dict, out_dir: Path = FIGURES) -> list[Path]:
    """One PNG per study with cached runs: the validation curve (the stop rule's quantity) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for spec in STUDIES:
        mine = {k: r for k, r in sorted(runs.items()) if k[0] == spec.key}
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for (_, method, seed), r in mine.items():
            curve = r["curve"]
            ax.plot([p["step"] for p in curve], [p["value"] for p in curve], label=f"{spec.method(method).label}, seed {seed}",
                    ls="-" if seed == 0 else "--")
        ax.set_xlabel("training iteration")
        ax.set_ylabel(mine[next(iter(mine))]["curve_quantity"])
        ax.set_title(spec.title, fontsize=8)
        ax.legend(fontsize=6)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / spec.figure
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_docs(results: Path = RESULTS, doc: Path = DOC) -> None:
    runs = load_runs(results)
    write_figures(runs)
    doc.write_text(replace_section(doc.read_text(), render_section(runs)))


# ---------------------------------------------------------------- running one training under the stop rule

def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a live process (``/proc/PID/stat``), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def monitored(cmd: list[str], env: dict, log_file: Path, read_curve, rule: Patience | None, cap_cpu_s: float,
              safe_to_stop=lambda: True, poll: float = 3.0) -> dict:
    """Run ``cmd`` (own process group); every ``poll`` s feed new points of ``read_curve()`` (a list of
    ``{"step", "value"}``) to ``rule`` and read the process' CPU time; stop it (SIGKILL to the group)
    once the rule says so or the cap is reached and ``safe_to_stop()`` (nnU-Net: no checkpoint being
    written). Returns ``{"stop_reason", "curve", "cpu_s"}``; a command that fails by itself raises."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    before = _children_cpu_s()
    with open(log_file, "a") as log:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    fed, reason, curve = 0, None, []
    try:
        while proc.poll() is None:
            time.sleep(poll)
            curve = read_curve()
            while rule is not None and fed < len(curve) and reason is None:
                if rule.update(curve[fed]["value"]):
                    reason = "converged"
                fed += 1
            if reason is None and _proc_cpu_s(proc.pid) >= cap_cpu_s:
                reason = "cap"
            if reason is not None and safe_to_stop():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # leftover workers
    except ProcessLookupError:
        pass
    if reason is None:
        if proc.returncode != 0:
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}\n{tail}")
        reason = "schedule end"
    return {"stop_reason": reason, "curve": read_curve(), "cpu_s": _children_cpu_s() - before}


def nnunet_curve(log_file: Path, iters_per_epoch: int) -> list[dict]:
    """Per finished epoch of an nnU-Net log: step (iterations so far), EMA pseudo-Dice (``value``),
    the mean pseudo-Dice and the losses (the demo's :class:`EpochLog` reads the lines)."""
    from organmtl.workflows.demo import EpochLog

    if not log_file.is_file():
        return []
    reader = EpochLog(0)
    for line in log_file.read_text(errors="replace").splitlines():
        reader.feed(line)
    means = [mean_finite(e.get("pseudo_dice", [])) for e in reader.epochs]
    return [{"step": (e["epoch"] + 1) * iters_per_epoch, "value": v, "pseudo_dice": m,
             "train_loss": e.get("train_loss"), "val_loss": e.get("val_loss")}
            for e, m, v in zip(reader.epochs, means, ema([m if m == m else 0.0 for m in means]))]


def nnunet_between_epochs(log_file: Path) -> bool:
    """True while the trainer is inside an epoch's training (its last ``Epoch N`` line comes after
    the last ``Epoch time`` line), i.e. not writing a checkpoint."""
    text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    lines = [_STAMP.sub("", line.strip()).strip() for line in text.splitlines()]
    starts = [i for i, s in enumerate(lines) if s.startswith("Epoch ") and s[6:].isdigit()]
    ends = [i for i, s in enumerate(lines) if s.startswith("Epoch time:")]
    return bool(starts) and (not ends or starts[-1] > ends[-1])


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+uncommitted changes" if dirty else "")


# ---------------------------------------------------------------- datasets (in the work folder)

def nnunet_env(work: Path) -> dict:
    """nnU-Net's folders and the run's thread count: ``nnUNetv2_train -device cpu`` sets one torch thread per
    core whatever ``OMP_NUM_THREADS`` says, so the organmtl trainers are told the count explicitly
    (``ORGANMTL_CPU_THREADS``); without it two runs side by side spin and the CPU-time cap is spent waiting."""
    from organmtl.nnunet_trainers.budget import THREADS_VARIABLE

    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return {"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
            "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1",
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", threads),
            THREADS_VARIABLE: threads}


def _prepared(work: Path, name: str, make) -> Path:
    """``work/name`` made once by ``make(folder)`` (a marker file says it is complete)."""
    folder, marker = work / name, work / f".{name}.done"
    if not marker.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        make(folder)
        marker.write_text("ok\n")
    return folder


def demo_data(work: Path, family: str) -> Path:
    from organmtl.demo_data import write_demo_data
    from organmtl.demo_data.han import write_han
    from organmtl.workflows.demo import N_TEST

    def make(folder):
        write_demo_data(folder, seed=0, families=[family])
        if family == "han_pddca":
            write_han(folder / "han_pddca_test", N_TEST, seed=0, first_index=100, with_missing=False)
    return _prepared(work, f"demo_{family}", make)


def nnunet_dataset(work: Path, study_key: str):
    """Convert + plan the demo study's dataset (the demo's own conversion commands) in ``work``."""
    from organmtl.nnunet_plans import plan_tiny
    from organmtl.workflows.demo import STUDIES as DEMO_STUDIES
    from organmtl.workflows.steps import convert, output_to

    demo = next(s for s in DEMO_STUDIES if s.key == study_key)
    os.environ.update(nnunet_env(work))
    data = demo_data(work, demo.families[0])
    raw = work / "nnUNet_raw" / f"Dataset{demo.dataset_id:03d}_{demo.name}"

    def make(_folder):
        with output_to(work / f"prepare_{study_key}.log"):
            for source, *options in demo.convert:
                convert(source, *(o.format(data=data, raw=work / "nnUNet_raw") for o in options))
            plan_tiny(demo.dataset_id, configurations=(demo.configuration,))
    _prepared(work, f"dataset_{study_key}", make)
    return demo, raw


def spine_coco(work: Path) -> Path:
    from organmtl.workflows.steps import convert, output_to

    data = demo_data(work, "spine")

    def make(folder):
        with output_to(work / "prepare_spine.log"):
            convert("volumes", data / "spine" / "spine_sag_mr", "--to", "coco", "--dataset-id", "502", "--name",
                    "SpineSagDemo", "--out", folder)
    return _prepared(work, "coco_spine", make)


# ---------------------------------------------------------------- one run per study kind

def run_detectron(spec: StudySpec, method: Method, seed: int, work: Path) -> dict:
    from importlib import resources

    from organmtl.evaluation.curves import read_detectron_metrics

    coco = spine_coco(work)
    out = work / "detectron2" / f"{method.key}__seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    config = resources.files("organmtl.detectron_heads") / method.trainer
    overrides = [x for k, v in method.budget.items() for x in (k, v)]
    cmd = [sys.executable, "-m", "organmtl.detectron_heads.train_net", "--config-file", str(config),
           "ORGANMTL.DATASET_ROOT", str(coco), "ORGANMTL.DATASET_NAME", "spine_sag_demo", *overrides,
           "SEED", str(seed), "OUTPUT_DIR", str(out)]

    def evaluations():
        path = out / "metrics.json"
        records = read_detectron_metrics(path) if path.is_file() else []
        return [r for r in records if "segm/AP" in r]

    def curve():
        return [{"step": int(r["iteration"]) + 1, "value": float(r["segm/AP"])} for r in evaluations()]

    result = monitored(cmd, {}, out / "train.log", curve, _copy(method.patience), method.cap_cpu_s)
    evals = evaluations()
    if not evals:
        raise RuntimeError(f"{out / 'metrics.json'}: no evaluation before the stop")
    best = max(evals, key=lambda r: r["segm/AP"] if r["segm/AP"] == r["segm/AP"] else -1)
    metrics = {k.split("/AP-", 1)[1]: {"segm AP": float(v)} for k, v in best.items() if k.startswith("segm/AP-")}
    for k, v in best.items():   # HMRNetEvaluator's per-class Dice and Hausdorff distance (mm)
        for prefix, metric in (("hmrnet/Dice-", "Dice"), ("hmrnet/HD-", "HD mm")):
            if k.startswith(prefix) and isinstance(v, (int, float)):
                metrics.setdefault(k[len(prefix):], {})[metric] = float(v)
    return {**result, "best_step": int(best["iteration"]) + 1, "metrics": metrics, "curve_quantity": "COCO segm AP",
            "cpu_s": {"train": result["cpu_s"], "total": result["cpu_s"]}, "best_record": best}


def _copy(rule: Patience | None) -> Patience | None:
    return None if rule is None else Patience(rule.patience, rule.min_delta, rule.min_evaluations)


def _train_nnunet(dataset_id: int, configuration: str, fold: int, method: Method, seed: int, work: Path, log: Path):
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    env = {**nnunet_env(work), **method.budget, "ORGANMTL_SEED": str(seed)}
    cmd = [_bin("nnUNetv2_train"), str(dataset_id), configuration, str(fold), "-tr", method.trainer, "-device", "cpu"]
    iters = int(method.budget["ORGANMTL_ITERS_PER_EPOCH"])
    result = monitored(cmd, env, log, lambda: nnunet_curve(log, iters), _copy(method.patience), method.cap_cpu_s,
                       safe_to_stop=lambda: nnunet_between_epochs(log))
    plans = work / "nnUNet_preprocessed" / convert_id_to_dataset_name(dataset_id) / "nnUNetPlans.json"
    result["patch_size"] = json.loads(plans.read_text())["configurations"][configuration]["patch_size"]
    curve = result["curve"]
    best = max(range(len(curve)), key=lambda i: curve[i]["value"]) if curve else None
    result["best_step"] = curve[best]["step"] if curve else 0
    result["best_epoch"] = best
    return env, result


def _bin(name: str) -> str:
    from organmtl.procs import venv_bin

    return venv_bin(name)


def _predict(env, dataset_id, configuration, fold, trainer, images: Path, out: Path, log: Path, probabilities=False):
    from organmtl.nnunet_trainers.focusnet.predict import predict_command
    from organmtl.procs import run_in_group

    if out.exists():
        shutil.rmtree(out)
    before = _children_cpu_s()
    run_in_group([*predict_command(trainer), "-i", str(images), "-o", str(out), "-d", str(dataset_id), "-c",
                  configuration, "-f", str(fold), "-tr", trainer, "-chk", "checkpoint_best.pth", "-device", "cpu",
                  "--disable_tta", "-npp", "1", "-nps", "1", *(["--save_probabilities"] if probabilities else [])],
                 env=env, log_file=log)
    return _children_cpu_s() - before


def _score(pred: Path, gt: Path, dataset_json: Path, eval_dir: Path) -> dict:
    """Dice (nnU-Net's evaluation) and HD95 mm (organmtl's) per structure."""
    from organmtl.evaluation.results import SUMMARY_JSON
    from organmtl.evaluation.segmentation import evaluate_folders

    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    dice = evaluate_folders(pred, gt, dataset_json, output_file=eval_dir / "nnunet" / "summary.json",
                            full_output_dir=eval_dir / "organmtl")
    full = json.loads((eval_dir / "organmtl" / SUMMARY_JSON).read_text())
    out = {}
    for name, d in dice.items():
        hd = full["segmentation"]["per_structure"].get(name, {}).get("hd95_mm")
        out[name] = {"Dice": d, "HD95 mm": hd.get("mean") if isinstance(hd, dict) else hd}
    return out


def _landmark_error(fold_dir: Path, epoch: int | None) -> float | None:
    """The joint trainers' logged validation landmark error (mm) at the best epoch."""
    import torch

    path = fold_dir / "checkpoint_best.pth"
    if epoch is None or not path.is_file():
        return None
    logging = torch.load(path, map_location="cpu", weights_only=False).get("logging", {})
    errors = logging.get("landmark_error_mm") or []
    return float(errors[min(epoch, len(errors) - 1)]) if errors else None


def run_nnunet(spec: StudySpec, method: Method, seed: int, work: Path) -> dict:
    demo, raw = nnunet_dataset(work, spec.key)
    tag = f"{method.key}__seed{seed}"
    runs = work / "runs" / spec.key / tag
    if runs.exists():
        shutil.rmtree(runs)
    results_dir = work / "nnUNet_results" / raw.name / f"{method.trainer}__nnUNetPlans__{demo.configuration}"
    fold = 0
    if spec.key == "multitask":
        return run_multitask(spec, method, seed, work, demo, raw, runs, results_dir)
    fold_dir = results_dir / f"fold_{fold}"
    if fold_dir.exists():
        shutil.rmtree(fold_dir)
    env, result = _train_nnunet(demo.dataset_id, demo.configuration, fold, method, seed, work, runs / "train.log")
    if spec.key == "han":
        images, gt = raw / "imagesTs", raw / "labelsTs"
    else:   # the fold's validation cases
        split = json.loads((work / "nnUNet_preprocessed" / raw.name / "splits_final.json").read_text())[fold]
        images, gt = runs / "val_images", runs / "val_labels"
        images.mkdir(parents=True)
        gt.mkdir(parents=True)
        for case in split["val"]:
            for f in raw.glob(f"imagesTr/{case}_*"):
                shutil.copyfile(f, images / f.name)
            for f in raw.glob(f"labelsTr/{case}.*"):
                shutil.copyfile(f, gt / f.name)
    predict_s = _predict(env, demo.dataset_id, demo.configuration, fold, method.trainer, images, runs / "pred",
                         runs / "predict.log")
    metrics = _score(runs / "pred", gt, raw / "dataset.json", runs / "eval")
    if "Joint" in method.trainer or "Uncertainty" in method.trainer:
        err = _landmark_error(fold_dir, result["best_epoch"])
        for m in metrics.values():
            m["landmark error mm"] = err
    return {**result, "metrics": metrics, "curve_quantity": "EMA pseudo-Dice (nnU-Net validation patches)",
            "cpu_s": {"train": result["cpu_s"], "predict": predict_s, "total": result["cpu_s"] + predict_s}}


def _multitask_experiment(raw: Path, work: Path, index: int):
    from organmtl.nnunet_trainers.multitask.tasks import TaskTable
    from organmtl.workflows.multitask_experiments import plan_experiments, write_splits

    meta = json.loads((raw / "dataset.json").read_text())
    table = TaskTable.from_dataset_json(meta, source=str(raw / "dataset.json"))
    ending = meta["file_ending"]
    labelled = {c for t in table.names for c in table.tasks[t].test_cases if (raw / "labelsTs" / f"{c}{ending}").is_file()}
    experiments = plan_experiments(table, table.names, labelled_test=labelled)
    write_splits(work / "nnUNet_preprocessed" / raw.name, experiments)
    return meta, table, experiments[index - 1]


def run_multitask(spec, method, seed, work, demo, raw, runs, results_dir) -> dict:
    """One experiment of ``organmtl multitask-experiments`` (its splits, its evaluation), trained
    under the stop rule and scored with the validation-best checkpoint."""
    from organmtl.workflows.multitask_experiments import Experiment, copy_test_images, evaluate_experiment

    meta, table, exp = _multitask_experiment(raw, work, method.subset)
    fold_dir = results_dir / f"fold_{exp.fold}"
    if fold_dir.exists():
        shutil.rmtree(fold_dir)
    env, result = _train_nnunet(demo.dataset_id, demo.configuration, exp.fold, method, seed, work, runs / "train.log")
    n_channels, ending = len(meta["channel_names"]), meta["file_ending"]
    test_in = copy_test_images(exp, raw, runs / "test_images", n_channels, ending)
    val_in = copy_test_images(Experiment(exp.index, exp.tasks, test=exp.val), raw, runs / "val_images", n_channels, ending)
    cpu = 0.0
    for images, out in ((test_in, runs / "test_pred"), (val_in, runs / "val_pred")):
        cpu += _predict(env, demo.dataset_id, demo.configuration, exp.fold, method.trainer, images, out,
                        runs / "predict.log", probabilities=True)
    rows = evaluate_experiment(exp, table, meta["labels"], raw / "labelsTr", runs / "val_pred", runs / "test_pred",
                               ending, raw / "labelsTs")
    metrics = {f"{r['task']}: {r['class']}": {"Dice": r["dice_argmax"], "Dice task-masked": r["dice_task_masked"]}
               for r in rows}
    return {**result, "metrics": metrics, "curve_quantity": "EMA pseudo-Dice (nnU-Net validation patches)",
            "experiment": {"index": exp.index, "tasks": list(exp.tasks), "n_train": len(exp.train),
                           "n_val": len(exp.val), "n_test": len(exp.test)},
            "cpu_s": {"train": result["cpu_s"], "predict": cpu, "total": result["cpu_s"] + cpu}}


def run_one(study_key: str, method_key: str, seed: int, work: Path, results: Path) -> dict:
    spec = study(study_key)
    method = spec.method(method_key)
    if seed not in spec.seeds_of(method):
        raise SystemExit(f"--seed {seed}: study {spec.key} plans seeds {spec.seeds_of(method)} for {method_key}")
    work.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    revision = git_revision()
    result = (run_detectron if spec.key == "spine" else run_nnunet)(spec, method, seed, work)
    curve = result["curve"]
    record = {"study": spec.key, "method": method.key, "seed": seed, "trainer_or_config": method.trainer,
              "budget": method.budget, "cap_cpu_s": method.cap_cpu_s,
              "patience": None if method.patience is None else {"patience": method.patience.patience,
                                                                "min_delta": method.patience.min_delta,
                                                                "min_evaluations": method.patience.min_evaluations},
              "stop_reason": result["stop_reason"], "best_step": result["best_step"],
              "last_step": curve[-1]["step"] if curve else 0, "curve": curve, "curve_quantity": result["curve_quantity"],
              "metrics": result["metrics"], "cpu_s": result["cpu_s"], "code_revision": revision,
              "started_utc": started.isoformat(timespec="seconds"),
              "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
              "threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    for extra in ("experiment", "best_record", "patch_size"):
        if extra in result:
            record[extra] = result[extra]
    path = save_run(results, record)
    print(f"{spec.key}/{method.key} seed {seed}: {record['stop_reason']} at step {record['last_step']} (best "
          f"{record['best_step']}), {record['cpu_s']['total']:.0f} CPU s -> {path}")
    return record


# ---------------------------------------------------------------- spine, matched (issue 26)
# Mask R-CNN vs HMR-Net on equal terms: the same iteration budget (no CPU cap, no patience), the same
# augmentation list and gradient clipping (the same config keys, INPUT.HMRNET_AUG and
# SOLVER.CLIP_GRADIENTS, set alike for both arms), a checkpoint picked on "select" slices and scored
# on separate "score" slices, with and without artefacts (organmtl.demo_data.spine.ARTEFACTS), on the
# predicted boxes and on the ground-truth boxes (oracle: shape/mask error without box error).

MATCHED_DIR = "spine/matched"
MATCHED_SPLITS = {"train": 80, "select": 20, "score": 60}
MATCHED_DATA_SEED = 26
MATCHED_ARMS = {"mask_rcnn": ("Mask R-CNN R18-FPN", "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml"),
                "hmrnet": ("HMR-Net R18-FPN", "hmrnet/configs/tiny/hmrnet_R_18_FPN_tiny.yaml"),
                # the paper's own Tables 5-6 comparison: the same network with a segmentation (mask) head
                "hmrnet_mask_head": ("HMR-Net R18-FPN, mask head",
                                     "hmrnet/configs/tiny/hmrnet_R_18_FPN_mask_head_tiny.yaml")}
#: the paper's augmentations (HMR-Net §3.1) and the tiny HMR-Net config's clipping, for both arms
MATCHED_AUG = ("flip", "rotate", "translate_scale", "crop", "blur")
MATCHED_CLIP = {"SOLVER.CLIP_GRADIENTS.ENABLED": "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "norm",
                "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": "5.0"}
MATCHED_SEEDS = (0, 1, 2)
MATCHED_BOOTSTRAP = 200
MATCHED_BOOTSTRAP_SUBSETS = ("all", "artefact", "clean")   # per-tag subsets: point value only
MATCHED_SUBSETS = ("all", "artefact", "clean", "metal", "low_contrast", "occlusion")


def matched_overrides(iters: int, eval_period: int) -> dict:
    """Config overrides given to every arm alike: schedule, evaluation/checkpoint period, augmentation, clipping."""
    return {"SOLVER.MAX_ITER": str(iters), "SOLVER.STEPS": f"({int(iters * 0.8)},)",
            "SOLVER.WARMUP_ITERS": str(min(20, iters // 5)), "TEST.EVAL_PERIOD": str(eval_period),
            "SOLVER.CHECKPOINT_PERIOD": str(eval_period),
            "INPUT.HMRNET_AUG.NAMES": "[" + ",".join(f"'{a}'" for a in MATCHED_AUG) + "]",
            **MATCHED_CLIP, "TEST.HMRNET.NUM_OVERLAYS": "0",
            # masks as bitmaps for every arm (HMR-Net's base setting): crop/rotate transform them as images
            # (polygon cropping would need shapely)
            "INPUT.MASK_FORMAT": "bitmask"}


def split_coco(coco: dict, splits: dict[str, list[str]]) -> dict[str, dict]:
    """One COCO dict per split (images by their ``case``, annotations with their images); a case in
    two splits or an image of no split is an error (the three sets must be disjoint and complete)."""
    where = {}
    for split, cases in splits.items():
        for case in cases:
            if case in where:
                raise ValueError(f"case {case} is in splits {where[case]} and {split}")
            where[case] = split
    out = {s: {**{k: v for k, v in coco.items() if k not in ("images", "annotations")}, "images": [],
               "annotations": []} for s in splits}
    image_split = {}
    for im in coco["images"]:
        if im.get("case") not in where:
            raise ValueError(f"image {im['file_name']}: case {im.get('case')} is in no split")
        image_split[im["id"]] = where[im["case"]]
        out[where[im["case"]]]["images"].append(im)
    for a in coco["annotations"]:
        out[image_split[a["image_id"]]]["annotations"].append(a)
    return out


def subset_image_ids(coco: dict, subset: str) -> list[int]:
    """Images of ``subset``: all, artefact (any tag), clean (no tag), or one tag."""
    from organmtl.converters.coco import TAGS_KEY

    def keep(tags):
        return {"all": True, "artefact": bool(tags), "clean": not tags}.get(subset, subset in tags)
    return [im["id"] for im in coco["images"] if keep(im.get(TAGS_KEY, []))]


def _segm_eval(gt: dict, dts: list[dict], image_ids):
    """pycocotools COCOeval (segm) of ``dts`` on the distinct ``image_ids`` of ``gt``, evaluated per image
    (not yet accumulated); None when there is no detection."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ids = set(image_ids)
    r = [d for d in dts if d["image_id"] in ids]
    if not r:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {**gt, "annotations": [{**a, "iscrowd": a.get("iscrowd", 0)} for a in gt["annotations"]]}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(r), "segm")
        ev.params.imgIds = sorted(ids)
        ev.evaluate()
    return ev


def _ap_of_draw(ev, image_ids) -> float:
    """COCO AP@[.5:.95] (x100) of an evaluated COCOeval over ``image_ids`` (repeats allowed: each draw of
    an image counts as one more image): the per-image evaluations are re-indexed, then accumulated."""
    import copy

    import numpy as np

    if ev is None:
        return 0.0
    p = ev.params
    pos = {img: n for n, img in enumerate(p.imgIds)}
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    draw = copy.copy(ev)
    draw.evalImgs = [ev.evalImgs[k * n_area * n_img + a * n_img + pos[i]]
                     for k in range(len(p.catIds)) for a in range(n_area) for i in image_ids]
    draw.params = copy.deepcopy(p)
    draw.params.imgIds = list(range(len(image_ids)))
    draw._paramsEval = copy.deepcopy(draw.params)
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        draw.accumulate()
    prec = draw.eval["precision"][:, :, :, 0, -1]      # IoU x recall x category; all areas, 100 detections
    prec = prec[prec > -1]
    return float(prec.mean() * 100) if prec.size else 0.0


def segm_ap(gt: dict, dts: list[dict], image_ids) -> float:
    """COCO segm AP@[.5:.95] (x100, pycocotools, as COCOeval's summary) of ``dts`` over ``image_ids`` of
    ``gt``; an image id may repeat (bootstrap draws): each draw counts as its own image."""
    image_ids = list(image_ids)
    return _ap_of_draw(_segm_eval(gt, dts, image_ids), image_ids)


def bootstrap_ci(gt: dict, dts: list[dict], image_ids, n: int = MATCHED_BOOTSTRAP, seed: int = 0):
    """95 % percentile bootstrap interval of :func:`segm_ap` over slices (``n`` draws with replacement;
    the per-image matching is computed once)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = list(image_ids)
    ev = _segm_eval(gt, dts, ids)
    values = [_ap_of_draw(ev, [ids[k] for k in rng.integers(0, len(ids), len(ids))]) for _ in range(n)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def seed_ci(values) -> tuple[float, float, float]:
    """Mean and 95 % t interval over seeds: mean +- t(0.975, n-1) * sd / sqrt(n)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def spine_matched_coco(work: Path) -> Path:
    """The matched study's COCO folder: write_spine_benchmark cases (train / select / score, artefact
    cases tagged), converted by the stock converter, split into instances_{train,val,score}.json."""
    from organmtl.converters.coco import tag_images
    from organmtl.demo_data.spine import write_spine_benchmark
    from organmtl.workflows.steps import convert, output_to

    def make(folder):
        vols = work / "spine_matched_volumes"
        if vols.exists():
            shutil.rmtree(vols)
        splits, tags = write_spine_benchmark(vols, MATCHED_SPLITS, MATCHED_DATA_SEED)
        with output_to(work / "prepare_spine_matched.log"):
            convert("volumes", vols, "--to", "coco", "--dataset-id", "526", "--name", "SpineSagMatched",
                    "--num-folds", "1", "--fold", "0", "--out", folder)
        ann = folder / "annotations"
        every = tag_images(json.loads((ann / "instances_val.json").read_text()), tags)
        parts = split_coco(every, splits)
        for split, name in (("train", "train"), ("select", "val"), ("score", "score")):
            (ann / f"instances_{name}.json").write_text(json.dumps(parts[split]))
    return _prepared(work, "coco_spine_matched", make)


def _score_inputs(cfg, coco_root: Path):
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    dicts = load_coco_json(str(coco_root / "annotations" / "instances_score.json"), str(coco_root / "images"),
                           "organmtl_spine_matched_score")
    mapper = DatasetMapper(cfg, is_train=False)
    return dicts, mapper


def score_checkpoint(config_yaml: Path, weights: Path, coco_root: Path, bootstrap: int = MATCHED_BOOTSTRAP) -> dict:
    """Segm AP of a checkpoint on the score slices, per subset, on its own boxes ("predicted") and on
    the ground-truth boxes ("oracle_box", HMRNet's predict_with_boxes), with bootstrap intervals."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.modeling import build_model
    from detectron2.structures import BoxMode

    from organmtl.detectron_heads.config import add_organmtl_config
    from organmtl.detectron_heads.hmrnet import add_hmrnet_config
    from organmtl.detectron_heads.hmrnet.evaluator import predict_with_boxes

    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    cfg.set_new_allowed(True)
    cfg.merge_from_file(str(config_yaml))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    model.eval()
    gt = json.loads((coco_root / "annotations" / "instances_score.json").read_text())
    cat_ids = sorted(c["id"] for c in gt["categories"])
    dicts, mapper = _score_inputs(cfg, coco_root)
    dts = {"predicted": [], "oracle_box": []}
    with torch.no_grad():
        for d in dicts:
            inp = mapper(dict(d))
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]]
            classes = [a["category_id"] for a in d["annotations"]]
            for mode, out in (("predicted", model([inp])[0]),
                              ("oracle_box", predict_with_boxes(model, [inp], [boxes], [classes])[0])):
                for r in instances_to_coco_json(out["instances"].to("cpu"), d["image_id"]):
                    r["category_id"] = cat_ids[r["category_id"]]
                    dts[mode].append(r)
    scores = {}
    for mode, results in dts.items():
        for subset in MATCHED_SUBSETS:
            ids = subset_image_ids(gt, subset)
            if not ids:
                continue
            lo, hi = (bootstrap_ci(gt, results, ids, bootstrap) if bootstrap and subset in MATCHED_BOOTSTRAP_SUBSETS
                      else (float("nan"),) * 2)
            scores[f"{mode}/{subset}"] = {"segm AP": segm_ap(gt, results, ids), "boot_lo": lo, "boot_hi": hi,
                                          "n_slices": len(ids)}
    return scores


def run_spine_matched(method: str, seed: int, iters: int, eval_period: int, work: Path, results: Path) -> dict:
    from importlib import resources

    from organmtl.evaluation.curves import read_detectron_metrics

    label, config = MATCHED_ARMS[method]
    coco = spine_matched_coco(work)
    out = work / "detectron2_matched" / f"{method}__seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    overrides = matched_overrides(iters, eval_period)
    started = datetime.datetime.now(datetime.timezone.utc)
    revision = git_revision()
    cmd = [sys.executable, "-m", "organmtl.detectron_heads.train_net", "--config-file",
           str(resources.files("organmtl.detectron_heads") / config), "ORGANMTL.DATASET_ROOT", str(coco),
           "ORGANMTL.DATASET_NAME", "spine_sag_matched", *[x for kv in overrides.items() for x in kv],
           "SEED", str(seed), "OUTPUT_DIR", str(out)]
    t0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out / "train.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    t1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"{out / 'train.log'}: train_net exited {rc}")
    evals = [r for r in read_detectron_metrics(out / "metrics.json") if "segm/AP" in r]
    best = max(evals, key=lambda r: r["segm/AP"] if r["segm/AP"] == r["segm/AP"] else -1)
    step = int(best["iteration"]) + 1
    weights = out / ("model_final.pth" if step >= iters else f"model_{int(best['iteration']):07d}.pth")
    scores = score_checkpoint(out / "config.yaml", weights, coco)
    record = {"study": "spine_matched", "method": method, "label": label, "seed": seed, "config": config,
              "overrides": overrides, "iterations": iters, "selected_step": step,
              "selection_curve": [{"step": int(r["iteration"]) + 1, "segm AP": float(r["segm/AP"])} for r in evals],
              "scores": scores, "splits": MATCHED_SPLITS, "data_seed": MATCHED_DATA_SEED,
              "bootstrap_draws": MATCHED_BOOTSTRAP, "code_revision": revision,
              "train_cpu_s": (t1.ru_utime + t1.ru_stime) - (t0.ru_utime + t0.ru_stime),
              "started_utc": started.isoformat(timespec="seconds"),
              "wall_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
              "threads": os.environ.get("OMP_NUM_THREADS", "unset")}
    path = Path(results) / MATCHED_DIR / f"{method}__seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"spine_matched/{method} seed {seed}: best step {step} of {iters}; score/all predicted "
          f"{scores['predicted/all']['segm AP']:.1f}, oracle box {scores['oracle_box/all']['segm AP']:.1f} -> {path}")
    return record


def load_matched(results: Path = RESULTS) -> dict[tuple[str, int], dict]:
    return {(r["method"], int(r["seed"])): r for r in
            (json.loads(p.read_text()) for p in sorted((Path(results) / MATCHED_DIR).glob("*__seed*.json")))}


def render_spine_matched(matched: dict) -> str:
    """Markdown of the matched spine comparison (issue 26): per arm, box source and subset, segm AP
    mean over seeds with its 95 % t interval, and the mean of the per-seed slice-bootstrap intervals."""
    lines = ["#### Matched comparison (issue 26): same iterations, augmentations and clipping; >= 3 seeds", ""]
    if not matched:
        return "\n".join(lines + ["Not run yet: `" + RESUME + " --spine-matched --method mask_rcnn hmrnet --seed 0 "
                                  "--iters N` for seeds 0, 1, 2 (the same N for both arms)."])
    any_r = next(iter(matched.values()))
    iters = sorted({r["iterations"] for r in matched.values()})
    lines += [f"Data: `write_spine_benchmark` (seed {any_r['data_seed']}), {any_r['splits']['train']} train / "
              f"{any_r['splits']['select']} selection / {any_r['splits']['score']} scoring slices, disjoint cases; "
              "every second case of each split has one artefact (metal streaks, low-contrast boundary, occlusion "
              "band; `organmtl/demo_data/spine.py`), tagged `organmtl_tags` in the COCO json. Both arms: "
              f"{', '.join(str(i) for i in iters)} iterations, augmentations {', '.join(MATCHED_AUG)} "
              "(`INPUT.HMRNET_AUG.NAMES`), gradient norm clipped at 5, evaluation and checkpoint every "
              f"{any_r['overrides']['TEST.EVAL_PERIOD']} iterations on the selection slices; the selection-best "
              "checkpoint is scored on the scoring slices on its own boxes (predicted) and on the ground-truth "
              "boxes (oracle box: `predict_with_boxes`, the ROI heads' `forward_with_given_boxes`). Cells: "
              "COCO segm AP, mean over seeds [95 % t interval over seeds]; bootstrap: mean over seeds of the 95 % "
              f"interval over scoring slices ({any_r['bootstrap_draws']} draws).", "",
              "| arm | boxes | subset (slices) | seeds | segm AP [95 % CI seeds] | bootstrap 95 % (slices) | selected step |",
              "|---|---|---|---|---|---|---|"]
    for method, (label, _) in MATCHED_ARMS.items():
        recs = [r for (m, _s), r in sorted(matched.items()) if m == method]
        if not recs:
            continue
        for mode in ("predicted", "oracle_box"):
            for subset in MATCHED_SUBSETS:
                key = f"{mode}/{subset}"
                vals = [r["scores"][key] for r in recs if key in r["scores"]]
                if not vals:
                    continue
                mean, lo, hi = seed_ci([v["segm AP"] for v in vals])
                blo = sum(v["boot_lo"] for v in vals) / len(vals)
                bhi = sum(v["boot_hi"] for v in vals) / len(vals)
                boot = f"[{blo:.1f}, {bhi:.1f}]" if blo == blo else "-"
                steps = ", ".join(str(r["selected_step"]) for r in recs)
                lines.append(f"| {label} | {mode.replace('_', ' ')} | {subset} ({vals[0]['n_slices']}) | {len(vals)} | "
                             f"{mean:.1f} [{lo:.1f}, {hi:.1f}] | {boot} | {steps} |")
    lines += ["", spine_matched_verdict(matched)]
    return "\n".join(lines)


def spine_matched_verdict(matched: dict) -> str:
    """Paired per-seed differences of segm AP on the artefact and clean scoring slices: HMR-Net vs its
    mask-head variant (the paper's Tables 5-6 comparison) and HMR-Net vs plain Mask R-CNN (issue 26's
    question; the paper has no Mask R-CNN comparison)."""
    def per_seed(method, key):
        return {s: r["scores"][key]["segm AP"] for (m, s), r in matched.items() if m == method and key in r["scores"]}
    out = []
    for other, what in (("hmrnet_mask_head", "Claim (HMR-Net paper Tables 5-6, in DSC on head-and-neck organs: shape "
                         "regression \"is similar or performs better\" than a segmentation head after ROIAlign on "
                         "samples with artefacts, and \"outperforms or is comparable\" on ambiguous boundaries)"),
                        ("mask_rcnn", "HMR-Net vs plain Mask R-CNN (issue 26; not a comparison the paper makes)")):
        parts = []
        for key in ("predicted/artefact", "predicted/clean", "oracle_box/artefact", "oracle_box/clean"):
            h, m = per_seed("hmrnet", key), per_seed(other, key)
            seeds = sorted(set(h) & set(m))
            if len(seeds) < 2:
                continue
            mean, lo, hi = seed_ci([h[s] - m[s] for s in seeds])
            parts.append(f"{key.replace('_', ' ')}: HMR-Net minus {MATCHED_ARMS[other][0]} {mean:+.1f} AP "
                         f"[{lo:+.1f}, {hi:+.1f}] ({len(seeds)} paired seeds)")
        out.append(f"{what}: " + ("; ".join(parts) if parts else "not yet measured (needs >= 2 paired seeds)") + ".")
    return "\n\n".join(out + ["Segm AP on the phantom, not the paper's DSC on patients; an interval over seeds that "
                              "excludes 0 supports a difference, one that includes 0 does not decide at this size."])

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=[s.key for s in STUDIES])
    p.add_argument("--method", nargs="+", help="one or more methods of --study, run one after the other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--next", action="store_true", help="run the first planned run without a cached result")
    p.add_argument("--list", action="store_true", help="list the planned runs and which are cached")
    p.add_argument("--write-docs", action="store_true", help="only rewrite the docs section and figures")
    p.add_argument("--force", action="store_true", help="run again although a result is cached")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="datasets, checkpoints, logs (not committed)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the cached run JSONs (committed)")
    p.add_argument("--spine-matched", action="store_true",
                   help="issue 26: the matched spine comparison (--method mask_rcnn and/or hmrnet, --seed, --iters)")
    p.add_argument("--iters", type=int, default=300, help="--spine-matched: iterations of every arm")
    p.add_argument("--eval-period", type=int, default=50, help="--spine-matched: selection evaluation period")
    args = p.parse_args(argv)
    if args.spine_matched:
        for m in args.method or list(MATCHED_ARMS):
            if m not in MATCHED_ARMS:
                p.error(f"--spine-matched --method {m}: choose from {', '.join(MATCHED_ARMS)}")
            run_spine_matched(m, args.seed, args.iters, args.eval_period, args.work.resolve(), args.results)
            if args.results.resolve() == RESULTS.resolve():   # the docs show the committed results only
                write_docs(args.results)
        return 0
    runs = load_runs(args.results)
    if args.list:
        for key in PLAN:
            r = runs.get(key)
            print(" ".join(map(str, key)), "-", f"done ({r['stop_reason']}, {r['cpu_s']['total']:.0f} CPU s)" if r else "not run")
        return 0
    if args.write_docs:
        write_docs(args.results)
        return 0
    if args.next:
        todo = missing_runs(PLAN, runs)
        if not todo:
            print("every planned run is cached")
            return 0
        keys = [todo[0]]
    elif args.study and args.method:
        keys = [(args.study, m, args.seed) for m in args.method]
    else:
        p.error("give --study and --method (and --seed), or --next, --list, --write-docs")
    for key in keys:
        if key in runs and not args.force:
            print(f"{key}: cached in {run_path(args.results, *key)} (--force to run again)")
        else:
            run_one(*key, work=args.work.resolve(), results=args.results)
        write_docs(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
