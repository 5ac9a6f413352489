"""Stock nnU-Net commands, in subprocesses, find and run organmtl trainers on converted demo data."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from organmtl.procs import run_in_group, venv_bin
from tests.e2e.conftest import CROSSVAL_BASELINE
from tests.helpers import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
TRAINER = CROSSVAL_BASELINE


def test_train_and_predict_with_stock_commands(han_crossval, tmp_path):
    """Fold 0 of the session's baseline (tests/e2e/conftest.han_crossval: ``nnUNetv2_train`` 2 epochs)."""
    ds, env, text = han_crossval.ds, han_crossval.env(TRAINER), han_crossval.log(TRAINER, 0)
    assert f"Using trainer '{TRAINER}'" in text and "Epoch 1" in text and "Epoch 2" not in text
    assert "mirroring disabled" in text                       # Parotid_L/_R etc. come in pairs
    fold = ds.fold(TRAINER)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == TRAINER and ckpt["current_epoch"] == 2
    assert (fold / "progress.png").is_file()

    inp = tmp_path / "predict_in"
    inp.mkdir()
    shutil.copy(ds.raw / "imagesTr" / "0522c0000_0000.nii.gz", inp)
    out = tmp_path / "predict_out"
    run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", str(ds.dataset_id),
                  "-c", ds.configuration, "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta",
                  "-npp", "1", "-nps", "1"], env=env, log_file=tmp_path / "predict.log", timeout=900)
    pred = sitk.ReadImage(str(out / "0522c0000.nii.gz"))
    ref = sitk.ReadImage(str(ds.raw / "imagesTr" / "0522c0000_0000.nii.gz"))
    assert pred.GetSize() == ref.GetSize()
    np.testing.assert_allclose(pred.GetSpacing(), ref.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    labels = set(np.unique(sitk.GetArrayFromImage(pred)).tolist())
    assert labels <= set(json.loads((ds.raw / "dataset.json").read_text())["labels"].values())

    r = run_cli("evaluate", out, ds.raw / "labelsTr", "--dataset-json", ds.raw / "dataset.json", env=env)
    assert r.returncode == 0, r.stderr
    assert "| Chiasm |" in r.stdout and (out / "organmtl_summary.json").is_file()
