"""Stock nnU-Net commands, in subprocesses, find and run organmtl trainers on converted demo data."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from organmtl.procs import run_in_group, venv_bin
from tests.conftest import run_cli

pytestmark = pytest.mark.e2e
TRAINER = "nnUNetTrainerOMTLBaseline_Tiny"


def test_train_and_predict_with_stock_commands(demo_root, nnunet_env, tmp_path):
    r = run_cli("convert", "pddca", demo_root / "han_pddca", "--dataset-id", "401", "--name", "E2E")
    assert r.returncode == 0, r.stderr
    r = run_cli("plan-tiny", "-d", "401", "-np", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    env = {**nnunet_env, "ORGANMTL_EPOCHS": "2", "ORGANMTL_ITERS_PER_EPOCH": "3", "ORGANMTL_VAL_ITERS": "1"}
    log = tmp_path / "train.log"
    run_in_group([venv_bin("nnUNetv2_train"), "401", "3d_tiny", "0", "-tr", TRAINER, "-device", "cpu"],
                 env=env, log_file=log, timeout=900)
    text = log.read_text()
    assert f"Using trainer '{TRAINER}'" in text and "Epoch 1" in text and "Epoch 2" not in text
    assert "mirroring disabled" in text                       # Parotid_L/_R etc. come in pairs
    fold = tmp_path / "res" / "Dataset401_E2E" / f"{TRAINER}__nnUNetPlans__3d_tiny" / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 2
    assert (fold / "progress.png").is_file()

    raw = tmp_path / "raw" / "Dataset401_E2E"
    inp = tmp_path / "predict_in"
    inp.mkdir()
    shutil.copy(raw / "imagesTr" / "0522c0000_0000.nii.gz", inp)
    out = tmp_path / "predict_out"
    run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", "401", "-c", "3d_tiny",
                  "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                 env=env, log_file=tmp_path / "predict.log", timeout=900)
    pred = sitk.ReadImage(str(out / "0522c0000.nii.gz"))
    ref = sitk.ReadImage(str(raw / "imagesTr" / "0522c0000_0000.nii.gz"))
    assert pred.GetSize() == ref.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    labels = set(np.unique(sitk.GetArrayFromImage(pred)).tolist())
    assert labels <= set(json.loads((raw / "dataset.json").read_text())["labels"].values())

    r = run_cli("evaluate", out, raw / "labelsTr", "--dataset-json", raw / "dataset.json")
    assert r.returncode == 0, r.stderr
    assert "| Chiasm |" in r.stdout and (out / "summary.json").is_file()
