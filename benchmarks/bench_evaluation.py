"""Benchmark: ``organmtl evaluate`` (organmtl.evaluation.volumes) against nnU-Net's own
``compute_metrics_on_folder`` on the same prediction folder, in seconds per case.

Not a test (not collected by pytest, not run in CI). Run::

    .venv/bin/python benchmarks/bench_evaluation.py --quick      # 4 cases of 32 x 64 x 64
    .venv/bin/python benchmarks/bench_evaluation.py              # 8 cases of 64 x 128 x 128

Synthetic label volumes (3 structures of different sizes, anisotropic 0.8 x 0.8 x 2.5 mm, the
predictions perturbed by shifts and a dropped structure) are written as ``.nii.gz`` with a
dataset.json. Both sides run in this process after one untimed warm-up on one case (imports
excluded), ``--repeats`` times alternating, fastest kept:

- **baseline**: nnU-Net's ``compute_metrics`` (Dice, IoU, TP/FP/FN/TN per label) called per case
  in this process; also ``compute_metrics_on_folder`` with one process, whose spawned worker pool
  adds its start-up (interpreter + nnU-Net imports) to every call;
- **organmtl**: ``organmtl.evaluation.volumes.evaluate_volume_folders`` (the same counts plus HD,
  HD95 in both variants, ASD, surface Dice, volumes; MONAI border distances) and the writing of
  per_case.csv / organmtl_summary.json / summary.md.

The evaluation runs on the CPU; ``--device cuda`` is accepted for the suite and changes nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPACING_XYZ = (0.8, 0.8, 2.5)


def write_cases(root: Path, n: int, shape, seed: int = 0) -> tuple[Path, Path, Path]:
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.arange(z) * 2.5, np.arange(y) * 0.8, np.arange(x) * 0.8, indexing="ij")
    for i in range(n):
        g = np.zeros(shape, np.uint8)
        p = np.zeros(shape, np.uint8)
        for label, radius in ((1, 0.3), (2, 0.15), (3, 0.06)):
            c = rng.uniform(0.3, 0.7, 3) * np.array([z * 2.5, y * 0.8, x * 0.8])
            r = radius * y * 0.8
            g[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r] = label
            if not (label == 3 and i % 3 == 0):   # the smallest structure is missed in every third case
                d = c + rng.normal(0, 1.5, 3)
                p[(zz - d[0]) ** 2 + (yy - d[1]) ** 2 + (xx - d[2]) ** 2 <= (r * rng.uniform(0.85, 1.15)) ** 2] = label
        for arr, folder in ((g, gt_dir), (p, pred_dir)):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(img, str(folder / f"case{i:03d}.nii.gz"))
    ds = root / "dataset.json"
    ds.write_text(json.dumps({"labels": {"background": 0, "large": 1, "medium": 2, "small": 3},
                              "channel_names": {"0": "CT"}, "file_ending": ".nii.gz", "numTraining": n,
                              "organmtl_small_organs": ["small"]}))
    return gt_dir, pred_dir, ds


def _nnunet(gt: Path, pred: Path, out: Path) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return compute_metrics_on_folder(str(gt), str(pred), str(out / "nnunet_summary.json"), SimpleITKIO(),
                                     ".nii.gz", [1, 2, 3], None, 1)


def _nnunet_in_process(gt: Path, pred: Path) -> list:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rw = SimpleITKIO()
    return [compute_metrics(str(f), str(pred / f.name), rw, [1, 2, 3]) for f in sorted(gt.glob("*.nii.gz"))]


def _organmtl(gt: Path, pred: Path, ds: Path, out: Path) -> dict:
    from organmtl.evaluation.results import write_outputs
    from organmtl.evaluation.volumes import evaluate_volume_folders

    rows, summary = evaluate_volume_folders(pred, gt, ds)
    write_outputs(rows, summary, out)
    return summary


def _machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import describe_machine

    return describe_machine()


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="accepted; evaluation runs on CPU")
    parser.add_argument("--quick", action="store_true", help="4 small cases, 1 repeat")
    parser.add_argument("--cases", type=int, default=None, help="number of cases (default 8, --quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, fastest kept (default 3, --quick 1)")
    return parser.parse_args(argv)


def _warm_up(tmp: Path, ds: Path) -> None:
    """One untimed run of every side on one case (imports, worker pool, MONAI kernels)."""
    warm = tmp / "warm"
    for d in ("gt", "pred"):
        (warm / d).mkdir(parents=True)
        (warm / d / "case000.nii.gz").write_bytes((tmp / "data" / d / "case000.nii.gz").read_bytes())
    with contextlib.redirect_stdout(io.StringIO()):
        _nnunet(warm / "gt", warm / "pred", warm)
        _nnunet_in_process(warm / "gt", warm / "pred")
        _organmtl(warm / "gt", warm / "pred", ds, warm)


def _time_sides(tmp: Path, gt: Path, pred: Path, ds: Path, repeats: int) -> tuple[dict, dict, dict]:
    """Fastest of ``repeats`` alternating runs per side; returns (seconds, nnU-Net result, organmtl summary)."""
    sides = {"nnunet": lambda: _nnunet(gt, pred, tmp), "nnunet_loop": lambda: _nnunet_in_process(gt, pred),
             "organmtl": lambda: _organmtl(gt, pred, ds, tmp / "ours")}
    best = dict.fromkeys(sides, float("inf"))
    out = {}
    for _ in range(repeats):
        for name, run in sides.items():
            with contextlib.redirect_stdout(io.StringIO()):
                t0 = time.perf_counter()
                out[name] = run()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best, out["nnunet"], out["organmtl"]


def _print_tables(result: dict, best: dict) -> None:
    n, shape = result["cases"], result["shape_zyx"]
    print(f"## bench_evaluation: {n} cases of {shape[0]} x {shape[1]} x {shape[2]} voxels, 3 structures, "
          f"best of {result['repeats']}\n")
    base = best["nnunet_loop"]
    print("| evaluation | s/case | ratio to nnU-Net compute_metrics |")
    print("|---|---|---|")
    print(f"| nnU-Net compute_metrics per case, in-process (Dice, IoU, counts): baseline | "
          f"{result['nnunet_in_process_s_per_case']:.3f} | 1.00 |")
    print(f"| nnU-Net compute_metrics_on_folder, 1 process (spawned pool: start-up included) | "
          f"{result['nnunet_folder_s_per_case']:.3f} | {best['nnunet'] / base:.2f} |")
    print(f"| organmtl evaluate (+ HD, HD95 x2, ASD, surface Dice, CSV/JSON/MD) | {result['organmtl_s_per_case']:.3f} "
          f"| {result['ratio_to_nnunet_in_process']:.2f} |")
    print("\n| structure | mean Dice organmtl | mean Dice nnU-Net |")
    print("|---|---|---|")
    for k, ours in result["mean_dice_organmtl"].items():
        print(f"| {k} | {ours:.4f} | {result['mean_dice_nnunet'][k]:.4f} |")
    print("\n(nnU-Net's mean leaves out cases where a label is absent from both masks (nan); organmtl counts "
          "them as Dice 1; the synthetic cases always contain every reference structure, so the means agree.)")
    print(f"\nMachine: {result['machine']}")


def main(argv=None) -> dict:
    args = _parse(argv)
    n = args.cases or (4 if args.quick else 8)
    shape = (16, 64, 64) if args.quick else (32, 128, 128)
    repeats = args.repeats or (1 if args.quick else 3)
    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gt, pred, ds = write_cases(tmp / "data", n, shape)
        _warm_up(tmp, ds)
        best, ref, ours = _time_sides(tmp, gt, pred, ds, repeats)
    per = ours["segmentation"]["per_structure"]
    dice_nn = {int(k): v["Dice"] for k, v in ref["mean"].items()}
    result = {
        "cases": n, "shape_zyx": list(shape), "repeats": repeats, "device": "cpu",
        "nnunet_folder_s_per_case": best["nnunet"] / n, "nnunet_in_process_s_per_case": best["nnunet_loop"] / n,
        "organmtl_s_per_case": best["organmtl"] / n,
        "ratio_to_nnunet_in_process": best["organmtl"] / best["nnunet_loop"],
        "ratio_to_nnunet_folder": best["organmtl"] / best["nnunet"],
        "mean_dice_organmtl": {k: per[k]["dice"]["mean"] for k in per},
        "mean_dice_nnunet": {name: dice_nn[i] for i, name in enumerate(per, start=1)},
        "machine": _machine(),
    }
    _print_tables(result, best)
    return result


if __name__ == "__main__":
    main()
