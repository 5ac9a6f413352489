#!/usr/bin/env python
"""HMR-Net vs plain Mask R-CNN (issue #4): training iteration time and peak memory on the same
data and image size, and, after an equal CPU/GPU time budget on demo spine slices, Dice and
Hausdorff distance of the shape head vs the mask head on held-out slices with added occlusions
and low contrast (the paper's Tables 5-6 claim). Every figure is also given as a ratio to the
stock Mask R-CNN baseline measured in the same run.

    .venv/bin/python benchmarks/bench_hmrnet.py --quick            # tiny R18 configs, 128 px, short budget
    .venv/bin/python benchmarks/bench_hmrnet.py --device cuda      # R50 configs, 512 px, longer budget
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# config paths relative to detectron_heads/: the generic baselines in configs/, HMR-Net's in hmrnet/configs/
TINY = {"Mask R-CNN (baseline)": "configs/tiny/mask_rcnn_R_18_FPN_baseline_tiny.yaml",
        "HMR-Net": "hmrnet/configs/tiny/hmrnet_R_18_FPN_tiny.yaml",
        "HMR-Net, one N-Net": "hmrnet/configs/tiny/hmrnet_R_18_FPN_no_cross_stitch_tiny.yaml",
        "HMR-Net, mask head": "hmrnet/configs/tiny/hmrnet_R_18_FPN_mask_head_tiny.yaml"}
FULL = {"Mask R-CNN (baseline)": "configs/mask_rcnn_R_50_FPN_baseline.yaml",
        "HMR-Net": "hmrnet/configs/hmrnet_R_50_FPN.yaml",
        "HMR-Net, one N-Net": "hmrnet/configs/hmrnet_R_50_FPN_no_cross_stitch.yaml",
        "HMR-Net, mask head": "hmrnet/configs/hmrnet_R_50_FPN_mask_head.yaml"}


def _cfg(config: str, coco: Path, name: str, device: str, size: int, batch: int):
    from detectron2.config import get_cfg

    from organmtl.detectron_heads import add_organmtl_config, register_from_cfg
    from organmtl.detectron_heads.hmrnet import add_hmrnet_config

    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    cfg.merge_from_file(str(REPO / "detectron_heads" / config))
    cfg.ORGANMTL.DATASET_ROOT, cfg.ORGANMTL.DATASET_NAME = str(coco), name
    cfg.MODEL.DEVICE = device
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size * 2
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = size, size * 2
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.INPUT.HMRNET_AUG.NAMES = []            # identical data pipeline for every model
    register_from_cfg(cfg)
    return cfg


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time_iterations(args) -> dict:
    """In a fresh process: mean training-iteration time (CPU seconds on CPU, wall seconds on CUDA) and
    peak memory (CUDA: max allocated; CPU: the process's peak RSS, imports included), plus the split."""
    config, coco, device, size, batch, iters = args
    import torch
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    from organmtl.detectron_heads.hmrnet import HMRNetDatasetMapper

    torch.manual_seed(0)
    cfg = _cfg(config, coco, "bench_time", device, size, batch)
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    data = iter(build_detection_train_loader(cfg, mapper=HMRNetDatasetMapper(cfg, True)))
    parts = {"backbone": 0.0, "rpn": 0.0, "roi_heads": 0.0, "backward+step": 0.0}
    times = []
    # CPU: process CPU time (robust on shared cores, OMP_NUM_THREADS=1); CUDA: synchronised wall time
    clock = time.process_time if device == "cpu" else time.perf_counter
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with EventStorage(0) as storage:
        for i in range(iters + 2):
            batch_in = next(data)
            _sync(device)
            t0 = clock()
            images = model.preprocess_image(batch_in)
            gt = [x["instances"].to(model.device) for x in batch_in]
            feats = model.backbone(images.tensor)
            _sync(device)
            t1 = clock()
            props, l1 = model.proposal_generator(images, feats, gt)
            _sync(device)
            t2 = clock()
            _, l2 = model.roi_heads(images, feats, props, gt)
            _sync(device)
            t3 = clock()
            opt.zero_grad()
            sum({**l1, **l2}.values()).backward()
            opt.step()
            _sync(device)
            t4 = clock()
            storage.step()
            if i >= 2:                                   # 2 warm-up iterations
                times.append(t4 - t0)
                for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    parts[k] += dt / iters
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"iter_s": float(np.mean(times)), "peak_mb": float(peak),
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "parts": parts}


