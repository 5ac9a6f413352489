"""The full (non-``_Tiny``) trainers at nnU-Net's own default plans, through the stock commands.

The shared demo datasets (tests/e2e/conftest.py) are planned by nnU-Net's default experiment planner
(``organmtl plan-tiny`` runs it and adds ``3d_tiny`` on top, inheriting ``3d_fullres``'s preprocessed
data), so their ``3d_fullres`` configuration is the stock plan: on these small phantoms a patch of
32 x 80 x 80 (HaN), 40 x 48 x 64 (abdomen) or 24 x 48 x 48 (multi-task). One trainer per network of its
own at the full size (FocusNetv2 at width 1.0, the landmark tail, late fusion, the triplanar CNN; the
multi-task U-Net and partial-label trainers build nnU-Net's U-Net of the plan), runs a few iterations of
``nnUNetv2_train ... 3d_fullres``, nnU-Net's final validation of one case and ``nnUNetv2_predict`` of
that case; the budget variables shorten the epochs only. The HMR-Net and Mask R-CNN R50 configs run
2 iterations through ``train_net`` (no ImageNet weights, CPU, one image per batch).
"""
from __future__ import annotations

import json
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from organmtl.procs import run_in_group, venv_bin
from tests.helpers import ONE_THREAD, PlannedDataset

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
CONFIG = "3d_fullres"
BUDGET = {"ORGANMTL_EPOCHS": "1", "ORGANMTL_ITERS_PER_EPOCH": "2", "ORGANMTL_VAL_ITERS": "1"}
#: key -> (dataset fixture, trainer, fold with one validation case, extra environment); FocusNetv2
#: runs each of its 5 phases for one epoch of one iteration
RUNS = {
    "focusnetv2": ("han_dataset", "nnUNetTrainerOMTLFocusNetV2", 1,
                   {"ORGANMTL_ITERS_PER_EPOCH": "1", "ORGANMTL_FOCUSNET_PHASE_EPOCHS": "snet=1,sol=1,ae=1,sos=1,joint=1"}),
    "landmark_joint": ("abdomen_dataset", "nnUNetTrainerOMTLLandmarkJoint", 0, {}),
    "late_fusion": ("abdomen_dataset", "nnUNetTrainerOMTLLandmarkLateFusion", 0, {}),
    "triplanar": ("multitask_dataset", "nnUNetTrainerOMTLTriplanar", 0, {}),
}
REPO = Path(__file__).resolve().parents[2]
DETECTRON_CONFIGS = {"hmrnet_R_50_FPN": REPO / "detectron_heads" / "hmrnet" / "configs" / "hmrnet_R_50_FPN.yaml",
                     "mask_rcnn_R_50_FPN_baseline": REPO / "detectron_heads" / "configs" / "mask_rcnn_R_50_FPN_baseline.yaml"}
TINY_SOLVER = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "1",
               "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0", "TEST.DETECTIONS_PER_IMAGE", "10",
               "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.HMRNET.SCORE_THRESH", "0.0", "TEST.HMRNET.NUM_OVERLAYS", "1"]


def _val_case(ds: PlannedDataset, fold: int) -> str:
    (case,) = json.loads((ds.preprocessed / "splits_final.json").read_text())[fold]["val"]
    return case


def _train_validate_predict(ds: PlannedDataset, trainer: str, fold: int, extra: dict, work: Path) -> dict:
    """``nnUNetv2_train`` (with its final validation) then ``nnUNetv2_predict`` of the validation case."""
    work.mkdir(parents=True)
    # two trainings side by side: one torch thread each (nnUNetv2_train -device cpu would take both cores)
    env = {**ds.env, **BUDGET, **extra, "ORGANMTL_CPU_THREADS": "1"}
    log = work / "train.log"
    run_in_group([venv_bin("nnUNetv2_train"), str(ds.dataset_id), CONFIG, str(fold), "-tr", trainer, "-device", "cpu"],
                 env=env, log_file=log, timeout=1800)
    case = _val_case(ds, fold)
    inp, out = work / "in", work / "out"
    inp.mkdir()
    for image in (ds.raw / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9].nii.gz"):
        (inp / image.name).write_bytes(image.read_bytes())
    run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", str(ds.dataset_id), "-c", CONFIG,
                  "-f", str(fold), "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                 env=env, log_file=work / "predict.log", timeout=1800)
    return {"ds": ds, "case": case, "log": log.read_text(), "prediction": out / f"{case}.nii.gz",
            "fold": ds.fold(trainer, fold, CONFIG)}


def _two_slice_coco(spine_coco: Path, out: Path) -> Path:
    """Three demo spine slices to train on, the first of them to evaluate on (a COCO folder)."""
    (out / "annotations").mkdir(parents=True)
    (out / "images").symlink_to(spine_coco / "images")
    data = json.loads((spine_coco / "annotations" / "instances_train.json").read_text())
    for split, n in (("train", 3), ("val", 1)):
        ids = {im["id"] for im in data["images"][:n]}
        subset = dict(data, images=data["images"][:n], annotations=[a for a in data["annotations"] if a["image_id"] in ids])
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(subset))
    return out


