"""Benchmark: what ``organmtl predict`` adds around nnU-Net's predictor, per patient.

Not a test (not collected by pytest, not run in CI). Run (CPU, through /work/coord/heavy on the
shared machine)::

    .venv/bin/python benchmarks/bench_predict_overhead.py                 # 512 x 512 x 150, table + JSON
    .venv/bin/python benchmarks/bench_predict_overhead.py --quick         # 128 x 128 x 40

The model: a tiny nnU-Net model of the demo DICOM-RT phantoms (``organmtl.demo_data.dicom_rt``,
5 cases, rt002 dropped for lacking an ROI), converted by ``organmtl convert dicom-rt``, planned
by ``organmtl plan-tiny`` (``3d_tiny``) and trained by ``nnUNetv2_train`` fold 0 with
``nnUNetTrainerOMTLBaseline_Tiny`` (``--epochs`` x ``--iterations``, seeded).

The patient: a CT-only DICOM series of 150 slices of 512 x 512 (0.9 x 0.9 x 2.5 mm, stored values
HU + 1024, one file per slice, written by the demo writer ``write_ct_series``) holding a sixth
phantom (never trained on) resampled onto that grid, air around it.

Timed by ``organmtl.workflows.predict.predict_dicom`` itself (its ``predict_report.json``), the
model loaded once before, one patient per run, fastest of ``--repeats``:

- **find**: every file below the input folder read (headers) and sorted into series;
- **read**: the series' slices sorted and checked, pixels read by SimpleITK, rescaled;
- **predict**: ``nnUNetPredictor.predict_single_npy_array`` (nnU-Net's preprocessing, sliding
  window, resampling back, argmax) - nnU-Net's own time;
- **export**: the label map written as an RTSTRUCT and a SEG referencing the series.

Overhead = find + read + export; the target is at most 10 % of the predictor's time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.10
DATASET_ID = 453
TRAINER = "nnUNetTrainerOMTLBaseline_Tiny"


def train_model(root: Path, epochs: int, iterations: int) -> dict:
    """The tiny DICOM-RT model in ``root``'s nnU-Net folders; returns the nnU-Net environment."""
    from organmtl.demo_data.dicom_rt import write_dicom_rt
    from organmtl.procs import run_in_group, venv_bin

    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "pre"),
           "nnUNet_results": str(root / "res"), "nnUNet_n_proc_DA": "0"}
    write_dicom_rt(root / "src", 5, seed=0)
    (root / "src" / "rt004").rename(root / "rt004")          # the benchmark patient, never trained on
    log = root / "train.log"
    run_in_group([venv_bin("organmtl"), "convert", "dicom-rt", str(root / "src"), "-d", str(DATASET_ID),
                  "--name", "RT"], env=env, log_file=log)
    run_in_group([venv_bin("organmtl"), "plan-tiny", "-d", str(DATASET_ID), "-np", "1"], env=env, log_file=log)
    pre = root / "pre" / f"Dataset{DATASET_ID}_RT"
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (root / "raw" / pre.name / "imagesTr").glob("*_0000.nii.gz"))
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[1:], "val": cases[:1]}]))
    budget = {"ORGANMTL_EPOCHS": str(epochs), "ORGANMTL_ITERS_PER_EPOCH": str(iterations), "ORGANMTL_VAL_ITERS": "1",
              "ORGANMTL_SEED": "0"}
    t0 = time.perf_counter()
    run_in_group([venv_bin("nnUNetv2_train"), str(DATASET_ID), "3d_tiny", "0", "-tr", TRAINER, "-device", "cpu"],
                 env={**env, **budget}, log_file=log)
    env["train_s"] = f"{time.perf_counter() - t0:.1f}"
    return env


