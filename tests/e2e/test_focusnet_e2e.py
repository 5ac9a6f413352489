"""FocusNet trainers through the stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` on the demo HaN
phantom with tiny plans on CPU: S-Net alone and FocusNetv2 through every phase (1 epoch each), and
FocusNetv1 with a ``--c`` resume across a phase boundary. The session's converted + planned HaN
dataset is shared by all trainers."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from organmtl.procs import run_in_group, venv_bin
from tests.e2e.conftest import CROSSVAL_FOCUSNET
from tests.helpers import assert_crossval_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
PHASES = {
    "nnUNetTrainerOMTLSNet_Tiny": ["snet"],
    "nnUNetTrainerOMTLFocusNetV1_Tiny": ["snet", "sol", "sos", "joint"],
    "nnUNetTrainerOMTLFocusNetV2_Tiny": ["snet", "sol", "ae", "sos", "joint"],
}
BUDGET = {"ORGANMTL_ITERS_PER_EPOCH": "2", "ORGANMTL_VAL_ITERS": "1",
          "ORGANMTL_FOCUSNET_PHASE_EPOCHS": "snet=1,sol=1,ae=1,sos=1,joint=1"}


@pytest.fixture(scope="module")
def han(han_dataset):
    """The shared demo HaN dataset (converted and tiny-planned once per session) and the phase budget."""
    return han_dataset, {**han_dataset.env, **BUDGET}


def _train_until(cmd, env, log, marker, timeout=1800):
    """Start training and kill its process group once ``marker`` appears in the log (a crash mid-run)."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        t0 = time.time()
        while marker not in log.read_text():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() - t0 < timeout, "marker never appeared"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _predict_and_check(ds, env, trainer, tmp_path):
    """Stock ``nnUNetv2_predict`` (S-Net's segmentation, the note naming ``organmtl predict-focusnet`` once for
    models with SOS-Net), then ``organmtl predict-focusnet`` (each small organ pasted at most once per case)."""
    case = sorted((ds.raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(case, inp)
    name = case.name.replace("_0000.nii.gz", ".nii.gz")
    args = ["-i", str(inp), "-d", str(ds.dataset_id), "-c", ds.configuration, "-f", "0", "-tr", trainer, "-device",
            "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    with_sos = trainer != "nnUNetTrainerOMTLSNet_Tiny"
    commands = {"stock": [venv_bin("nnUNetv2_predict")], "focusnet": [venv_bin("organmtl"), "predict-focusnet"]}
    for kind, command in commands.items():
        out = tmp_path / f"out_{kind}"
        log = tmp_path / f"predict_{kind}.log"
        run_in_group(command + args + ["-o", str(out)], env=env, log_file=log, timeout=1800)
        text = log.read_text()
        pastes = re.findall(r"FocusNet: (\d+) of (\d+) small organs pasted in this case \(once per case", text)
        if kind == "stock":
            assert text.count("organmtl predict-focusnet") == int(with_sos) and not pastes, text[-2000:]
        elif with_sos:
            assert len(pastes) == 1, text[-2000:]              # one case, one line: its pastes
            pasted, small = (int(v) for v in pastes[0])
            assert small == 3 and 0 <= pasted <= 3
        else:
            assert not pastes
        pred, ref = sitk.ReadImage(str(out / name)), sitk.ReadImage(str(case))
        assert pred.GetSize() == ref.GetSize()
        labels = set(np.unique(sitk.GetArrayFromImage(pred)).tolist())
        assert labels <= set(json.loads((ds.raw / "dataset.json").read_text())["labels"].values())


#: through the stock commands: S-Net alone and FocusNetv2 (every phase); FocusNetv1 in the resume test below;
#: the Table 6 ablations (V2NoConcat, V2OriginAE) differ from FocusNetv2 only inside the steps and network,
#: which tests/test_focusnet_train_steps.py checks in process
STOCK_COMMAND_TRAINERS = ("nnUNetTrainerOMTLSNet_Tiny", "nnUNetTrainerOMTLFocusNetV2_Tiny")


@pytest.mark.parametrize("trainer", STOCK_COMMAND_TRAINERS)
def test_trainer_runs_every_phase_and_predicts(han, trainer, tmp_path, request):
    ds, env = han
    if trainer == CROSSVAL_FOCUSNET:          # trained once per session (fold 0 of tests/e2e/conftest.han_crossval)
        models = request.getfixturevalue("han_crossval")
        ds, env, text = models.ds, models.env(trainer), models.log(trainer, 0)
    else:
        log = tmp_path / "train.log"
        run_in_group([venv_bin("nnUNetv2_train"), str(ds.dataset_id), ds.configuration, "0", "-tr", trainer,
                      "-device", "cpu", "--npz"], env=env, log_file=log, timeout=1800)
        text = log.read_text()
    assert [p for p in PHASES[trainer] if f"FocusNet phase: {p}" in text] == PHASES[trainer]
    assert "GPU memory plan: none for a _Tiny trainer" in text and "GPU memory plan (" not in text
    # the autoencoder (ae) and SOS-Net (sos/joint, a third of the samples at random positions) trained on patches
    # holding every small organ whole: the sampler switched in at ae and again at sos
    assert text.count("patches holding every small organ whole") == (2 if trainer != "nnUNetTrainerOMTLSNet_Tiny" else 0)
    fold = ds.fold(trainer)
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == len(PHASES[trainer])
    best = torch.load(fold / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert best["current_epoch"] == len(PHASES[trainer])                  # "best" from the last phase only
    assert bool(best["network_weights"]["sos_trained"]) == (trainer != "nnUNetTrainerOMTLSNet_Tiny")
    plans = json.loads((fold.parent / "plans.json").read_text())
    assert "organmtl_gpu_memory" not in plans["configurations"][ds.configuration]
    settings = plans["configurations"][ds.configuration]["organmtl_focusnet"]
    with_sos = trainer != "nnUNetTrainerOMTLSNet_Tiny"
    assert settings["use_sos"] == with_sos
    assert settings["small_organs"] == (["Chiasm", "OpticNerve_L", "OpticNerve_R"] if with_sos else [])
    assert settings["concat_image"]
    has_ae = any(k.startswith("shape_ae.") for k in ckpt["network_weights"])
    assert has_ae == ("FocusNetV2" in trainer)
    assert_crossval_ready(fold)          # what nnUNetv2_find_best_configuration / ensembling read (--npz)
    # the paste floor was calibrated on validation patches from the sol phase on and travels with the weights
    assert (text.count("FocusNet paste floor (validation patches)") == 4) == with_sos
    assert ckpt["network_weights"]["heat_floor"].shape == ((3,) if with_sos else (0,))
    centres = sorted((fold / "validation").glob("*_centres.json"))
    assert bool(centres) == with_sos
    for c in centres:
        rec = json.loads(c.read_text())["centres"]
        assert set(rec) == {"Chiasm", "OpticNerve_L", "OpticNerve_R"}
        assert all(len(v["world_mm"]) == 3 and np.isfinite(v["world_mm"]).all() for v in rec.values())
    _predict_and_check(ds, env, trainer, tmp_path)


def test_focusnet_v1_resumes_across_a_phase_and_predicts(han, tmp_path):
    """Killed right after the S-Net phase, ``--c`` continues with SOL-Net from checkpoint_latest."""
    ds, env = han
    trainer = "nnUNetTrainerOMTLFocusNetV1_Tiny"
    cmd = [venv_bin("nnUNetv2_train"), str(ds.dataset_id), ds.configuration, "0", "-tr", trainer, "-device", "cpu"]
    _train_until(cmd, env, tmp_path / "first.log", "phase snet done, checkpoint_latest.pth written")
    fold = ds.fold(trainer)
    assert torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)["current_epoch"] == 1
    log = tmp_path / "resumed.log"
    run_in_group(cmd + ["--c", "--npz"], env=env, log_file=log, timeout=1800)
    text = log.read_text()
    assert "FocusNet phase: snet" not in text
    assert all(f"FocusNet phase: {p}" in text for p in ("sol", "sos", "joint"))
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 4
    assert_crossval_ready(fold)
    _predict_and_check(ds, env, trainer, tmp_path)
