"""Landmark U-Net trainers through the stock commands (``nnUNetv2_train -tr``, ``nnUNetv2_predict``)
on converted demo data with tiny plans on a CPU (1 epoch of 2 iterations):

- abdominal fat/water MR with hip-joint heatmaps, one channel per landmark (3d_tiny and 2d_tiny):
  joint (3D) with landmark coordinates predicted next to the segmentation (the Lite tail's width and
  step: tests/test_landmark_unet_networks.py, tests/test_landmark_amp.py), alternate (2D; plus the gradient check that each iteration touches one task's head only),
  uncertainty weighting (3D, log-variances restored by ``--c``), multi-task block (3D);
- VISCERAL-like CT with the renal-pelvis pair as one inverse Manhattan distance map (2d_tiny):
  early and late fusion.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from organmtl.procs import run_in_group, venv_bin
from tests.helpers import PlannedDataset, assert_crossval_ready, plan_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
BUDGET = {"ORGANMTL_EPOCHS": "1", "ORGANMTL_ITERS_PER_EPOCH": "2", "ORGANMTL_VAL_ITERS": "1"}
ABDOMEN, VISCERAL = 611, 612


def _train(ds: PlannedDataset, config, trainer, log, extra=(), budget=None):
    run_in_group([venv_bin("nnUNetv2_train"), str(ds.dataset_id), config, "0", "-tr", trainer, "-device", "cpu",
                  *extra], env={**ds.env, **BUDGET, **(budget or {})}, log_file=log, timeout=1800)
    return log.read_text()


@pytest.fixture(scope="module")
def work(abdomen_dataset, demo_root, tmp_path_factory):
    """The session's abdomen dataset, the VISCERAL-like CT planned here (one validation case each),
    and every trainer trained once, two nnU-Net processes at a time on the two cores (the VISCERAL
    conversion runs beside the first abdomen training; its trainings are queued after it)."""
    assert abdomen_dataset.dataset_id == ABDOMEN
    runs = [("joint", ABDOMEN, "3d_tiny", "nnUNetTrainerOMTLLandmarkJoint_Tiny"),
            ("alternate", ABDOMEN, "2d_tiny", "nnUNetTrainerOMTLLandmarkAlternate_Tiny"),
            ("uncertainty", ABDOMEN, "3d_tiny", "nnUNetTrainerOMTLLandmarkUncertainty_Tiny"),
            ("multitask_block", ABDOMEN, "3d_tiny", "nnUNetTrainerOMTLMultiTaskBlock_Tiny"),
            ("early", VISCERAL, "2d_tiny", "nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny"),
            ("late", VISCERAL, "2d_tiny", "nnUNetTrainerOMTLLandmarkLateFusion_Tiny")]
    logs_dir = tmp_path_factory.mktemp("landmark_logs")

    def train(key, dataset_id, config, trainer):
        ds = abdomen_dataset if dataset_id == ABDOMEN else visceral.result()    # queued after the conversion
        return _train(ds, config, trainer, logs_dir / f"train_{key}.log", extra=("--npz",))

    with ThreadPoolExecutor(2) as pool:
        visceral = pool.submit(plan_dataset, tmp_path_factory.mktemp("visceral"), "visceral", demo_root / "visceral_ct",
                               VISCERAL, "LmVisceral", "--landmark-channels", "distance", configurations=("2d_tiny",),
                               one_validation_case=True)
        logs = {key: pool.submit(train, key, d, c, tr) for key, d, c, tr in runs}
        logs = {k: f.result() for k, f in logs.items()}
    datasets = {ABDOMEN: abdomen_dataset, VISCERAL: visceral.result()}
    return {"datasets": datasets, "logs": logs, "runs": {key: (d, c, tr) for key, d, c, tr in runs}}


def _predict(work, key, tmp_path, channels=2, module=None) -> tuple[Path, Path, str]:
    dataset_id, config, trainer = work["runs"][key]
    ds = work["datasets"][dataset_id]
    case = json.loads((ds.preprocessed / "splits_final.json").read_text())[0]["val"][0]
    inp = tmp_path / "in"
    inp.mkdir()
    for c in range(channels):
        (inp / f"{case}_{c:04d}.nii.gz").write_bytes((ds.raw / "imagesTr" / f"{case}_{c:04d}.nii.gz").read_bytes())
    out = tmp_path / "out"
    command = [venv_bin("python"), "-m", module] if module else [venv_bin("nnUNetv2_predict")]
    run_in_group([*command, "-i", str(inp), "-o", str(out), "-d", str(dataset_id), "-c", config, "-f", "0",
                  "-tr", trainer, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                 env={**ds.env, **BUDGET}, log_file=tmp_path / "predict.log", timeout=1800)
    pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    ref = sitk.ReadImage(str(ds.raw / "imagesTr" / f"{case}_0000.nii.gz"))
    assert pred.GetSize() == ref.GetSize()
    np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    labels = set(json.loads((ds.raw / "dataset.json").read_text())["labels"].values())
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= labels
    return out, ds.raw, case


def _check_training(work, key):
    dataset_id, config, trainer = work["runs"][key]
    log = work["logs"][key]
    assert f"Using trainer '{trainer}'" in log or trainer in log
    fold = work["datasets"][dataset_id].fold(trainer, configuration=config)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == 1
    assert (fold / "progress.png").is_file()
    assert_crossval_ready(fold)          # what nnUNetv2_find_best_configuration / ensembling read (--npz)
    return fold, ckpt, log


def test_joint_3d_trains_logs_landmarks_and_predicts_coordinates(work, tmp_path):
    fold, ckpt, log = _check_training(work, "joint")
    assert re.search(r"landmark error (\d+\.\d+|nan) mm over \d+ landmarks in validation patches, heatmap RMSE \d", log)
    assert len(ckpt["logging"]["landmark_error_mm"]) == 1 and np.isfinite(ckpt["logging"]["heatmap_rmse"][0])
    assert (fold / "progress_landmarks.png").is_file()
    assert any(k.startswith("landmark_tail.") for k in ckpt["network_weights"])
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert plans["configurations"]["3d_tiny"]["organmtl_landmark_channels"]["n_landmark"] == 2
    # image channels only: the network never reads the heatmap channels
    out, raw, case = _predict(work, "joint", tmp_path, module="organmtl.nnunet_trainers.landmarks.predict")
    record = json.loads((out / f"{case}.json").read_text())
    assert [lm["name"] for lm in record["landmarks"]] == ["hip_left", "hip_right"] and not record["merged_map"]
    ref = sitk.ReadImage(str(raw / "imagesTr" / f"{case}_0000.nii.gz"))
    for lm in record["landmarks"]:
        assert all(0 <= v < n for v, n in zip(lm["voxel_xyz"], ref.GetSize()))
        np.testing.assert_allclose(lm["lps_mm"], ref.TransformContinuousIndexToPhysicalPoint(lm["voxel_xyz"]), atol=1e-3)
    from organmtl.evaluation.landmarks import evaluate_landmark_folders
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / f"{case}.json").write_bytes((raw / "landmarks" / f"{case}.json").read_bytes())
    rows, summary = evaluate_landmark_folders(out, gt)
    assert summary["n_landmarks"] == 2 and summary["n_missing"] == 0 and all(np.isfinite(r["error_mm"]) for r in rows)


def test_alternate_2d_and_each_iteration_touches_one_head(work, tmp_path, monkeypatch):
    _, _, log = _check_training(work, "alternate")
    assert "alternate: 1 segmentation iterations" in log and "1 landmark iterations" in log
    _predict(work, "alternate", tmp_path)
    # in-process: one iteration per task, gradients on the intended head only
    from organmtl.nnunet_trainers import nnUNetTrainerOMTLLandmarkAlternate_Tiny
    ds = work["datasets"][ABDOMEN]
    for key, value in ds.env.items():                           # nnU-Net 2.8 reads its paths when used
        monkeypatch.setenv(key, value)
    pre = ds.preprocessed
    plans = {**json.loads((pre / "nnUNetPlans.json").read_text()), "continue_training": False}   # as run_training
    trainer = nnUNetTrainerOMTLLandmarkAlternate_Tiny(plans, "3d_tiny", 0, json.loads((pre / "dataset.json").read_text()),
                                                      torch.device("cpu"))
    trainer.initialize()
    dl_train, _ = trainer.get_dataloaders()
    net = trainer._module()
    seg_head = list(net.unet.decoder.seg_layers[-1].parameters())
    # a conv bias right before instance norm has a zero gradient in theory (1e-7 in floats): leave it out
    tail = [p for n, p in net.landmark_tail.named_parameters() if not n.endswith("conv.bias")]
    trainer.global_iteration = 0
    net.train()
    for expected in ("segmentation", "landmarks", "segmentation"):
        assert trainer.current_task() == expected
        out = trainer.train_step(next(dl_train))
        assert out["task"] == expected
        touched_seg = all(p.grad is not None and p.grad.abs().sum() > 0 for p in seg_head)
        touched_tail = all(p.grad is not None and p.grad.abs().sum() > 0 for p in tail)
        idle = tail if expected == "segmentation" else seg_head
        assert (touched_seg, touched_tail) == ((True, False) if expected == "segmentation" else (False, True))
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in idle)


def test_uncertainty_log_variances_logged_saved_and_restored_by_continue(work, tmp_path):
    fold, ckpt, log = _check_training(work, "uncertainty")
    saved = ckpt["network_weights"]["task_weighting.log_vars"].numpy()
    assert saved.shape == (2,) and np.all(saved != 0)                 # they were trained
    logged = ckpt["logging"]
    np.testing.assert_allclose([logged["log_var_segmentation"][0], logged["log_var_landmarks"][0]], saved, rtol=1e-6)
    dataset_id, config, trainer = work["runs"]["uncertainty"]
    log2 = _train(work["datasets"][dataset_id], config, trainer, tmp_path / "continue.log", extra=("--c",),
                  budget={"ORGANMTL_EPOCHS": "2"})
    start = re.search(r"log variances at start: \{'segmentation': ([-\d.e]+), 'landmarks': ([-\d.e]+)\}", log2)
    np.testing.assert_allclose([float(start.group(1)), float(start.group(2))], saved, rtol=1e-6)
    ckpt2 = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt2["current_epoch"] == 2 and len(ckpt2["logging"]["log_var_segmentation"]) == 2
    assert ckpt2["logging"]["log_var_segmentation"][0] == logged["log_var_segmentation"][0]


def test_multitask_block_3d_sigmoid_per_organ(work, tmp_path):
    fold, ckpt, _ = _check_training(work, "multitask_block")
    dataset = json.loads((fold.parent / "dataset.json").read_text())
    assert dataset["regions_class_order"] == [1, 2, 3, 4, 5, 6]
    weights = ckpt["network_weights"]
    last = max(int(m.group(1)) for k in weights if (m := re.match(r"unet\.decoder\.seg_layers\.(\d+)\.", k)))
    organ_convs = [k for k in weights if k.startswith(f"unet.decoder.seg_layers.{last}.organs.")    # full resolution
                   and (k.endswith("conv.weight") or re.search(r"organs\.\d+\.1\.weight$", k))]
    assert len(organ_convs) == 6 * (2 + 1)                       # per organ: double conv + 1x1
    # the heatmap channels are early-fusion input here: predict with all four channels
    _predict(work, "multitask_block", tmp_path, channels=4)


@pytest.mark.parametrize("key", ["early", "late"])
def test_fusion_2d_on_visceral_distance_maps(work, tmp_path, key):
    fold, ckpt, _ = _check_training(work, key)
    first = ckpt["network_weights"]["unet.encoder.stages.0.0.convs.0.conv.weight" if key == "late"
                                    else "encoder.stages.0.0.convs.0.conv.weight"]
    assert first.shape[1] == (1 if key == "late" else 2)          # late fusion: the encoder sees CT only
    _predict(work, key, tmp_path, channels=2)                      # CT + distance map channel
