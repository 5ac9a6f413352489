"""Settings that travel with the model, through the stock commands: a FocusNet ``_Tiny`` trainer
trained one epoch with some ``ORGANMTL_FOCUSNET_*`` values, then ``nnUNetv2_train ... --c`` and
``nnUNetv2_predict`` from a shell with other values. The stored values win (the log says which),
and the network predict builds is the trained one (other ROI/width values would not load its weights)."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from organmtl.procs import run_in_group, venv_bin

pytestmark = pytest.mark.e2e
TRAINER = "nnUNetTrainerOMTLFocusNetV1_Tiny"
BUDGET = {"ORGANMTL_EPOCHS": "1", "ORGANMTL_ITERS_PER_EPOCH": "2", "ORGANMTL_VAL_ITERS": "1"}
TRAINED = {"ORGANMTL_FOCUSNET_ROI": "4,16,16", "ORGANMTL_FOCUSNET_WIDTH": "0.125",
           "ORGANMTL_FOCUSNET_HEAT_THRESHOLD": "0.3", "ORGANMTL_FOCUSNET_PHASE_EPOCHS": "snet=1,sol=0,sos=0,joint=0"}
OTHER_SHELL = {"ORGANMTL_FOCUSNET_ROI": "2,8,8", "ORGANMTL_FOCUSNET_WIDTH": "0.25",
               "ORGANMTL_FOCUSNET_HEAT_THRESHOLD": "0.9", "ORGANMTL_FOCUSNET_PHASE_EPOCHS": "snet=2"}


def _entry(plans: dict, configuration: str) -> dict:
    return plans["configurations"][configuration]["organmtl_focusnet"]


def test_stored_focusnet_settings_win_at_continue_and_predict(han_dataset, tmp_path):
    ds = han_dataset.with_results(tmp_path / "res")
    cfg = ds.configuration
    train = [venv_bin("nnUNetv2_train"), str(ds.dataset_id), cfg, "0", "-tr", TRAINER, "-device", "cpu"]
    run_in_group(train, env={**ds.env, **BUDGET, **TRAINED}, log_file=tmp_path / "train.log", timeout=1800)
    fold = ds.fold(TRAINER)
    first = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    stored = _entry(first["init_args"]["plans"], cfg)
    assert (stored["roi_size"], stored["width"], stored["heat_threshold"]) == ([4, 16, 16], 0.125, 0.3)
    assert stored["options"]["roi"] == [4, 16, 16] and stored["fold_record"]["schedule"] == [["snet", 1]]
    assert "fold_record" not in _entry(json.loads((fold.parent / "plans.json").read_text()), cfg)

    # another shell: other values for the model's settings; --c continues the stored model
    log = tmp_path / "continued.log"
    run_in_group(train + ["--c"], env={**ds.env, **BUDGET, **OTHER_SHELL}, log_file=log, timeout=1800)
    text = log.read_text()
    for var, value in OTHER_SHELL.items():
        assert f"wins over {var}={value!r}" in text, var
    assert "FocusNet phases (epochs): [('snet', 1)]" in text
    assert f"FocusNet settings read from checkpoint {fold / 'checkpoint_final.pth'}" in text
    again = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert _entry(again["init_args"]["plans"], cfg) == stored
    shared = _entry(json.loads((fold.parent / "plans.json").read_text()), cfg)
    assert shared == {k: v for k, v in stored.items() if k != "fold_record"}
    assert again["network_weights"]["snet.stem.0.weight"].shape[0] == 4           # width 0.125 of 32 channels

    # nnUNetv2_predict from the other shell builds the stored network and loads the trained weights
    case = sorted((ds.raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    shutil.copy(case, inp)
    run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", str(ds.dataset_id), "-c", cfg,
                  "-f", "0", "-tr", TRAINER, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
                 env={**ds.env, **OTHER_SHELL}, log_file=tmp_path / "predict.log", timeout=1800)
    pred = sitk.ReadImage(str(out / case.name.replace("_0000.nii.gz", ".nii.gz")))
    assert pred.GetSize() == sitk.ReadImage(str(case)).GetSize()
    labels = json.loads((ds.raw / "dataset.json").read_text())["labels"].values()
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= set(labels)
