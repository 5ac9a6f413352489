"""Multi-task CNN end to end with the stock commands (Moeskops et al., "Deep Learning for Multi-task
Medical Image Segmentation in Multiple Modalities"; docs/multitask_cnn.md): the three
demo multi-modality tasks converted with ``volumes``, merged with ``merge`` and planned once (session
fixture, copied per module); the triplanar and U-Net trainers through ``nnUNetv2_train``/``nnUNetv2_predict``; the
experiment runner on two tasks (three subsets); and the brain task on nilearn's MNI152 template."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from organmtl.nnunet_trainers.multitask.evaluation import (argmax_labels, confusion_rate, head_label_values,
                                                            load_probabilities, task_masked_labels)
from organmtl.nnunet_trainers.multitask.tasks import TaskTable
from organmtl.procs import run_in_group, venv_bin
from tests.e2e.conftest import MULTITASK_ID, MULTITASK_TASKS
from tests.helpers import assert_crossval_ready, nnunet_env_vars, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]
TASKS = MULTITASK_TASKS
MERGED = MULTITASK_ID
BUDGET = {"ORGANMTL_EPOCHS": "1", "ORGANMTL_ITERS_PER_EPOCH": "2", "ORGANMTL_VAL_ITERS": "1"}


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def merged(multitask_dataset, tmp_path_factory):
    """The session's merged three-task dataset (tests/e2e/conftest.py: ``convert volumes`` x 3 -> ``convert
    merge`` -> ``plan-tiny``) copied into this module's own nnU-Net folders, whose tests write their own splits."""
    root = tmp_path_factory.mktemp("mt_e2e")
    env = nnunet_env_vars(root)
    ds = multitask_dataset
    assert ds.dataset_id == MERGED and ds.name == f"Dataset{MERGED}_MultiTask"
    raw, pre = root / "raw" / ds.name, root / "pre" / ds.name
    shutil.copytree(ds.raw, raw)
    shutil.copytree(ds.preprocessed, pre)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"env": env, "root": root, "raw": raw, "pre": pre, "meta": json.loads((raw / "dataset.json").read_text())}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fold0(merged):
    """fold 0: per task the first 4 cases train, the 5th validates, the 6th is held out."""
    table = TaskTable.from_dataset_json(merged["meta"])
    split, test = {"train": [], "val": []}, []
    for t in TASKS:
        cases = sorted(table.tasks[t].cases)
        split["train"] += cases[:4]
        split["val"] += cases[4:5]
        test += cases[5:6]
    (merged["pre"] / "splits_final.json").write_text(json.dumps([split]))
    return table, test


@pytest.mark.parametrize("trainer", ["nnUNetTrainerOMTLTriplanar_Tiny", "nnUNetTrainerOMTLMultiTaskUNet_Tiny"])
def test_trainers_with_stock_train_and_predict(merged, trainer, tmp_path):
    table, test = _fold0(merged)
    env = {**merged["env"], **BUDGET}
    log = tmp_path / "train.log"
    run_in_group([venv_bin("nnUNetv2_train"), str(MERGED), "3d_tiny", "0", "-tr", trainer, "-device", "cpu",
                  "--npz"], env=env, log_file=log, timeout=900)
    text = log.read_text()
    assert f"Using trainer '{trainer}'" in text
    assert "task-balanced batches over ['brain_mr', 'breast_mr', 'cardiac_cta']" in text
    fold = merged["root"] / "res" / f"Dataset{MERGED}_MultiTask" / f"{trainer}__nnUNetPlans__3d_tiny" / "fold_0"
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer and ckpt["current_epoch"] == 1
    assert_crossval_ready(fold)          # what nnUNetv2_find_best_configuration / ensembling read (--npz)
    weights = ckpt["network_weights"]
    if "Triplanar" in trainer:                   # the paper's network was trained, not nnU-Net's U-Net
        assert weights["classifier.weight"].shape[:2] == (6, 48) and "stack.0.weight" in weights

    inp = tmp_path / "in"
    inp.mkdir()
    for case in test:
        shutil.copy(merged["raw"] / "imagesTr" / f"{case}_0000.nii.gz", inp)
    out = tmp_path / "out"
    run_in_group([venv_bin("nnUNetv2_predict"), "-i", str(inp), "-o", str(out), "-d", str(MERGED), "-c", "3d_tiny",
                  "-f", "0", "-tr", trainer, "-device", "cpu", "--disable_tta", "--save_probabilities",
                  "-npp", "1", "-nps", "1"], env=env, log_file=tmp_path / "predict.log", timeout=900)
    heads = head_label_values(merged["meta"]["labels"])
    for case in test:
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(merged["raw"] / "labelsTr" / f"{case}.nii.gz"))
        assert pred.GetSize() == ref.GetSize()
        probs = load_probabilities(out / f"{case}.npz")
        assert probs.shape == (6, *sitk.GetArrayFromImage(ref).shape)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
        np.testing.assert_array_equal(argmax_labels(probs, heads), sitk.GetArrayFromImage(pred))
        task = table.task_of(case)
        masked = task_masked_labels(probs, heads, table.allowed_labels(task))
        assert set(np.unique(masked)) <= set(table.allowed_labels(task))
        assert confusion_rate(masked, table.alien_labels(task)) == 0.0


