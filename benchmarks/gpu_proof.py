#!/usr/bin/env python
"""Every trainer on one GPU in one short run: the stock commands with AMP, their step time as a ratio
to the stock trainer of the same run, peak GPU memory against the memory plan, finite losses and a
prediction written (issue 28; the plan for the bare GPU machine is in docs/scaling.md, "A GPU proof run").

Two steps, so that the device minutes go to the GPU work:

``prepare`` (CPU, here): ``organmtl demo-data --families han_pddca --size pddca`` (100 x 256 x 256 at
1 x 1 x 2.5 mm), converted plain and with landmark heatmap channels and planned by the stock
``nnUNetv2_plan_and_preprocess -c 3d_fullres`` (``bench_full_size.prepare``: one fold, the first case
validates), the demo spine slices as COCO, and the stock trainer's GPU memory prediction (the memory
plan's CPU probes at its plan; the organmtl trainers make their own at training start). It writes
``WORK/manifest.json``. ``--smoke``: the demo-sized phantom planned by ``organmtl plan-tiny`` (3d_tiny).

``run`` (the GPU): for each nnU-Net family (the stock ``nnUNetTrainer`` as ``nnUNetTrainerOMTLBaseline_Tiny``,
i.e. nnU-Net's own ``train_step`` with the ``ORGANMTL_*`` run length, then FocusNetV2 through its five
phases, LandmarkJoint, LandmarkLateFusion, MultiTaskUNet, Triplanar, PartialLabels) the stock
``nnUNetv2_train D CONFIG 0 -tr TRAINER -device cuda`` (nnU-Net's AMP; its entry point
``run_training_entry`` runs in a process that times every ``train_step`` and reads
``torch.cuda.max_memory_allocated``), then ``nnUNetv2_predict`` of the validation case; HMR-Net R50 and
Mask R-CNN R50 for 50 iterations through ``train_net.py --num-gpus 1`` (its end-of-training evaluation
writes the predictions). One table (Markdown, JSON under ``benchmarks/results/gpu/``, ``--docs``: the
"GPU proof run" section of docs/benchmarks.md); each row is saved as soon as it is measured, so a run
cut short still leaves its rows.

    .venv/bin/python benchmarks/gpu_proof.py prepare --work .gpu_payload/work            # CPU, ~10 min
    python3 benchmarks/gpu_proof.py run --work .gpu_payload/work --device cuda --docs   # GPU, < 8 min
    .venv/bin/python benchmarks/gpu_proof.py all --work /tmp/gp --device cpu --smoke     # CI-sized, same path

``--smoke``: 1 iteration per nnU-Net epoch (FocusNet: one epoch per phase), 4 Detectron2 iterations (its
timer skips 3), the tiny R18 Detectron2 configs, the 3d_tiny plans, ``nnUNetv2_predict --disable_tta``.
"""
from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS_DIR = REPO / "benchmarks" / "results" / "gpu"
SECTION = "## GPU proof run (gpu_proof.py)"
MANIFEST = "manifest.json"

#: nnU-Net families: key -> (trainer, dataset kind of the manifest)
NNUNET = {
    "stock": ("nnUNetTrainerOMTLBaseline_Tiny", "plain"),
    "focusnetv2": ("nnUNetTrainerOMTLFocusNetV2", "plain"),
    "landmark_joint": ("nnUNetTrainerOMTLLandmarkJoint", "landmark"),
    "landmark_late_fusion": ("nnUNetTrainerOMTLLandmarkLateFusion", "landmark"),
    "multitask_unet": ("nnUNetTrainerOMTLMultiTaskUNet", "plain"),
    "triplanar": ("nnUNetTrainerOMTLTriplanar", "plain"),
    "partial_labels": ("nnUNetTrainerOMTLPartialLabels", "plain"),
}
FOCUSNET_PHASES = ("snet", "sol", "ae", "sos", "joint")
#: Detectron2 families: key -> (full config, smoke config), relative to the organmtl.detectron_heads package
DETECTRON = {
    "mask_rcnn": ("configs/mask_rcnn_R_50_FPN_baseline.yaml", "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml"),
    "hmrnet": ("hmrnet/configs/hmrnet_R_50_FPN.yaml", "hmrnet/configs/tiny/hmrnet_R_18_FPN_tiny.yaml"),
}
BASELINE = {"nnunet": "stock", "detectron2": "mask_rcnn"}
#: run order: the two baselines first; the triplanar CNN (the costliest sliding-window validation) last
FAMILIES = ("stock", "focusnetv2", "landmark_joint", "landmark_late_fusion", "multitask_unet", "partial_labels",
            "mask_rcnn", "hmrnet", "triplanar")
