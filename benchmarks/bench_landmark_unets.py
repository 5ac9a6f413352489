"""Landmark U-Nets on the demo data at an equal CPU budget (issue #6, the two theses' tables in miniature).

Abdominal fat/water MR phantoms with hip-joint landmarks (``organmtl demo-data --families abdomen_mr``)
converted twice — with one Gaussian heatmap channel per landmark (auxiliary-task trainers and the
no-landmark baseline, which reads the image channels only) and with the paper's inverse Manhattan
distance map (early/late fusion) — and planned with ``organmtl plan-tiny`` (3d_tiny). Every method is
trained by the stock ``nnUNetv2_train`` with the same epochs x iterations; nnU-Net's own final
validation writes the fold-0 validation segmentations, scored here per organ (Dice, IoU), and the
auxiliary-task models predict the validation cases' landmarks with
``python -m organmtl.nnunet_trainers.landmarks.predict`` (error in mm vs the converted landmarks).
Step time: in this process, seconds per ``train_step`` on one fixed batch, each trainer against the
stock ``nnUNetTrainer`` on the same dataset and configuration (goal <= 1.1x).

    .venv/bin/python benchmarks/bench_landmark_unets.py --quick        # 2 epochs x 5 iterations
    .venv/bin/python benchmarks/bench_landmark_unets.py --device cuda  # 20 epochs x 50 iterations
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import describe_machine  # noqa: E402  (the suite runner's machine line)
from trainer_timing import initialized_trainer, train_step_seconds  # noqa: E402

HEAT, DIST = 651, 652
METHODS = [  # (row, dataset, trainer, has landmark tail)
    ("baseline (no landmarks)", HEAT, "nnUNetTrainerOMTLLandmarkImageOnly_Tiny", False),
    ("joint lambda=1", HEAT, "nnUNetTrainerOMTLLandmarkJoint_Tiny", True),
    ("joint lambda=10", HEAT, "nnUNetTrainerOMTLLandmarkJointL10_Tiny", True),
    ("joint lambda=1, Lite tail (1/4 width)", HEAT, "nnUNetTrainerOMTLLandmarkJointLite_Tiny", True),
    ("alternate", HEAT, "nnUNetTrainerOMTLLandmarkAlternate_Tiny", True),
    ("uncertainty", HEAT, "nnUNetTrainerOMTLLandmarkUncertainty_Tiny", True),
    ("early fusion (distance)", DIST, "nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny", False),
    ("late fusion (distance)", DIST, "nnUNetTrainerOMTLLandmarkLateFusion_Tiny", False),
]
CONFIG = "3d_tiny"


def _bin(name: str) -> str:
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


def _run(cmd, env, log: Path, timeout=3600):
    with open(log, "a") as f:
        r = subprocess.run([str(c) for c in cmd], env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} failed, see {log}:\n" + "\n".join(log.read_text().splitlines()[-15:]))


def prepare(root: Path, env: dict, n_cases: int) -> dict:
    """Demo data, the two conversions, tiny plans; returns {dataset id: raw folder}."""
    from organmtl.demo_data import write_demo_data

    demo = root / "demo"
    if not (demo / "abdomen_mr").is_dir():
        write_demo_data(demo, seed=0, families=["abdomen_mr"], n_cases=n_cases)
    out = {}
    for dataset_id, name, encoding in ((HEAT, "BenchLmHeat", ["heatmap", "--one-channel-per-landmark"]),
                                       (DIST, "BenchLmDist", ["distance"])):
        out[dataset_id] = root / "raw" / f"Dataset{dataset_id:03d}_{name}"
        if (root / "pre" / out[dataset_id].name / f"nnUNetPlans_{CONFIG}").is_dir() or \
                (root / "pre" / out[dataset_id].name / "nnUNetPlans_3d_fullres").is_dir():
            continue                                   # --work kept from an earlier run
        _run([_bin("organmtl"), "convert", "volumes", demo / "abdomen_mr", "--dataset-id", dataset_id, "--name", name,
              "--landmark-channels", *encoding], env, root / "prepare.log")
        _run([_bin("organmtl"), "plan-tiny", "-d", dataset_id, "-c", CONFIG, "-np", "1"], env, root / "prepare.log")
    return out


def score(raw: Path, fold: Path, predicted_landmarks: Path | None) -> dict:
    """Per-organ Dice/IoU of nnU-Net's validation segmentations; landmark error (mm) if predicted."""
    import SimpleITK as sitk

    from organmtl.evaluation.landmarks import evaluate_landmark_folders
    from organmtl.evaluation.metrics import dice, iou

    labels = {k: v for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items() if k != "background"}
    per = {k: {"dice": [], "iou": []} for k in labels}
    cases = sorted(p.name[:-7] for p in (fold / "validation").glob("*.nii.gz"))
    for case in cases:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(fold / "validation" / f"{case}.nii.gz")))
        gt = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{case}.nii.gz")))
        for name, value in labels.items():
            per[name]["dice"].append(dice(pred == value, gt == value))
            per[name]["iou"].append(iou(pred == value, gt == value))
    result = {"cases": cases, "dice": {k: float(np.mean(v["dice"])) for k, v in per.items()},
              "iou": {k: float(np.mean(v["iou"])) for k, v in per.items()}}
    result["mean_dice"] = float(np.mean(list(result["dice"].values())))
    result["mean_iou"] = float(np.mean(list(result["iou"].values())))
    if predicted_landmarks is not None:
        gt_dir = fold / "landmarks_gt"
        gt_dir.mkdir(exist_ok=True)
        for case in cases:
            (gt_dir / f"{case}.json").write_bytes((raw / "landmarks" / f"{case}.json").read_bytes())
        _, summary = evaluate_landmark_folders(predicted_landmarks, gt_dir)
        result["landmark_error_mm"] = summary["error_mm"]["mean"]
    return result


