"""Demo data sets converted and tiny-planned ONCE per test session, shared by the e2e modules.

Each fixture yields a :class:`tests.helpers.PlannedDataset` (``.env``, ``.dataset_id``, ``.raw``,
``.preprocessed``, ``.results``, ``.configuration``, ``.fold(trainer, fold)``). The raw and
preprocessed folders are shared: tests read them and never change them. Trainings share
``.results``: each module uses its own trainer names (or its own fold, or ``.with_results(tmp_path)``),
so no test depends on another or on the order they run in.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import pytest

from tests.helpers import PlannedDataset, nnunet_env_vars, plan_dataset, run_cli

HAN_ID, ABDOMEN_ID, MULTITASK_ID = 401, 611, 740
MULTITASK_TASKS = ("brain_mr", "breast_mr", "cardiac_cta")


@pytest.fixture(scope="session")
def han_dataset(demo_root, tmp_path_factory) -> PlannedDataset:
    """The demo head-and-neck phantoms (``organmtl convert pddca``, CT with the PDDCA organs)
    planned with ``organmtl plan-tiny`` (``3d_tiny``): Dataset401_HaN in its own nnU-Net folders.
    ``splits_final.json`` is nnU-Net's own (written by the first training, the same every time)."""
    return plan_dataset(tmp_path_factory.mktemp("han"), "pddca", demo_root / "han_pddca", HAN_ID, "HaN")


@pytest.fixture(scope="session")
def abdomen_dataset(demo_root, tmp_path_factory) -> PlannedDataset:
    """The demo abdominal fat/water MR (``organmtl convert volumes``, two channels) with one heatmap
    channel per hip-joint landmark (``--landmark-channels heatmap --one-channel-per-landmark``),
    planned ``3d_tiny`` and ``2d_tiny``: Dataset611_LmAbdomen. Fold 0 validates on one case
    (``splits_final.json`` with one fold: the first case validates, the others train)."""
    return plan_dataset(tmp_path_factory.mktemp("abdomen"), "volumes", demo_root / "abdomen_mr", ABDOMEN_ID,
                        "LmAbdomen", "--landmark-channels", "heatmap", "--one-channel-per-landmark",
                        configurations=("3d_tiny", "2d_tiny"), one_validation_case=True)


@pytest.fixture(scope="session")
def multitask_dataset(demo_root, tmp_path_factory) -> PlannedDataset:
    """The three demo multi-modality tasks, each ``organmtl convert volumes``, merged by ``convert
    merge`` (shared background, ``organmtl_tasks`` in dataset.json) and planned ``3d_tiny``:
    Dataset740_MultiTask. Fold 0 validates on one case (the first brain case), the others train."""
    root = tmp_path_factory.mktemp("multitask")
    env = nnunet_env_vars(root)
    parts = [Path(env["nnUNet_raw"]) / f"Dataset{i:03d}_{t}" for i, t in enumerate(MULTITASK_TASKS, MULTITASK_ID + 1)]
    steps = [("convert", "volumes", demo_root / "multimodal" / t, "--dataset-id", i, "--name", t)
             for i, t in enumerate(MULTITASK_TASKS, MULTITASK_ID + 1)]
    steps += [("convert", "merge", *parts, "--dataset-id", MULTITASK_ID, "--name", "MultiTask"),
              ("plan-tiny", "-d", MULTITASK_ID, "-np", "1")]
    for args in steps:
        r = run_cli(*args, env=env, timeout=1800)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    name = f"Dataset{MULTITASK_ID}_MultiTask"
    ds = PlannedDataset(MULTITASK_ID, name, Path(env["nnUNet_raw"]) / name, Path(env["nnUNet_preprocessed"]) / name,
                        Path(env["nnUNet_results"]), ("3d_tiny",), MappingProxyType(env))
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds.raw / "imagesTr").glob("*_0000.nii.gz"))
    (ds.preprocessed / "splits_final.json").write_text(json.dumps([{"train": cases[1:], "val": cases[:1]}]))
    return ds


#: the HaN models trained once per session on two folds of nnU-Net's own split (:func:`han_crossval`)
CROSSVAL_BASELINE, CROSSVAL_FOCUSNET = "nnUNetTrainerOMTLBaseline_Tiny", "nnUNetTrainerOMTLFocusNetV2_Tiny"
CROSSVAL_FOLDS = (0, 1)
#: the shortest schedules: one iteration per epoch, the baseline 2 epochs, FocusNetv2 one epoch per phase;
#: one torch thread per training, two trainings side by side
CROSSVAL_BUDGET = {"ORGANMTL_ITERS_PER_EPOCH": "1", "ORGANMTL_VAL_ITERS": "1", "ORGANMTL_CPU_THREADS": "1"}
CROSSVAL_SCHEDULES = {CROSSVAL_BASELINE: {"ORGANMTL_EPOCHS": "2"},
                      CROSSVAL_FOCUSNET: {"ORGANMTL_EPOCHS": "5",
                                          "ORGANMTL_FOCUSNET_PHASE_EPOCHS": "snet=1,sol=1,ae=1,sos=1,joint=1"}}