def _train_net(config: Path, coco: Path, name: str, out: Path) -> Path:
    run_in_group([sys.executable, "-m", "organmtl.detectron_heads.train_net", "--config-file", str(config),
                  "ORGANMTL.DATASET_ROOT", str(coco), "ORGANMTL.DATASET_NAME", name, "OUTPUT_DIR", str(out), *TINY_SOLVER],
                 env=ONE_THREAD, log_file=out.parent / f"{name}.log", timeout=1800)
    return out


@pytest.fixture(scope="module")
def runs(request, spine_coco, tmp_path_factory):
    """Every training of this module, two processes at a time on the two cores (FocusNetv2, the
    longest, first); each result is a future so that one failing run fails only its own test."""
    work = tmp_path_factory.mktemp("full_size")
    datasets = {name: request.getfixturevalue(name) for name in {r[0] for r in RUNS.values()}}
    coco = _two_slice_coco(spine_coco, work / "coco")
    with ThreadPoolExecutor(2) as pool:
        futures = {key: pool.submit(_train_validate_predict, datasets[d].with_results(work / key / "res"), trainer,
                                    fold, extra, work / key / "run")
                   for key, (d, trainer, fold, extra) in RUNS.items()}
        futures.update({key: pool.submit(_train_net, config, coco, f"full_{key}", work / key)
                        for key, config in DETECTRON_CONFIGS.items()})
        for f in futures.values():
            f.exception()                      # wait for all (errors are raised by each test)
    return futures


def _losses(log: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"{name} (\S+)\n", log)]


@pytest.mark.parametrize("key", list(RUNS))
def test_full_trainer_at_the_default_plan(runs, key):
    r = runs[key].result()
    ds, trainer = r["ds"], RUNS[key][1]
    log, folder = r["log"], r["fold"]
    assert f"Using trainer '{trainer}'" in log

    # the stock 3d_fullres plan, not a tiny one: the model's plans.json and the patch the trainer used
    stock = json.loads((ds.preprocessed / "nnUNetPlans.json").read_text())["configurations"][CONFIG]
    assert "inherits_from" not in stock and stock["architecture"]["arch_kwargs"]["features_per_stage"][0] == 32
    used = json.loads((folder.parent / "plans.json").read_text())["configurations"][CONFIG]
    assert used["patch_size"] == stock["patch_size"] and used["batch_size"] == stock["batch_size"]
    # on the CPU without ORGANMTL_GPU_MEMORY_GB: no GPU memory plan, no probes (tests/test_memory_check.py)
    assert "organmtl_gpu_memory" not in used and "GPU memory plan: none (training on cpu" in log
    if key == "focusnetv2":
        assert "FocusNet phases (epochs): [('snet', 1), ('sol', 1), ('ae', 1), ('sos', 1), ('joint', 1)]" in log
        assert [m for m in re.findall(r"FocusNet phase: (\w+)\n", log)] == ["snet", "sol", "ae", "sos", "joint"]
    epochs = 5 if key == "focusnetv2" else int(BUDGET["ORGANMTL_EPOCHS"])
    train_losses = _losses(log, "train_loss")
    assert len(train_losses) == epochs and all(math.isfinite(v) for v in train_losses), train_losses

    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == epochs
    assert ckpt["init_args"]["configuration"] == CONFIG

    # nnU-Net's final validation scored the one validation case with finite Dice for its organs
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    (scored,) = summary["metric_per_case"]
    assert scored["reference_file"].endswith(f"{r['case']}.nii.gz")
    present = {k: m for k, m in scored["metrics"].items() if m["TP"] + m["FN"] > 0}
    assert present and all(math.isfinite(m["Dice"]) and 0.0 <= m["Dice"] <= 1.0 for m in present.values())
    absent_both = [k for k, m in scored["metrics"].items() if m["TP"] + m["FN"] + m["FP"] == 0]
    assert all(math.isnan(scored["metrics"][k]["Dice"]) for k in absent_both)    # nnU-Net: NaN, not a score
    assert summary["foreground_mean"]["Dice"] == pytest.approx(
        np.mean([m["Dice"] for m in scored["metrics"].values()]), nan_ok=True)

    # nnUNetv2_predict of that case: the image's grid, labels of the dataset only
    pred = sitk.ReadImage(str(r["prediction"]))
    image = sitk.ReadImage(str(ds.raw / "imagesTr" / f"{r['case']}_0000.nii.gz"))
    assert pred.GetSize() == image.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(pred.GetOrigin(), image.GetOrigin(), atol=1e-4)
    labels = json.loads((ds.raw / "dataset.json").read_text())["labels"].values()
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= set(labels)


@pytest.mark.parametrize("key", list(DETECTRON_CONFIGS))
def test_r50_config_trains_two_iterations(runs, key):
    out = runs[key].result()
    logged = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    trained = {m["iteration"]: m["total_loss"] for m in logged if "total_loss" in m}
    assert 1 in trained and all(math.isfinite(v) for v in trained.values()), trained
    weights = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    res5 = [v.shape[0] for k, v in weights.items() if re.search(r"res5\.2\.conv3\.weight$", k)]
    assert res5 and set(res5) == {2048}              # ResNet-50: bottleneck blocks, 3 in res5 (R18 has 2, no conv3)
    results = json.loads((out / "final_metrics.json").read_text())
    assert {"bbox", "segm", "hmrnet"} <= set(results)        # every detection scored (score threshold 0)
