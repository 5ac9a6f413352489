"""Benchmark: ``organmtl convert dicom-rt`` against rt-utils, and ``organmtl export rtstruct|seg``.

Not a test (not collected by pytest, not run in CI). Run::

    .venv/bin/python benchmarks/bench_export_dicom.py            # 100 slices of 512 x 512, 20 ROIs, best of 3
    .venv/bin/python benchmarks/bench_export_dicom.py --quick    # 24 slices of 256 x 256, 8 ROIs, best of 1

One planning-CT-like case is written with the demo DICOM-RT writer (organmtl.demo_data.dicom_rt):
a CT series (0.9 x 0.9 x 2.5 mm) and an RTSTRUCT with a body outline and organs as stacks of
ellipse polygons (one a ring, i.e. with a hole), 20 ROIs in all. Timed in this process, after
one untimed warm-up of each side, alternating, fastest of ``--repeats``:

- **convert**: ``organmtl convert dicom-rt SRC --dataset-id 1 --out OUT --overwrite`` through
  ``organmtl.cli.main`` (CT read, RTSTRUCT parse, checks, rasterisation, image and label map
  written as .nii.gz, dataset.json, report);
- **rt-utils** (the established converter; 1.2.7, installed into a private folder without its
  opencv-python requirement, the headless OpenCV here providing ``cv2``):
  ``RTStructBuilder.create_from`` + ``get_roi_mask_by_name`` for every ROI, the masks painted
  into one label map, and, to produce the same files, the CT read with SimpleITK's series reader
  and image and label map written as .nii.gz;
- **export rtstruct** / **export seg**: the converted label map back to DICOM on the CT series
  (``organmtl export rtstruct|seg PRED --dicom CT --out FILE --overwrite`` through ``main``).

Printed: seconds, the ratio convert / rt-utils (goal <= 1.0), the export times, file sizes and the
Dice between both converters' label maps (they must agree for the timing to mean anything).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from timing import best_times

TARGET_RATIO = 1.0
RT_UTILS = "rt-utils==1.2.7"


def write_case(folder: Path, n_slices: int, size: int, n_rois: int, seed: int) -> list[str]:
    """One CT + RTSTRUCT case with ``n_rois`` ROIs; returns the ROI names."""
    from organmtl.demo_data.dicom_rt import Case, Roi, SeriesGeometry, axial_contour, ellipse
    from organmtl.demo_data.dicom_rt import write_case as write_dicom_case

    rng = np.random.default_rng(seed)
    spacing = (0.9 * 512 / size, 0.9 * 512 / size, 2.5)
    g = SeriesGeometry.centred((0.0, 0.0, 100.0), shape_zyx=(n_slices, size, size), spacing_xyz=spacing)
    half_x, half_y = 0.42 * size * spacing[0], 0.32 * size * spacing[1]
    rois = [Roi(1, "Body", interpreted_type="EXTERNAL")]
    organs = n_rois - 1
    cols = int(np.ceil(np.sqrt(organs * 1.6)))
    rows = int(np.ceil(organs / cols))
    cell_x, cell_y = 1.4 * half_x / cols, 1.4 * half_y / rows
    centres = [(-0.7 * half_x + (i % cols + 0.5) * cell_x, -0.7 * half_y + (i // cols + 0.5) * cell_y)
               for i in range(organs)]
    for n, (cx, cy) in enumerate(centres, start=2):
        rois.append(Roi(n, f"Organ_{n - 1:02d}"))
    for k in range(n_slices):
        phase = rng.uniform(0, 2 * np.pi)
        rois[0].contours.append(axial_contour(g, k, ellipse((0, 0), (half_x, half_y), 128, phase)))
        for roi, (cx, cy) in zip(rois[1:], centres):
            mid, extent = n_slices * (0.3 + 0.4 * (roi.number % 5) / 5), n_slices * 0.35
            scale = 1 - ((k - mid) / extent) ** 2
            if scale <= 0.05:
                continue
            rx, ry = 0.38 * cell_x * np.sqrt(scale), 0.38 * cell_y * np.sqrt(scale)
            roi.contours.append(axial_contour(g, k, ellipse((cx, cy), (rx, ry), 48, phase)))
            if roi.number == 2:                      # a ring: the inner contour is a hole
                roi.contours.append(axial_contour(g, k, ellipse((cx, cy), (0.5 * rx, 0.5 * ry), 32, -phase)))
    hu = rng.integers(-50, 80, size=(n_slices, size, size)).astype(np.int16)
    write_dicom_case(folder, Case("bench", g, hu, rois, seed))
    return [r.name for r in rois]


def _quiet_main(argv: list[str]) -> None:
    from organmtl.cli import main

    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    if rc != 0:
        raise SystemExit(f"organmtl {' '.join(argv[:2])} failed ({rc}): {err.getvalue().strip()[-300:]}")


def run_convert(src: Path, out: Path) -> Path:
    _quiet_main(["convert", "dicom-rt", str(src), "--dataset-id", "1", "--name", "Bench", "--out", str(out),
                 "--overwrite"])
    return out / "Dataset001_Bench"


def run_rt_utils(case: Path, out: Path) -> None:
    """rt-utils masks -> one label map; CT and label map written like the converter's outputs."""
    from rt_utils import RTStructBuilder

    rt = RTStructBuilder.create_from(dicom_series_path=str(case / "CT"), rt_struct_path=str(case / "RTSTRUCT" / "RS.dcm"))
    names = rt.get_roi_names()
    seg = None
    for value, name in enumerate(names, start=1):
        mask = np.moveaxis(rt.get_roi_mask_by_name(name), 2, 0)
        seg = np.zeros(mask.shape, np.uint8) if seg is None else seg
        seg[mask] = value
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(case / "CT")))
    image = reader.Execute()
    label = sitk.GetImageFromArray(seg)
    label.CopyInformation(image)
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(out / "bench_0000.nii.gz"), useCompression=True)
    sitk.WriteImage(label, str(out / "bench.nii.gz"), useCompression=True)
    return names