def step_times(raw_folders: dict, env: dict, device: str, steps: int, methods=METHODS) -> dict:
    """Seconds per train_step (median of ``steps`` after one warm-up) on one fixed batch per dataset."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    import organmtl.nnunet_trainers as trainers

    out = {}
    for dataset_id, raw in raw_folders.items():
        pre = Path(env["nnUNet_preprocessed"]) / raw.name
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((pre / "dataset.json").read_text())
        batch = None
        names = ["nnUNetTrainer"] + [tr for _, d, tr, _ in methods if d == dataset_id]
        for name in names:
            cls = nnUNetTrainer if name == "nnUNetTrainer" else getattr(trainers, name)
            trainer = initialized_trainer(cls, plans, CONFIG, dataset_json, device)
            if batch is None:
                batch = next(trainer.get_dataloaders()[0])
            out[(dataset_id, name)] = float(np.median(train_step_seconds(trainer, batch, steps)))
    return out


def _ratio(value, reference) -> str:
    if value is None or reference in (None, 0) or not np.isfinite(value) or not np.isfinite(reference):
        return "n/a"
    return f"{value / reference:.2f}x"


def _parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of training and prediction")
    p.add_argument("--quick", action="store_true", help="2 epochs x 5 iterations, 5 cases, 3 timed steps")
    p.add_argument("--work", type=Path, default=None, help="keep the work folder here (default: a temporary one); "
                                                           "methods already trained there are not trained again")
    p.add_argument("--only", nargs="+", default=None, metavar="TRAINER",
                   help="a subset of the methods (trainer names; the baseline is always included)")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs per trainer")
    p.add_argument("--iters", type=int, default=None, help="override the iterations per epoch")
    p.add_argument("--steps", type=int, default=None, help="override the timed train steps per method (0: no timing)")
    return p.parse_args(argv)


def _train_and_score(methods, raw: dict, root: Path, env: dict, device: str) -> dict:
    """Train each method (unless trained in ``root`` by an earlier run), predict landmarks of the tail
    trainers' validation cases, score; one result row per method."""
    from tqdm import tqdm

    results = {}
    for row, dataset_id, trainer, tail in tqdm(methods, desc="methods"):
        log = root / f"{trainer}.log"
        fold = root / "res" / raw[dataset_id].name / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
        t0 = time.perf_counter()
        if not (fold / "checkpoint_final.pth").is_file():      # else trained by an earlier run with --work
            _run([_bin("nnUNetv2_train"), dataset_id, CONFIG, 0, "-tr", trainer, "-device", device], env, log)
            (fold / "train_wall_s.txt").write_text(str(time.perf_counter() - t0))
        wall = float((fold / "train_wall_s.txt").read_text()) if (fold / "train_wall_s.txt").is_file() else float("nan")
        landmarks = None
        if tail:
            inp = root / f"in_{trainer}"
            inp.mkdir(exist_ok=True)
            for case in sorted(q.name[:-7] for q in (fold / "validation").glob("*.nii.gz")):
                for c in range(2):   # fat, water: the image channels only
                    name = f"{case}_{c:04d}.nii.gz"
                    (inp / name).write_bytes((raw[dataset_id] / "imagesTr" / name).read_bytes())
            landmarks = root / f"pred_{trainer}"
            if not list(landmarks.glob("*.json")):            # else predicted by an earlier run with --work
                _run([sys.executable, "-m", "organmtl.nnunet_trainers.landmarks.predict", "-i", inp, "-o", landmarks,
                      "-d", dataset_id, "-c", CONFIG, "-f", 0, "-tr", trainer, "-device", device, "--disable_tta"],
                     env, log)
        results[row] = {"trainer": trainer, "train_wall_s": wall, **score(raw[dataset_id], fold, landmarks)}
    return results