def write_patient(root: Path, folder: Path, slices: int, size: int) -> tuple:
    """The sixth phantom resampled onto a ``size`` x ``size`` x ``slices`` CT grid, written as DICOM."""
    from organmtl.demo_data.dicom_rt import Case, SeriesGeometry, make_case, write_ct_series

    phantom = make_case(4, 0)
    small = sitk.GetImageFromArray(phantom.hu)
    small.SetSpacing(phantom.geometry.spacing_xyz)
    small.SetOrigin(tuple(phantom.geometry.position(0)))
    small.SetDirection(phantom.geometry.direction)
    spacing = (0.9 * 512 / size, 0.9 * 512 / size, 2.5)
    centre = small.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in small.GetSize()])
    g = SeriesGeometry.centred(tuple(centre), shape_zyx=(slices, size, size), spacing_xyz=spacing)
    grid = sitk.Image([size, size, slices], sitk.sitkInt16)
    grid.SetSpacing(spacing)
    grid.SetOrigin(tuple(g.position(0)))
    grid.SetDirection(g.direction)
    big = sitk.Resample(small, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    case = Case("bench_patient", g, sitk.GetArrayFromImage(big), [], seed=7)
    write_ct_series(folder / "CT", case)
    return (slices, size, size), spacing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 x 128 x 40 instead of 512 x 512 x 150")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "predict_overhead.json")
    args = ap.parse_args()
    slices, size = (40, 128) if args.quick else (150, 512)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        env = train_model(root, args.epochs, args.iterations)
        train_s = float(env.pop("train_s"))
        os.environ.update(env)
        shape, spacing = write_patient(root, root / "patient", slices, size)
        from organmtl.workflows.predict import nnunet_backend, predict_dicom

        backend = nnunet_backend(str(DATASET_ID), "3d_tiny", TRAINER, [0], "nnUNetPlans", "checkpoint_final.pth", "cpu")
        runs = []
        for n in range(args.repeats):
            report, code = predict_dicom(root / "patient", root / f"out{n}", lambda: backend, ["rtstruct", "seg"],
                                         progress=False)
            assert code == 0, report
            case = report["cases"][0]
            runs.append({"find": report["seconds"]["find"], **case["seconds"],
                         "contours": sum(c["contours"] for c in case["rois"]["rtstruct"].values()),
                         "voxels": case["voxels"]})
        best = min(runs, key=lambda r: r["find"] + r["read"] + r["export"])
        predict_s = min(r["predict"] for r in runs)
        overhead = best["find"] + best["read"] + best["export"]
    result = {"series": {"shape_zyx": list(shape), "spacing_xyz": list(spacing), "files": shape[0]},
              "model": {"dataset": DATASET_ID, "configuration": "3d_tiny", "trainer": TRAINER, "folds": [0],
                        "epochs": args.epochs, "iterations_per_epoch": args.iterations, "train_s": round(train_s, 1),
                        "load_s": round(backend.load_s, 2)},
              "device": "cpu", "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc"),
              "machine": platform.processor() or platform.machine(), "repeats": args.repeats,
              "seconds": {"find": best["find"], "read": best["read"], "export_rtstruct_and_seg": best["export"],
                          "overhead": round(overhead, 3), "predictor": predict_s},
              "overhead_fraction": round(overhead / predict_s, 4), "target": TARGET,
              "rtstruct_contours": best["contours"], "predicted_voxels": best["voxels"], "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    s = result["seconds"]
    print(f"| series | find (s) | read (s) | export RTSTRUCT + SEG (s) | overhead (s) | nnU-Net predictor (s) | "
          f"overhead / predictor |\n|---|---|---|---|---|---|---|\n"
          f"| {shape[2]} x {shape[1]} x {shape[0]} | {s['find']:.2f} | {s['read']:.2f} | "
          f"{s['export_rtstruct_and_seg']:.2f} | {s['overhead']:.2f} | {s['predictor']:.1f} | "
          f"{100 * result['overhead_fraction']:.1f} % (target <= {100 * TARGET:.0f} %) |")
    print(f"model: train {train_s:.0f} s, load {backend.load_s:.1f} s; RTSTRUCT contours {best['contours']}; "
          f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