def run_export(kind: str, pred: Path, ct: Path, out: Path, dataset_json: Path) -> None:
    _quiet_main(["export", kind, str(pred), "--dicom", str(ct), "--dataset-json", str(dataset_json), "--out", str(out),
                 "--overwrite"])


def install_rt_utils(target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                    "--target", str(target), RT_UTILS], check=True)
    sys.path.insert(0, str(target))


def agreement(converted: Path, names: list[str], rt_out: Path) -> float:
    """Smallest Dice over the ROIs between the converter's and rt-utils' label maps."""
    import json

    labels = json.loads((converted / "dataset.json").read_text())["labels"]
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(converted / "labelsTr" / "bench.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(rt_out / "bench.nii.gz")))
    dice = []
    for value, name in enumerate(names, start=1):
        a, b = ours == labels[name], theirs == value
        dice.append(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0))
    return min(dice)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="unused: everything runs on the CPU")
    parser.add_argument("--quick", action="store_true", help="24 slices of 256 x 256, 8 ROIs, 1 repeat")
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="rows = columns")
    parser.add_argument("--rois", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    slices = args.slices or (24 if args.quick else 100)
    size = args.size or (256 if args.quick else 512)
    n_rois = args.rois or (8 if args.quick else 20)
    repeats = args.repeats or (1 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="organmtl-bench-export-") as tmp:
        work = Path(tmp)
        install_rt_utils(work / "rt_utils")
        names = write_case(work / "src" / "bench", slices, size, n_rois, args.seed)
        case = work / "src" / "bench"
        converted = run_convert(work / "src", work / "conv")          # warm-up (imports, first calls)
        run_rt_utils(case, work / "rtu")
        min_dice = agreement(converted, names, work / "rtu")
        t_conv, t_rtu = best_times([lambda: run_convert(work / "src", work / "conv"),
                                    lambda: run_rt_utils(case, work / "rtu")], repeats)
        pred = work / "pred.nii.gz"
        os.replace(converted / "labelsTr" / "bench.nii.gz", pred)
        djson = work / "dataset.json"
        os.replace(converted / "dataset.json", djson)
        for kind in ("rtstruct", "seg"):                               # warm-up
            run_export(kind, pred, case / "CT", work / f"{kind}.dcm", djson)
        t_rs, t_seg = best_times([lambda: run_export("rtstruct", pred, case / "CT", work / "rtstruct.dcm", djson),
                                  lambda: run_export("seg", pred, case / "CT", work / "seg.dcm", djson)], repeats)
        sizes = {k: (work / f"{k}.dcm").stat().st_size / 2 ** 20 for k in ("rtstruct", "seg")}

    title = (f"### DICOM-RT: {slices} slices of {size} x {size}, {n_rois} ROIs, best of {repeats} "
             f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} usable cores)")
    ratio = t_conv / t_rtu
    print(title)
    print()
    print("| step | seconds | ratio to rt-utils |")
    print("| --- | ---: | ---: |")
    print(f"| organmtl convert dicom-rt (CT + RTSTRUCT -> .nii.gz) | {t_conv:.2f} | {ratio:.2f}"
          f"{'' if ratio <= TARGET_RATIO else f' (goal <= {TARGET_RATIO})'} |")
    print(f"| rt-utils masks + SimpleITK CT read, .nii.gz writes | {t_rtu:.2f} | 1.00 |")
    print(f"| organmtl export rtstruct ({sizes['rtstruct']:.1f} MiB) | {t_rs:.2f} | {t_rs / t_rtu:.2f} |")
    print(f"| organmtl export seg ({sizes['seg']:.1f} MiB) | {t_seg:.2f} | {t_seg / t_rtu:.2f} |")
    print()
    print(f"Smallest per-ROI Dice between the two converters' label maps: {min_dice:.4f}.")
    return {"slices": slices, "size": size, "rois": n_rois, "repeats": repeats, "convert_s": t_conv,
            "rt_utils_s": t_rtu, "ratio": ratio, "export_rtstruct_s": t_rs, "export_seg_s": t_seg,
            "rtstruct_mib": sizes["rtstruct"], "seg_mib": sizes["seg"], "min_dice_vs_rt_utils": min_dice}


if __name__ == "__main__":
    main()