@dataclass(frozen=True)
class CrossvalModels:
    """:func:`han_crossval`: the dataset (with the models' own ``nnUNet_results``), nnU-Net's 5-fold split,
    and each training's log."""
    ds: PlannedDataset
    splits: list
    logs: Path

    def env(self, trainer: str) -> dict:
        return {**self.ds.env, **CROSSVAL_BUDGET, **CROSSVAL_SCHEDULES[trainer]}

    def log(self, trainer: str, fold: int) -> str:
        return (self.logs / f"{trainer}_{fold}.log").read_text()


@pytest.fixture(scope="session")
def han_crossval(han_dataset, tmp_path_factory) -> CrossvalModels:
    """The stock baseline and FocusNetv2 (``_Tiny``) trained by ``nnUNetv2_train`` on folds 0 and 1 of
    nnU-Net's own split of the demo HaN data with ``--npz``, FocusNetv2's fold 1 without it and then
    ``nnUNetv2_train --val --npz`` (nnU-Net's way to add the probabilities later). Shared by the workflow
    test (cross-validation, ensembling, postprocessing), the FocusNet and stock-command tests (fold 0)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from organmtl.procs import run_in_group, venv_bin

    root = tmp_path_factory.mktemp("han_crossval")
    ds = han_dataset.with_results(root / "res")
    logs = root / "logs"
    logs.mkdir()
    path = ds.preprocessed / "splits_final.json"
    if not path.is_file():        # what the first training writes (seed 12345), before two start side by side
        cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds.raw / "imagesTr").glob("*_0000.nii.gz"))
        path.write_text(json.dumps(generate_crossval_split(cases, seed=12345, n_splits=5), indent=4))
    models = CrossvalModels(ds, json.loads(path.read_text()), logs)

    def train(trainer: str, fold: int):
        cmd = [venv_bin("nnUNetv2_train"), str(ds.dataset_id), ds.configuration, str(fold), "-tr", trainer,
               "-device", "cpu"]
        log = logs / f"{trainer}_{fold}.log"
        later = trainer == CROSSVAL_FOCUSNET and fold == 1
        run_in_group(cmd + ([] if later else ["--npz"]), env=models.env(trainer), log_file=log, timeout=900)
        if later:
            assert not list((ds.fold(trainer, fold) / "validation").glob("*.npz"))
            run_in_group(cmd + ["--val", "--npz"], env=models.env(trainer), log_file=logs / f"{trainer}_{fold}_val.log",
                         timeout=900)

    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(train, t, k) for t in (CROSSVAL_FOCUSNET, CROSSVAL_BASELINE) for k in CROSSVAL_FOLDS]:
            f.result()
    return models


DICOM_RT_ID = 452
DICOM_RT_TRAINER = "nnUNetTrainerOMTLBaseline_Tiny"


@pytest.fixture(scope="session")
def dicom_rt_model(tmp_path_factory) -> tuple[PlannedDataset, Path]:
    """A tiny nnU-Net model of the demo DICOM-RT phantoms: cases rt000-rt003 (``write_dicom_rt``,
    seed 0; rt002 lacks ``Parotid R`` and is dropped) converted by ``organmtl convert dicom-rt``,
    planned ``3d_tiny`` (rt000 validates), trained by ``nnUNetv2_train`` fold 0 with
    ``nnUNetTrainerOMTLBaseline_Tiny`` for 2 x 6 iterations (enough to find the body).
    Returns (dataset, DICOM root): ``ROOT/train/<case>/`` the training cases (CT + RTSTRUCT),
    ``ROOT/new/rt004/`` a fifth phantom never trained on."""
    from organmtl.demo_data.dicom_rt import write_dicom_rt
    from organmtl.procs import run_in_group, venv_bin

    root = tmp_path_factory.mktemp("dicom_rt_model")
    write_dicom_rt(root / "new", 5, seed=0)
    (root / "train").mkdir()
    for case in ("rt000", "rt001", "rt002", "rt003"):
        (root / "new" / case).rename(root / "train" / case)
    ds = plan_dataset(root, "dicom-rt", root / "train", DICOM_RT_ID, "RT", one_validation_case=True)
    env = {**ds.env, "ORGANMTL_EPOCHS": "2", "ORGANMTL_ITERS_PER_EPOCH": "6", "ORGANMTL_VAL_ITERS": "1",
           "ORGANMTL_SEED": "0"}
    run_in_group([venv_bin("nnUNetv2_train"), str(DICOM_RT_ID), ds.configuration, "0", "-tr", DICOM_RT_TRAINER,
                  "-device", "cpu"], env=env, log_file=root / "train.log", timeout=900)
    return ds, root