def _tables(results: dict, methods, epochs: int, iters: int, device: str, machine: str) -> str:
    base = results[METHODS[0][0]]
    organs = list(base["dice"])
    lines = [f"Landmark U-Nets, {CONFIG}, {epochs} epochs x {iters} iterations per method, fold 0 "
             f"({len(base['cases'])} validation cases), device {device}. Ratios: Dice/IoU to the no-landmark "
             "baseline, step time to the stock nnUNetTrainer on the same dataset, same run.", "",
             "| method | mean Dice | mean IoU | landmark error (mm) | s / train step | train wall (s) |",
             "|---|---|---|---|---|---|"]
    for row, _, _, _ in METHODS:
        r = results[row]
        if r.get("not_run"):
            lines.append(f"| {row} | not run (--only) | | | {r['step_s']:.3f} ({_ratio(r['step_s'], r['stock_step_s'])} "
                         f"of stock) | |")
            continue
        lm = r.get("landmark_error_mm")
        lm_text = f"{lm:.1f} ({_ratio(lm, results.get('joint lambda=1', {}).get('landmark_error_mm'))} of joint 1)" \
            if lm is not None else "n/a"
        lines.append(f"| {row} | {r['mean_dice']:.3f} ({_ratio(r['mean_dice'], base['mean_dice'])}) | "
                     f"{r['mean_iou']:.3f} ({_ratio(r['mean_iou'], base['mean_iou'])}) | {lm_text} | "
                     f"{r['step_s']:.3f} ({_ratio(r['step_s'], r['stock_step_s'])} of stock) | "
                     f"{r['train_wall_s']:.0f} ({_ratio(r['train_wall_s'], base['train_wall_s'])}) |")
    lines += ["", "Per-organ Dice (ratio to the baseline):", "",
              "| method | " + " | ".join(organs) + " |", "|---|" + "---|" * len(organs)]
    for row, _, _, _ in methods:
        r = results[row]
        lines.append(f"| {row} | " + " | ".join(f"{r['dice'][o]:.3f} ({_ratio(r['dice'][o], base['dice'][o])})"
                                                  for o in organs) + " |")
    lines += ["", f"Machine: {machine}"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Train every method at the same budget, score it, time its train step; print Markdown tables."""
    args = _parse(argv)
    methods = [m for m in METHODS if args.only is None or m is METHODS[0] or m[2] in args.only]
    epochs, iters, n_cases, steps = (2, 5, 5, 3) if args.quick else (20, 50, 10, 10)
    epochs, iters = args.epochs or epochs, args.iters or iters
    steps = steps if args.steps is None else args.steps
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_landmarks_")
        args.work = Path(tmp.name)
    root = args.work
    root.mkdir(parents=True, exist_ok=True)
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"), "nnUNet_results": str(root / "res"),
           "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "ORGANMTL_EPOCHS": str(epochs),
           "ORGANMTL_ITERS_PER_EPOCH": str(iters), "ORGANMTL_VAL_ITERS": "2"}
    os.environ.update(env)        # nnunetv2.paths reads these when first imported (step_times)
    raw = prepare(root, env, n_cases)
    results = _train_and_score(methods, raw, root, env, args.device)
    times = step_times(raw, env, args.device, steps, METHODS) if steps else {}   # step time of every method
    for row, dataset_id, trainer, _ in METHODS:
        results.setdefault(row, {"trainer": trainer, "not_run": True})
        results[row]["step_s"] = times.get((dataset_id, trainer), float("nan"))
        results[row]["stock_step_s"] = times.get((dataset_id, "nnUNetTrainer"), float("nan"))
    machine = describe_machine()
    text = _tables(results, methods, epochs, iters, args.device, machine)
    print(text)
    if tmp is not None:
        tmp.cleanup()
    return {"markdown": text, "machine": machine, "results": results, "epochs": epochs, "iterations": iters}


if __name__ == "__main__":
    main()