assert set(FAMILIES) == {*NNUNET, *DETECTRON}


def _load_sibling(name: str):
    """A script beside this one as a module (the benchmarks folder is no package)."""
    spec = importlib.util.spec_from_file_location(f"_gpu_proof_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bin(name: str) -> str:
    from organmtl.procs import venv_bin

    return venv_bin(name)


def _run(cmd: list, env: dict, log: Path, timeout: float) -> float:
    """``cmd`` in its own process group (killed on timeout), output appended to ``log``; wall seconds."""
    from organmtl.procs import run_in_group

    print("$", " ".join(map(str, cmd)), flush=True)
    t0 = time.perf_counter()
    run_in_group([str(c) for c in cmd], env=env, log_file=log, timeout=timeout)
    return time.perf_counter() - t0


# ------------------------------------------------------------------ prepare (CPU)

def dataset_entry(dataset_id: int, name: str, raw_root: Path, pre_root: Path, configuration: str) -> dict:
    """One nnU-Net dataset of the manifest: its folders, configuration and the case to predict (the first
    validation case of fold 0, all its channels)."""
    pre = Path(pre_root) / name
    splits = json.loads((pre / "splits_final.json").read_text())
    case = sorted(splits[0]["val"])[0]
    images = sorted(str(p) for p in (Path(raw_root) / name / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].*"))
    if not images:
        raise FileNotFoundError(f"{Path(raw_root) / name / 'imagesTr'}: no image of validation case {case}")
    return {"id": int(dataset_id), "name": name, "raw_root": str(raw_root), "preprocessed_root": str(pre_root),
            "configuration": configuration, "predict_case": case, "predict_images": images}


def stock_prediction(entry: dict) -> dict:
    """The GPU memory plan's prediction for the stock trainer at its plan (the same CPU probes and rule the
    organmtl trainers run at their training start; fp16 AMP probed under bf16, as nnU-Net trains), computed in
    a child process (nnU-Net reads its folders from the environment once, at import)."""
    results = Path(entry["preprocessed_root"]).parent / "prepare_results"
    out = subprocess.run([sys.executable, __file__, "_stock", json.dumps(entry)], capture_output=True, text=True,
                         env={**os.environ, **_nnunet_env(entry, results)})
    if out.returncode:
        raise RuntimeError(f"stock memory prediction failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_stock(entry: dict) -> None:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from organmtl.nnunet_trainers import gpu_memory as G

    trainer = get_trainer_from_args(str(entry["id"]), entry["configuration"], 0, NNUNET["stock"][0], "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.initialize()
    cm = trainer.configuration_manager
    patch, batch = [int(p) for p in cm.patch_size], int(cm.batch_size)
    model = G.probe(trainer.network, trainer.num_input_channels, G.probe_patch(patch, G.pooling_steps(cm)),
                    trainer.optimizer, G.PROBE_AMP["fp16"])
    print(json.dumps({"patch_size": patch, "batch_size": batch, "predicted_gib": round(model.predicted_gib(patch, batch), 3),
                      "fixed_bytes": model.fixed_bytes, "per_voxel_bytes": model.per_voxel_bytes,
                      "floor_bytes": model.floor_bytes}))


PATH_KEYS = ("raw_root", "preprocessed_root", "root")


def _relocate(manifest: dict, work: Path, to_relative: bool) -> dict:
    """Paths inside ``work`` stored relative to it (the folder travels to the GPU machine), absolute when read."""
    work = Path(work).resolve()

    def conv(p: str) -> str:
        if to_relative:
            q = Path(p).resolve()
            return str(q.relative_to(work)) if q.is_relative_to(work) else str(q)
        return str(work / p) if not Path(p).is_absolute() else p

    out = json.loads(json.dumps(manifest))
    for d in (*out["datasets"].values(), out["coco"]):
        for k in PATH_KEYS:
            if k in d:
                d[k] = conv(d[k])
        if "predict_images" in d:
            d["predict_images"] = [conv(p) for p in d["predict_images"]]
    return out


def write_manifest(work: Path, datasets: dict, coco: dict, smoke: bool) -> dict:
    """``WORK/manifest.json``: the datasets (``plain``, ``landmark``: :func:`dataset_entry`), the COCO folder
    (``root``, ``name``), the stock trainer's memory prediction and whether these are smoke-sized data.
    Paths inside ``work`` are stored relative to it."""
    manifest = {"smoke": bool(smoke), "datasets": datasets, "coco": coco,
                "stock_prediction": stock_prediction(datasets["plain"]),
                "prepared": time.strftime("%Y-%m-%d %H:%M")}
    (Path(work) / MANIFEST).write_text(json.dumps(_relocate(manifest, work, True), indent=1) + "\n")
    return manifest


def read_manifest(work: Path) -> dict:
    path = Path(work) / MANIFEST
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run 'gpu_proof.py prepare --work {work}' first)")
    return _relocate(json.loads(path.read_text()), work, False)


def prepare(work: Path, smoke: bool, cases: int) -> dict:
    """Demo data -> the two nnU-Net datasets (planned, one validation case) and the spine COCO folder."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    full = _load_sibling("bench_full_size")
    env = full.nnunet_env(work)
    os.environ.update(env)
    if smoke:
        folders = _prepare_tiny(work, full, env, cases)
        configuration = "3d_tiny"
    else:
        folders = full.prepare(work, "pddca", cases)
        configuration = full.CONFIG
    kinds = {"plain": full.PLAIN, "landmark": full.LANDMARK}
    datasets = {kind: dataset_entry(ds_id, folders[ds_id].name, work / "raw", work / "pre", configuration)
                for kind, ds_id in kinds.items()}
    coco = work / "coco_spine"
    if not (coco / "annotations" / "instances_val.json").is_file():
        demo = work / "demo_spine"
        if not (demo / "spine").is_dir():
            full._run([_bin("organmtl"), "demo-data", demo, "--families", "spine", "--n-cases", 6], env)
        full._run([_bin("organmtl"), "convert", "volumes", demo / "spine" / "spine_sag_mr", "--to", "coco",
                   "--dataset-id", 30, "--out", coco], env)
    return write_manifest(work, datasets, {"root": str(coco), "name": "gpu_proof_spine"}, smoke)


def _prepare_tiny(work: Path, full, env: dict, cases: int) -> dict:
    """The demo-sized HaN phantom converted plain and with landmark channels, each ``organmtl plan-tiny``."""
    demo = work / "demo"
    if not (demo / "han_pddca").is_dir():
        full._run([_bin("organmtl"), "demo-data", demo, "--families", "han_pddca", "--n-cases", cases], env)
    folders = {}
    for ds_id, (name, options) in full.DATASETS.items():
        folders[ds_id] = work / "pre" / f"Dataset{ds_id}_{name}"
        if not (work / "raw" / f"Dataset{ds_id}_{name}" / "dataset.json").is_file():
            full._run([_bin("organmtl"), "convert", "pddca", demo / "han_pddca", "--dataset-id", ds_id, "--name", name,
                       *options], env)
        if not (folders[ds_id] / "nnUNetPlans.json").is_file():
            full._run([_bin("organmtl"), "plan-tiny", "-d", ds_id, "-np", "1"], env)
        one_validation_case(folders[ds_id])
    return folders


def one_validation_case(preprocessed: Path) -> None:
    """One fold whose validation set is the first case (nnU-Net's final validation predicts all of them)."""
    splits = Path(preprocessed) / "splits_final.json"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (Path(preprocessed) / "gt_segmentations").glob("*.nii.gz"))
    splits.write_text(json.dumps([{"train": cases[1:], "val": cases[:1]}]))


# ------------------------------------------------------------------ children: the stock entry points, observed

def _memory(device: str) -> dict:
    import resource

    out = {"cpu_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 3)}
    import torch

    if device == "cuda" and torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(gpu_max_allocated_gib=round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3),
                   gpu_max_reserved_gib=round(torch.cuda.max_memory_reserved() / 1024 ** 3, 3))
    return out


def child_train(stats_path: Path, device: str, argv: list[str]) -> None:
    """``nnUNetv2_train ARGV`` (its console-script function ``run_training_entry``) with every ``train_step``
    timed (CUDA synchronised; nnU-Net's step already waits for its loss) and its loss and phase kept; the
    memory peaks at the end of training and at exit go to ``stats_path``."""
    import numpy as np
    import torch
    from nnunetv2.run import run_training as rt
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    stats: dict = {"steps": [], "argv": argv}

    def save():
        stats["exit_memory"] = _memory(device)
        Path(stats_path).write_text(json.dumps(stats))

    atexit.register(save)
    original = nnUNetTrainer.run_training

    def run_training(self):
        step = self.train_step

        def timed(batch):
            t0 = time.perf_counter()
            out = step(batch)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            loss = out.get("loss") if isinstance(out, dict) else None
            stats["steps"].append({"epoch": int(self.current_epoch), "phase": getattr(self, "current_phase", None),
                                   "start": t0, "s": time.perf_counter() - t0,
                                   "loss": None if loss is None else float(np.mean(loss))})
            return out

        self.train_step = timed
        try:
            return original(self)
        finally:
            del self.train_step
            stats["train_memory"] = _memory(device)
            stats["epoch_train_losses"] = [float(x) for x in self.logger.get_value("train_losses", step=None)]
            stats["batch_size"] = int(self.configuration_manager.batch_size)
            stats["patch_size"] = [int(p) for p in self.configuration_manager.patch_size]
            Path(stats_path).write_text(json.dumps(stats))

    nnUNetTrainer.run_training = run_training
    sys.argv = ["nnUNetv2_train", *argv]
    rt.run_training_entry()


def child_detectron(stats_path: Path, device: str, argv: list[str]) -> None:
    """``train_net.py ARGV`` (organmtl.detectron_heads.train_net.cli) with the memory peak at exit kept."""
    def save():
        Path(stats_path).write_text(json.dumps({"exit_memory": _memory(device), "argv": argv}))

    atexit.register(save)
    from organmtl.detectron_heads import train_net

    sys.argv = ["train_net.py", *argv]
    train_net.cli()


# ------------------------------------------------------------------ run (the GPU)

def _nnunet_env(entry: dict, results: Path) -> dict:
    return {"nnUNet_raw": entry["raw_root"], "nnUNet_preprocessed": entry["preprocessed_root"],
            "nnUNet_results": str(results)}


def _finite(values) -> bool:
    values = [v for v in values if v is not None]
    return bool(values) and all(math.isfinite(v) for v in values)


def _median_after_warmup(steps: list[dict], key: str = "s") -> float | None:
    """Median of each epoch's steps after its first two (cuDNN autotuning, allocator growth; all of them
    when an epoch has fewer than three), over the epochs."""
    epochs: dict[int, list[float]] = {}
    for s in steps:
        epochs.setdefault(s["epoch"], []).append(s[key])
    kept = [v for vals in epochs.values() for v in (vals[2:] if len(vals) > 2 else vals) if v is not None]
    return statistics.median(kept) if kept else None


def _iteration_walls(steps: list[dict]) -> list[dict]:
    """Per step, the time from its start to the next step's start in the same epoch (data wait included)."""
    out = []
    for a, b in zip(steps, steps[1:]):
        if a["epoch"] == b["epoch"]:
            out.append({"epoch": a["epoch"], "wall": b["start"] - a["start"]})
    return out


def step_summary(steps: list[dict], phased: bool) -> dict:
    """Step time (median after warm-up; FocusNet: per phase, and their mean weighted by the default phase
    shares of :data:`organmtl.nnunet_trainers.focusnet.options.DEFAULT_PHASE_SHARE`) and iteration wall time."""
    out = {"steps": len(steps), "step_s": _median_after_warmup(steps)}
    walls = _iteration_walls(steps)
    out["iteration_wall_s"] = _median_after_warmup(walls, "wall") if walls else None
    if phased:
        from organmtl.nnunet_trainers.focusnet.options import DEFAULT_PHASE_SHARE

        per = {p: _median_after_warmup([s for s in steps if s["phase"] == p]) for p in FOCUSNET_PHASES}
        out["phase_step_s"] = per
        if all(v is not None for v in per.values()):
            out["step_s"] = sum(DEFAULT_PHASE_SHARE[p] * per[p] for p in FOCUSNET_PHASES) / sum(DEFAULT_PHASE_SHARE.values())
    return out


def _plan_record(results: Path, entry: dict, trainer: str) -> dict | None:
    from organmtl.nnunet_trainers.gpu_memory import PLANS_KEY

    plans = results / entry["name"] / f"{trainer}__nnUNetPlans__{entry['configuration']}" / "plans.json"
    if not plans.is_file():
        return None
    return json.loads(plans.read_text())["configurations"][entry["configuration"]].get(PLANS_KEY)


def run_nnunet(key: str, manifest: dict, args, out_dir: Path) -> dict:
    """Train family ``key`` with the stock command, then predict its dataset's validation case."""
    trainer, kind = NNUNET[key]
    entry = manifest["datasets"][kind]
    results = out_dir / "nnunet_results"
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    epochs, iters = (1, 1) if args.smoke else (args.epochs, args.iters)
    env = {**_nnunet_env(entry, results), "nnUNet_compile": "f",
           "ORGANMTL_EPOCHS": str(epochs * (len(FOCUSNET_PHASES) if key == "focusnetv2" else 1)),
           "ORGANMTL_ITERS_PER_EPOCH": str(iters), "ORGANMTL_VAL_ITERS": "1"}
    if key == "focusnetv2":
        env["ORGANMTL_FOCUSNET_PHASE_EPOCHS"] = ",".join(f"{p}={epochs}" for p in FOCUSNET_PHASES)
    fold_dir = results / entry["name"] / f"{trainer}__nnUNetPlans__{entry['configuration']}" / "fold_0"
    if fold_dir.exists():
        shutil.rmtree(fold_dir)
    stats_path = logs / f"{key}_train.json"
    row = {"family": key, "framework": "nnunet", "trainer": trainer, "dataset": entry["name"],
           "configuration": entry["configuration"], "epochs": int(env["ORGANMTL_EPOCHS"]), "iterations_per_epoch": iters}
    row["train_wall_s"] = round(_run([sys.executable, __file__, "_train", stats_path, args.device, str(entry["id"]),
                                      entry["configuration"], "0", "-tr", trainer, "-device", args.device],
                                     env, logs / f"{key}_train.log", args.timeout), 1)
    stats = json.loads(stats_path.read_text())
    row.update(step_summary(stats["steps"], key == "focusnetv2"))
    losses = [s["loss"] for s in stats["steps"]]
    row["losses_finite"] = _finite(losses) and _finite(stats.get("epoch_train_losses", []))
    row["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    row["patch_size"], row["batch_size"] = stats.get("patch_size"), stats.get("batch_size")
    row["memory"] = {"train": stats.get("train_memory", {}), "process": stats.get("exit_memory", {})}
    record = _plan_record(results, entry, trainer)
    if record is not None:
        row["plan"] = {"source": "the trainer's GPU memory plan (plans.json)", "predicted_gib": record["predicted_gib"],
                       "target_gib": record["options"]["gpu_memory_gib"], "amp": record["options"]["amp"],
                       "planned_patch_size": record["planned_patch_size"], "planned_batch_size": record["planned_batch_size"]}
    elif key != "stock":             # trained off CUDA without ORGANMTL_GPU_MEMORY_GB: no GPU to plan for
        row["plan"] = None
    else:
        sp = manifest["stock_prediction"]
        row["plan"] = {"source": "the same probes and rule at the stock plan (prepare step)",
                       "predicted_gib": sp["predicted_gib"], "amp": "fp16",
                       "planned_patch_size": sp["patch_size"], "planned_batch_size": sp["batch_size"]}
    inp, pred = out_dir / "predict_in" / key, out_dir / "predictions" / key
    for d in (inp, pred):
        shutil.rmtree(d, ignore_errors=True)
    inp.mkdir(parents=True)
    for image in entry["predict_images"]:
        shutil.copy(image, inp / Path(image).name)
    from organmtl.nnunet_trainers.focusnet.predict import predict_command     # FocusNet: one paste per case

    row["predict_wall_s"] = round(_run([*predict_command(trainer), "-i", inp, "-o", pred, "-d", entry["id"],
                                        "-c", entry["configuration"], "-f", "0", "-tr", trainer, "-device", args.device,
                                        "-npp", "1", "-nps", "1", *(["--disable_tta"] if args.disable_tta or args.smoke else [])],
                                       env, logs / f"{key}_predict.log", args.timeout), 1)
    ending = json.loads((Path(entry["raw_root"]) / entry["name"] / "dataset.json").read_text())["file_ending"]
    written = pred / f"{entry['predict_case']}{ending}"
    row["prediction"] = str(written) if written.is_file() else None
    return row


def _detectron_config(key: str, smoke: bool) -> str:
    from importlib import resources

    return str(resources.files("organmtl.detectron_heads") / DETECTRON[key][1 if smoke else 0])


def run_detectron(key: str, manifest: dict, args, out_dir: Path) -> dict:
    """``train_net.py --num-gpus 1`` for ``--d2-iters`` iterations (smoke: 4), then its evaluation."""
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    iters = 4 if args.smoke else args.d2_iters
    run_dir = out_dir / "detectron2" / key
    shutil.rmtree(run_dir, ignore_errors=True)
    stats_path = logs / f"{key}_train.json"
    cfg = _detectron_config(key, args.smoke)
    row = {"family": key, "framework": "detectron2", "config": DETECTRON[key][1 if args.smoke else 0],
           "iterations": iters}
    row["train_wall_s"] = round(_run(
        [sys.executable, __file__, "_detectron", stats_path, args.device, "--num-gpus", "1", "--config-file", cfg,
         "ORGANMTL.DATASET_ROOT", manifest["coco"]["root"], "ORGANMTL.DATASET_NAME", manifest["coco"]["name"],
         "MODEL.DEVICE", args.device, "SOLVER.MAX_ITER", iters, "SOLVER.CHECKPOINT_PERIOD", 100000,
         "TEST.EVAL_PERIOD", 0, "TEST.HMRNET.NUM_OVERLAYS", 0, "OUTPUT_DIR", run_dir]
        + (["DATALOADER.NUM_WORKERS", 0] if args.smoke else []),
        {}, logs / f"{key}_train.log", args.timeout), 1)
    metrics = [json.loads(line) for line in (run_dir / "metrics.json").read_text().splitlines() if line.strip()]
    timed = [m["time"] for m in metrics if "time" in m]
    losses = [v for m in metrics for k, v in m.items() if k == "total_loss" or k.startswith("loss_")]
    row.update(steps=iters, step_s=statistics.median(timed) if timed else None, iteration_wall_s=None,
               losses_finite=_finite(losses),
               loss_first_last=[next((m["total_loss"] for m in metrics if "total_loss" in m), None),
                                next((m["total_loss"] for m in reversed(metrics) if "total_loss" in m), None)])
    stats = json.loads(stats_path.read_text())
    row["memory"] = {"process": stats.get("exit_memory", {})}
    row["plan"] = None
    predictions = run_dir / "inference" / f"{manifest['coco']['name']}_val" / "coco_instances_results.json"
    row["prediction"] = str(predictions) if predictions.is_file() and (run_dir / "final_metrics.json").is_file() else None
    return row


def add_ratios(rows: dict) -> None:
    """Step time as a ratio to the baseline of the same framework, measured in the same run."""
    for row in rows.values():
        base = rows.get(BASELINE[row["framework"]])
        ok = base and base.get("step_s") and row.get("step_s") is not None
        row["step_ratio"] = round(row["step_s"] / base["step_s"], 3) if ok else None


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def table(rows: dict) -> str:
    """Markdown: one row per family."""
    head = ("| family | trainer / config | patch x batch | steps | step s | ratio to stock | peak GPU GiB (allocated / "
            "reserved) | plan predicts GiB (peak + 1.5) | losses finite | prediction written |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for key in FAMILIES:
        r = rows.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {key} | {r.get('trainer') or r.get('config', '')} | - | - | - | - | - | - | - | "
                         f"FAILED: {r['error'][:120].replace('|', '/')} |")
            continue
        mem = r["memory"].get("train") or r["memory"].get("process") or {}
        gpu = (f"{_fmt(mem.get('gpu_max_allocated_gib'), '.2f')} / {_fmt(mem.get('gpu_max_reserved_gib'), '.2f')}"
               if "gpu_max_allocated_gib" in mem else f"CPU RSS {_fmt(mem.get('cpu_peak_rss_gib'), '.2f')}")
        plan = r.get("plan")
        shape = (f"{r['patch_size']} x {r['batch_size']}" if r.get("patch_size") else "-")
        lines.append(f"| {key} | `{r.get('trainer') or r.get('config')}` | {shape} | {r['steps']} | {_fmt(r['step_s'])} | "
                     f"{_fmt(r.get('step_ratio'), '.2f')} | {gpu} | {_fmt(plan['predicted_gib'], '.2f') if plan else '-'} | "
                     f"{'yes' if r['losses_finite'] else 'NO'} | {'yes' if r.get('prediction') else 'NO'} |")
    return head + "\n" + "\n".join(lines)


def describe(device: str) -> str:
    return _load_sibling("run").describe_machine() + f"; device {device}"


def write_docs(markdown: str) -> None:
    _load_sibling("bench_full_size").write_docs(markdown, SECTION)


def markdown(result: dict, out_json: Path, notes=()) -> str:
    """The docs section: machine, budget, how the step is timed, the table."""
    it = result["iterations"]
    shown = out_json.resolve().relative_to(REPO) if out_json.resolve().is_relative_to(REPO) else out_json
    return (f"{SECTION}\n\n{result['machine']}; {result['date']}; {'smoke (CPU-sized) ' if result['smoke'] else ''}"
            f"nnU-Net: {it['nnunet_epochs']} epoch(s) x {it['nnunet_iters_per_epoch']} iteration(s) per trainer "
            f"(FocusNetV2: per phase), Detectron2: {it['detectron2']} iterations; total {result['total_wall_s']:.0f} s. "
            f"Step s: median `train_step` after 2 warm-up steps per epoch (FocusNetV2: per phase, weighted by the "
            f"default phase shares); Detectron2: its iteration timer. Peak GPU: `torch.cuda.max_memory_allocated` / "
            f"`_reserved` at the end of training; the plan's prediction includes its 1.5 GiB allowance. "
            f"JSON: `{shown}`.\n\n{table(result['rows'])}\n" + "".join(f"\n{n}\n" for n in notes))


def run(args) -> dict:
    work = Path(args.work).resolve()
    manifest = read_manifest(work)
    if args.jobs > 1 and args.device != "cpu":
        raise SystemExit("--jobs > 1: only for the CPU smoke run (on a GPU the families are timed one at a time)")
    if manifest["smoke"] != bool(args.smoke):
        raise SystemExit(f"{work / MANIFEST}: prepared {'with' if manifest['smoke'] else 'without'} --smoke; "
                         f"run with the same")
    from organmtl.env import ensure_ext_trainer_env

    ensure_ext_trainer_env()                               # nnUNet_extTrainer for the stock commands
    if args.smoke:
        os.environ.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "ORGANMTL_CPU_THREADS": "1",
                           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    out_dir = work / f"run_{args.device}"
    tag = f"{args.device}{'_smoke' if args.smoke else ''}"
    out_json = Path(args.out) if args.out else (out_dir / f"gpu_proof_{tag}.json" if args.smoke
                                                else RESULTS_DIR / f"gpu_proof_{tag}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    families = args.only or list(FAMILIES)
    result = {"machine": describe(args.device), "date": time.strftime("%Y-%m-%d %H:%M"), "smoke": bool(args.smoke),
              "device": args.device, "iterations": {"nnunet_epochs": 1 if args.smoke else args.epochs,
                                                    "nnunet_iters_per_epoch": 1 if args.smoke else args.iters,
                                                    "detectron2": 4 if args.smoke else args.d2_iters},
              "rows": {}}
    t_start = time.perf_counter()
    try:
        from tqdm import tqdm
    except ImportError:                                     # pragma: no cover
        def tqdm(x, **_):
            return x
    def one(key: str) -> tuple[str, dict]:
        t0 = time.perf_counter()
        try:
            row = (run_nnunet if key in NNUNET else run_detectron)(key, manifest, args, out_dir)
        except Exception as e:                             # one family failing never costs the others
            row = {"family": key, "framework": "nnunet" if key in NNUNET else "detectron2",
                   "trainer": NNUNET[key][0] if key in NNUNET else None, "error": f"{type(e).__name__}: {e}"}
        row["family_wall_s"] = round(time.perf_counter() - t0, 1)
        return key, row

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:     # the commands are subprocesses
        for key, row in tqdm(pool.map(one, families), total=len(families), desc="gpu_proof", unit="family"):
            result["rows"][key] = row
            add_ratios(result["rows"])
            result["total_wall_s"] = round(time.perf_counter() - t_start, 1)
            out_json.write_text(json.dumps(result, indent=1) + "\n")
            print(f"[gpu_proof] {key}: {json.dumps(row)}", flush=True)
    md = markdown(result, out_json, args.note)
    print(md)
    if args.docs:
        write_docs(md)
    failed = [k for k, r in result["rows"].items() if "error" in r or not r.get("losses_finite") or not r.get("prediction")]
    result["failed"] = failed
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)

    def common(q):
        q.add_argument("--work", type=Path, required=True, help="data, manifest and run folders")
        q.add_argument("--smoke", action="store_true", help="tiny plans, 1 iteration (CPU, CI-sized)")

    q = sub.add_parser("prepare", help="CPU: demo data, planning, preprocessing, COCO, manifest")
    common(q)
    q.add_argument("--cases", type=int, default=3, help="HaN phantom cases (default 3: 2 train, 1 validation)")
    q = sub.add_parser("table", help="print (--docs: write) the table of a result JSON, e.g. one from the GPU machine")
    q.add_argument("json", type=Path)
    q.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
    q.add_argument("--note", action="append", default=[], help="a paragraph below the table (repeatable)")
    for name in ("run", "all"):
        q = sub.add_parser(name, help="train + predict every family" if name == "run" else "prepare, then run")
        common(q)
        if name == "all":
            q.add_argument("--cases", type=int, default=3)
        q.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
        q.add_argument("--epochs", type=int, default=1, help="nnU-Net epochs (FocusNetV2: per phase; default 1)")
        q.add_argument("--iters", type=int, default=12, help="nnU-Net iterations per epoch (default 12)")
        q.add_argument("--d2-iters", type=int, default=50, help="Detectron2 iterations (default 50)")
        q.add_argument("--only", nargs="+", choices=FAMILIES, help="a subset of the families")
        q.add_argument("--disable-tta", action="store_true", help="nnUNetv2_predict --disable_tta")
        q.add_argument("--timeout", type=float, default=600, help="seconds per command (default 600)")
        q.add_argument("--jobs", type=int, default=1, help="families at once (CPU only; default 1)")
        q.add_argument("--out", type=Path, help="the JSON (default benchmarks/results/gpu/gpu_proof_DEVICE.json; "
                                                "smoke: WORK/run_DEVICE/)")
        q.add_argument("--docs", action="store_true", help="write the table into docs/benchmarks.md")
        q.add_argument("--note", action="append", default=[], help="a paragraph below the table (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "_stock":
        child_stock(json.loads(argv[1]))
        return {}
    if argv and argv[0] in ("_train", "_detectron"):
        child = child_train if argv[0] == "_train" else child_detectron
        child(Path(argv[1]), argv[2], argv[3:])
        return {}
    args = _parse(argv)
    if args.step == "table":
        result = json.loads(args.json.read_text())
        md = markdown(result, args.json, args.note)
        print(md)
        if args.docs:
            write_docs(md)
        return {"failed": result.get("failed", [])}
    if args.step in ("prepare", "all"):
        prepare(args.work, args.smoke, args.cases)
    if args.step == "prepare":
        return {}
    result = run(args)
    if result["failed"]:
        print(f"[gpu_proof] failed: {result['failed']}", file=sys.stderr)
    return result


if __name__ == "__main__":
    sys.exit(1 if main().get("failed") else 0)