def test_experiment_runner_on_two_tasks(merged, tmp_path):
    out = tmp_path / "exp"
    r = _ok(run_cli("multitask-experiments", "--dataset-id", MERGED, "--out", out, "--tasks", "breast_mr",
                    "cardiac_cta", "--trainer", "nnUNetTrainerOMTLMultiTaskUNet_Tiny", "--test-per-task", "1",
                    "--val-per-task", "1", "--epochs", "1", "--iterations", "2", "--val-iterations", "1",
                    env=merged["env"], timeout=1800))
    assert "| experiment | tasks |" in r.stdout
    splits = json.loads((merged["pre"] / "splits_final.json").read_text())
    assert len(splits) == 3                                   # 2^2 - 1 subsets = folds 0..2
    assert all(c.startswith("breast_mr") for c in splits[0]["train"] + splits[0]["val"])
    assert {c.split("_", 1)[0] for c in splits[2]["train"]} == {"breast", "cardiac"}
    with open(out / "experiments.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["experiment"], r["task"], r["class"]) for r in rows] == [
        ("1", "breast_mr", "pectoral_muscle"), ("2", "cardiac_cta", "coronary_artery"),
        ("3", "breast_mr", "pectoral_muscle"), ("3", "cardiac_cta", "coronary_artery")]
    for row in rows:
        for key in ("dice_argmax", "dice_task_masked", "dice_pr_threshold", "threshold"):
            assert 0.0 <= float(row[key]) <= 1.0, (key, row)   # binary tasks: PR threshold from validation
        assert 0.0 <= float(row["confusion_median_pct"]) <= 100.0 and row["n_test"] == "1"
    assert (out / "experiments.md").read_text().count("\n") == 2 + len(rows)
    for k in (1, 2, 3):
        assert (out / f"experiment_{k}" / "prediction").is_dir()


def test_brain_task_on_nilearn_mni152(tmp_path, monkeypatch):
    """The brain task on real data shipped in a PyPI package (nilearn's MNI152 T1 + GM/WM maps)."""
    from organmtl.nnunet_trainers.multitask.mni_brain import write_mni152_volumes

    env = {**nnunet_env_vars(tmp_path), **BUDGET}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ids = write_mni152_volumes(tmp_path / "mni", n_cases=4, voxel_mm=6.0)
    _ok(run_cli("convert", "volumes", tmp_path / "mni", "--dataset-id", 730, "--name", "MNI152"))
    raw = tmp_path / "raw" / "Dataset730_MNI152"
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3} and meta["numTraining"] == 4
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / f"{ids[0]}.nii.gz")))
    counts = np.bincount(lab.ravel(), minlength=4)
    assert counts[2] > counts[3] > counts[1] > 0            # GM > WM > CSF voxels in an adult brain
    _ok(run_cli("plan-tiny", "-d", 730, "-np", "1"))
    (tmp_path / "pre" / "Dataset730_MNI152" / "splits_final.json").write_text(
        json.dumps([{"train": ids[:3], "val": ids[3:]}]))
    trainer = "nnUNetTrainerOMTLTriplanar_Tiny"
    run_in_group([venv_bin("nnUNetv2_train"), "730", "3d_tiny", "0", "-tr", trainer, "-device", "cpu"],
                 env=env, log_file=tmp_path / "train.log", timeout=900)
    assert "task-balanced batches over ['all']" in (tmp_path / "train.log").read_text()
    val = tmp_path / "res" / "Dataset730_MNI152" / f"{trainer}__nnUNetPlans__3d_tiny" / "fold_0" / "validation"
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(val / f"{ids[3]}.nii.gz")))
    assert pred.shape == lab.shape and set(np.unique(pred)) <= {0, 1, 2, 3}
    # nnU-Net's validation summary scores exactly this case and these files, per class
    summary = json.loads((val / "summary.json").read_text())
    (case,) = summary["metric_per_case"]
    assert case["reference_file"].endswith(f"{ids[3]}.nii.gz") and set(case["metrics"]) == {"1", "2", "3"}
    ref = sitk.GetArrayFromImage(sitk.ReadImage(case["reference_file"]))
    for label, m in case["metrics"].items():
        v = int(label)
        assert m["TP"] + m["FN"] == (ref == v).sum() > 0 and m["TP"] + m["FP"] == (pred == v).sum(), label
        if m["TP"] + m["FP"] + m["FN"]:
            assert m["Dice"] == pytest.approx(2 * m["TP"] / (2 * m["TP"] + m["FP"] + m["FN"])), label
    assert summary["foreground_mean"]["Dice"] == pytest.approx(np.mean([m["Dice"] for m in case["metrics"].values()]))
