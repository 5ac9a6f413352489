"""Helpers several test modules share: the ``organmtl`` command runner, nnU-Net folders and
environment, one-thread pinning, rotations and the hypothesis image-geometry strategy, the demo
spine slices as COCO, and a converted + tiny-planned nnU-Net dataset.

Import them (``from tests.helpers import run_cli``); fixtures built on them live in
``tests/conftest.py`` and ``tests/e2e/conftest.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent

#: Thread pinning for subprocesses on a shared CPU (numpy/scipy/SimpleITK pools; nnU-Net sets torch's own).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ------------------------------------------------------------------ commands and environments

def run_cli(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``organmtl ARGS`` as a user would (console script of this interpreter's venv)."""
    exe = Path(sys.executable).parent / "organmtl"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def nnunet_env_vars(root: Path) -> dict[str, str]:
    """nnU-Net's three folders under ``root`` (raw, pre, res), no data-augmentation workers, one
    preprocessing process and one thread: the environment for a test's nnU-Net subprocesses."""
    root = Path(root)
    return {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
            "nnUNet_results": str(root / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", **ONE_THREAD}


@contextmanager
def one_thread():
    """Torch on one thread inside the block: tiny tensors run faster and a shared CPU is not oversubscribed."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------ geometry

def rotation(angles) -> np.ndarray:
    """The 3x3 rotation ``Rz(c) @ Ry(b) @ Rx(a)`` for ``angles = (a, b, c)`` in radians."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def geometries(shape=((2, 9), (2, 9), (2, 9)), *extra: st.SearchStrategy) -> st.SearchStrategy:
    """Image grids for round-trip properties: ``(shape, spacing, origin, angles, *extra)`` with
    ``shape[i]`` in the inclusive ``shape`` ranges, spacing 0.3-4 mm, origin within +-300 mm and
    three rotation angles (for :func:`rotation`)."""
    return st.tuples(
        st.tuples(*[st.integers(lo, hi) for lo, hi in shape]),
        st.tuples(*[st.floats(0.3, 4.0)] * 3),
        st.tuples(*[st.floats(-300, 300)] * 3),
        st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
        *extra,
    )


def file_examples(n: int):
    """Hypothesis settings for a property that writes files for each example: ``n`` examples, no
    deadline, and the function-scoped ``tmp_path_factory`` allowed (each example makes its own folder)."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------ files

def read_array(path) -> np.ndarray:
    """The voxel array (z, y, x) of an image file, read with SimpleITK."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dataset_json(dataset: Path) -> dict:
    """``dataset.json`` of an nnU-Net dataset folder."""
    return json.loads((Path(dataset) / "dataset.json").read_text())


# ------------------------------------------------------------------ demo data sets

def write_spine_coco(demo: Path, out: Path, *options: str) -> Path:
    """The demo spine slices under ``demo`` (``write_demo_data`` output) converted to COCO in ``out``
    with ``organmtl convert volumes --to coco`` (contour points, pixel spacing); returns ``out``."""
    from organmtl.cli import main

    assert main(["convert", "volumes", str(Path(demo) / "spine" / "spine_sag_mr"), "--to", "coco",
                 "--dataset-id", "30", "--out", str(out), *options]) == 0
    return Path(out)


@dataclass(frozen=True)
class PlannedDataset:
    """A demo data set converted to nnU-Net's raw layout and planned with ``organmtl plan-tiny``.

    ``env`` holds the nnU-Net folders (``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results``),
    ``nnUNet_n_proc_DA=0``, ``nnUNet_def_n_proc=1`` and one-thread pinning: pass it to subprocesses
    (``run_cli(..., env=ds.env)``, ``run_in_group(..., env={**ds.env, **budget})``). It is read-only;
    build a new dict to add variables. ``raw`` and ``preprocessed`` are the dataset folders, ``results``
    the ``nnUNet_results`` root; ``configuration`` is the first of ``configurations``.
    """

    dataset_id: int
    name: str
    raw: Path
    preprocessed: Path
    results: Path
    configurations: tuple[str, ...]
    env: Mapping[str, str]

    @property
    def configuration(self) -> str:
        return self.configurations[0]

    def fold(self, trainer: str, fold: int = 0, configuration: str | None = None, plans: str = "nnUNetPlans") -> Path:
        """The results folder nnU-Net writes for ``trainer`` on ``fold``."""
        return self.results / self.name / f"{trainer}__{plans}__{configuration or self.configuration}" / f"fold_{fold}"

    def with_results(self, results: Path) -> PlannedDataset:
        """The same raw/preprocessed data with another ``nnUNet_results`` (a test's private results)."""
        return replace(self, results=Path(results), env=MappingProxyType({**self.env, "nnUNet_results": str(results)}))


def plan_dataset(root: Path, source: str, src: Path, dataset_id: int, name: str, *convert_options: str,
                 configurations=("3d_tiny",), one_validation_case: bool = False, timeout: int = 1800) -> PlannedDataset:
    """``organmtl convert SOURCE SRC`` into ``root``'s nnU-Net folders, then ``organmtl plan-tiny``.

    ``one_validation_case`` writes a one-fold ``splits_final.json`` whose validation set is the first
    case (nnU-Net's final validation predicts every validation case; one keeps it short)."""
    env = nnunet_env_vars(root)
    r = run_cli("convert", source, src, "--dataset-id", dataset_id, "--name", name, *convert_options,
                env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = run_cli("plan-tiny", "-d", dataset_id, "-c", *configurations, "-np", "1", env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    folder = f"Dataset{int(dataset_id):03d}_{name}"
    ds = PlannedDataset(int(dataset_id), folder, Path(env["nnUNet_raw"]) / folder,
                        Path(env["nnUNet_preprocessed"]) / folder, Path(env["nnUNet_results"]),
                        tuple(configurations), MappingProxyType(env))
    if one_validation_case:
        cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (ds.raw / "imagesTr").glob("*_0000.nii.gz"))
        (ds.preprocessed / "splits_final.json").write_text(json.dumps([{"train": cases[1:], "val": cases[:1]}]))
    return ds


def run_spawned_ranks(target, args_per_rank: list[tuple], timeout_s: float) -> float:
    """Start one spawned process per rank (``target(*args)``), wait at most ``timeout_s`` seconds for
    all of them, kill any still running; assert none hung and every one exited 0. Returns the wall time."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_rank]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, timeout_s - (time.monotonic() - t0)))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"rank(s) {hung} still running after {timeout_s} s: a collective was skipped on one rank"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), f"rank exit codes {codes} (a collective failed or timed out, see the output)"
    return time.monotonic() - t0


# ------------------------------------------------------------------ nnU-Net's cross-validation tools

def assert_crossval_ready(fold: Path, val_cases=None, npz: bool = True) -> list[str]:
    """Assert that a trained fold holds what nnU-Net's cross-validation tools read
    (``nnUNetv2_find_best_configuration``, ``nnUNetv2_ensemble``, ``nnUNetv2_determine_postprocessing``):
    ``validation/summary.json`` that nnU-Net's ``load_summary_json`` reads, with one class (or region)
    per segmentation output of the model folder's dataset.json; one segmentation per validation case
    (``val_cases`` when given); with ``npz`` (trained with ``--npz``) ``<case>.npz`` + ``<case>.pkl``
    whose probabilities have one channel per segmentation output and the case's shape, and give back
    the exported segmentation through the label manager (what the ensembling computes). Returns the cases."""
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    fold, model = Path(fold), Path(fold).parent
    meta = json.loads((model / "dataset.json").read_text())
    plans = PlansManager(str(model / "plans.json"))
    lm = plans.get_label_manager(meta)
    val, ending = fold / "validation", meta["file_ending"]
    summary = load_summary_json(str(val / "summary.json"))
    classes = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    assert set(summary["mean"]) == {tuple(c) if isinstance(c, list) else c for c in classes}, summary["mean"].keys()
    assert "Dice" in summary["foreground_mean"]
    cases = sorted(p.name[: -len(ending)] for p in val.glob(f"*{ending}"))
    assert cases == sorted(Path(c["prediction_file"]).name[: -len(ending)] for c in summary["metric_per_case"])
    if val_cases is not None:
        assert cases == sorted(val_cases)
    rw = plans.image_reader_writer_class()
    for case in cases if npz else ():
        seg, _ = rw.read_seg(str(val / f"{case}{ending}"))
        probs = np.load(val / f"{case}.npz")["probabilities"]
        assert probs.shape == (lm.num_segmentation_heads, *seg.shape[1:]), (case, probs.shape, seg.shape)
        assert (val / f"{case}.pkl").is_file()
        np.testing.assert_array_equal(lm.convert_probabilities_to_segmentation(probs), seg[0])
    return cases


# ------------------------------------------------------------------ DICOM conformance

def dciodvfy(path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)``: the "Error" and "Warning" lines of dciodvfy (dicom3tools, an
    independent validator of DICOM objects against the standard's IOD and module tables) for one
    file. dciodvfy missing fails the test (scripts/setup.sh installs it); a non-zero exit without
    an "Error" line counts as an error."""
    import shutil

    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy not found: scripts/setup.sh installs it (Debian package dicom3tools)"
    r = subprocess.run([exe, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = [line.strip() for line in r.stdout.splitlines()]
    errors = [line for line in lines if line.startswith("Error")]
    if r.returncode != 0 and not errors:
        errors.append(f"dciodvfy exit code {r.returncode}: {r.stdout.strip()[-300:]}")
    return errors, [line for line in lines if line.startswith("Warning")]