def degrade_images(coco: Path, out: Path, seed: int = 0) -> Path:
    """Copy of the COCO folder whose val slices get a low-contrast window (x0.35 around the mean),
    Gaussian noise (sd 6) and one occluding rectangle (mean grey, 20-30 % of the side) over a
    structure; train slices are unchanged."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    for split in ("train", "val"):
        (out / "annotations" / f"instances_{split}.json").write_text(
            (coco / "annotations" / f"instances_{split}.json").read_text())
    val = json.loads((coco / "annotations" / "instances_val.json").read_text())
    val_files = {im["file_name"]: im["id"] for im in val["images"]}
    for png in (coco / "images").glob("*.png"):
        img = np.asarray(Image.open(png)).astype(np.float32)
        if png.name in val_files:
            mean = img.mean()
            img = mean + 0.35 * (img - mean) + rng.normal(0, 6, img.shape[:2])[..., None]
            anns = [a for a in val["annotations"] if a["image_id"] == val_files[png.name]]
            if anns:
                x, y, w, h = anns[rng.integers(len(anns))]["bbox"]
                side = int(rng.uniform(0.2, 0.3) * min(img.shape[:2]))
                cx, cy = int(x + w * rng.uniform(0.3, 0.7)), int(y + h * rng.uniform(0.3, 0.7))
                img[max(cy - side // 2, 0):cy + side // 2, max(cx - side // 2, 0):cx + side // 2] = mean
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out / "images" / png.name)
    return out


def _train_budget_and_evaluate(args) -> dict:
    """In a fresh process: train for ``budget`` seconds of process CPU time (or wall time on CUDA),
    then evaluate Dice/HD (HMRNetEvaluator) on the degraded val slices. Same data pipeline for every
    model (resize only), gradient clipping on for all."""
    config, coco, device, size, batch, budget, out = args
    import torch
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.evaluation import inference_on_dataset
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler, build_optimizer
    from detectron2.utils.events import EventStorage

    from organmtl.detectron_heads.hmrnet import HMRNetDatasetMapper, HMRNetEvaluator

    torch.manual_seed(0)
    cfg = _cfg(config, coco, "bench_occl", device, size, batch)
    cfg.SOLVER.STEPS = (10 ** 6,)
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    model = build_model(cfg).train()
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    data = iter(build_detection_train_loader(cfg, mapper=HMRNetDatasetMapper(cfg, True)))
    clock = time.process_time if device == "cpu" else time.perf_counter
    start, iters = clock(), 0
    with EventStorage(0) as storage:
        while clock() - start < budget:
            losses = model(next(data))
            total = sum(losses.values())
            if not torch.isfinite(total):
                break
            opt.zero_grad()
            total.backward()
            opt.step()
            sched.step()
            storage.step()
            iters += 1
    model.eval()
    val = cfg.DATASETS.TEST[0]
    ev = HMRNetEvaluator(val, output_dir=str(out), score_thresh=0.5, num_overlays=5, distributed=False)
    with torch.no_grad():
        res = inference_on_dataset(model, build_detection_test_loader(cfg, val, mapper=HMRNetDatasetMapper(cfg, False)), ev)
    hm = res["hmrnet"]
    return {"iters": iters, "dice": hm["mDice"], "hd": hm["mHD"], "segm_ap11": hm["segm_AP11"]}


def _ratio(v, base):
    return f"{v / base:.2f}x" if base and np.isfinite(v) and np.isfinite(base) else "n/a"


def _machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import describe_machine

    return describe_machine()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="tiny R18 configs at 128 px, 5 timed iterations, 120 s budget")
    p.add_argument("--iters", type=int, default=None, help="timed training iterations per model")
    p.add_argument("--budget", type=float, default=None, help="training seconds per model for the Dice/HD part")
    p.add_argument("--cases", type=int, default=None, help="demo spine cases")
    p.add_argument("--parts", default="timing,quality", help="comma list of the parts to run: timing, quality")
    args = p.parse_args(argv)
    quick = args.quick or args.device == "cpu"
    configs = TINY if quick else FULL
    size = 128 if quick else 512
    batch = 2 if quick else 3
    iters = args.iters or (5 if args.quick else 20)
    budget = args.budget or (120.0 if args.quick else 900.0)
    cases = args.cases or (12 if args.quick else 24)
    os.environ.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else os.environ.get("OMP_NUM_THREADS", "4"))

    from organmtl.cli import main as cli
    from organmtl.demo_data import write_demo_data

    tmp = Path(tempfile.mkdtemp(prefix="bench_hmrnet_"))
    write_demo_data(tmp / "demo", seed=0, families=["spine"], n_cases=cases)
    if cli(["convert", "volumes", str(tmp / "demo" / "spine" / "spine_sag_mr"), "--to", "coco",
            "--dataset-id", "44", "--out", str(tmp / "coco")]) != 0:
        raise SystemExit("bench_hmrnet: conversion of the demo spine slices failed")
    degraded = degrade_images(tmp / "coco", tmp / "coco_degraded")
    ctx = mp.get_context("spawn")

    parts = set(args.parts.split(","))
    lines, timing, quality = [], {}, {}
    for label, cfg in (configs.items() if "timing" in parts else ()):
        with ctx.Pool(1) as pool:
            timing[label] = pool.apply(_time_iterations, ((cfg, tmp / "coco", args.device, size, batch, iters),))
    if timing:
        lines += _timing_table(timing, args.device, size, batch, iters)
        print("\n".join(lines), flush=True)
    for label in (("Mask R-CNN (baseline)", "HMR-Net", "HMR-Net, mask head") if "quality" in parts else ()):
        with ctx.Pool(1) as pool:
            quality[label] = pool.apply(_train_budget_and_evaluate, ((configs[label], degraded, args.device, size, batch,
                                                                      budget, tmp / "eval" / label.replace(" ", "_")),))
    if quality:
        lines += _quality_table(quality, budget, args.device)
    machine = _machine()
    lines += ["", f"Machine: {machine}"]
    text = "\n".join(lines)
    print(text)
    return {"timing": timing, "quality": quality, "machine": machine, "markdown": text,
            "settings": {"device": args.device, "size": size, "batch": batch, "iters": iters, "budget": budget,
                         "cases": cases}}


def _timing_table(timing, device, size, batch, iters) -> list[str]:
    base = timing["Mask R-CNN (baseline)"]
    lines = [f"### HMR-Net vs Mask R-CNN: training iteration ({device}, {size} px, batch {batch}, "
             f"{iters} timed iterations after 2 warm-up)", "",
             "| model | params (M) | " + ("CPU s" if device == "cpu" else "s") + " / iteration | ratio | "
             + ("peak RSS" if device == "cpu" else "peak CUDA memory") + " (MiB) | ratio |", "|---|---|---|---|---|---|"]
    for label, t in timing.items():
        lines.append(f"| {label} | {t['params_m']:.1f} | {t['iter_s']:.3f} | {_ratio(t['iter_s'], base['iter_s'])} | "
                     f"{t['peak_mb']:.0f} | {_ratio(t['peak_mb'], base['peak_mb'])} |")
    lines += ["", "Where the time goes (s / iteration):", "",
              "| model | backbone fwd | RPN | ROI heads | backward + step |", "|---|---|---|---|---|"]
    for label, t in timing.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f} ({_ratio(v, base['parts'][k])})"
                                                  for k, v in t["parts"].items()) + " |")

    return lines


def _quality_table(quality, budget, device) -> list[str]:
    qb = quality["Mask R-CNN (baseline)"]
    unit = "CPU s" if device == "cpu" else "s"
    lines = ["", f"### Shape head vs mask head after {budget:.0f} {unit} of training each, evaluated on "
              "held-out demo spine slices with occlusion + low contrast", "",
              "| model | iterations | Dice | ratio | HD (mm) | ratio | segm AP11 | ratio |", "|---|---|---|---|---|---|---|---|"]
    for label, q in quality.items():
        lines.append(f"| {label} | {q['iters']} | {q['dice']:.3f} | {_ratio(q['dice'], qb['dice'])} | {q['hd']:.2f} | "
                     f"{_ratio(q['hd'], qb['hd'])} | {q['segm_ap11']:.1f} | {_ratio(q['segm_ap11'], qb['segm_ap11'])} |")
    return lines


if __name__ == "__main__":
    main()
