"""Benchmark: ``organmtl convert pddca`` against a bare read-and-write baseline.

Not a test (not collected by pytest, not run in CI). Run::

    .venv/bin/python benchmarks/convert_pddca.py                 # 5, 10, 20 cases; -j 1 and -j 2
    .venv/bin/python benchmarks/convert_pddca.py --cases 5 10 --jobs 1 --repeats 3 --profile

For each case count N the PDDCA demo phantom set is generated (every structure file present, so
both sides handle the same files), then both sides run ``--repeats`` times, alternating, and the
fastest run of each is kept:

- **convert**: ``organmtl convert pddca SRC --dataset-id 1 --out OUT -j J --overwrite``, run
  in-process through the CLI entry point ``organmtl.cli.main`` (argument parsing, atomic output
  folder, checks, landmarks, dataset.json and report included; the interpreter start-up and
  imports are not: one untimed warm-up conversion loads them first);
- **baseline**: the same files read and written with SimpleITK and nothing else: ``img.nrrd`` and
  every ``structures/*.nrrd`` read, the structures painted into one uint8 label map, the image and
  the label map written as compressed ``.nii.gz``; ``-j J`` uses a pool of J processes like the
  converter.

It prints wall times, the ratio convert / baseline (target <= 1.3) and the time per case (linear
scaling keeps it flat from 5 to 20 cases), then a least-squares fit ``t = fixed + per_case * N``
per worker count, whose per-case ratio is free of the fixed costs of one run (argument parsing
with plugin discovery, dataset.json, report, moving the output folder), which weigh most at 5
tiny cases. ``--profile`` adds a cProfile of one -j 1 conversion.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from timing import best_times

TARGET_RATIO = 1.3


def baseline_case(args) -> None:
    """Read one PDDCA case's image and structures, write the image and one label map (.nii.gz)."""
    case_dir, out = args
    image = sitk.ReadImage(str(case_dir / "img.nrrd"))
    seg = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    for value, path in enumerate(sorted((case_dir / "structures").glob("*.nrrd")), start=1):
        seg[sitk.GetArrayViewFromImage(sitk.ReadImage(str(path))) > 0] = value
    label = sitk.GetImageFromArray(seg)
    label.CopyInformation(image)
    sitk.WriteImage(image, str(out / "imagesTr" / f"{case_dir.name}_0000.nii.gz"), useCompression=True)
    sitk.WriteImage(label, str(out / "labelsTr" / f"{case_dir.name}.nii.gz"), useCompression=True)


def run_baseline(src: Path, out: Path, jobs: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    tasks = [(c, out) for c in sorted(src.iterdir()) if (c / "img.nrrd").is_file()]
    if jobs <= 1:
        for t in tasks:
            baseline_case(t)
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(baseline_case, tasks))


def run_convert(src: Path, out: Path, jobs: int) -> None:
    from organmtl.cli import main

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["convert", "pddca", str(src), "--dataset-id", "1", "--name", "Bench", "--out", str(out),
                   "-j", str(jobs), "--overwrite"])
    if rc != 0:
        raise SystemExit(f"organmtl convert pddca failed with exit code {rc}")


def profile_convert(src: Path, out: Path, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run_convert(src, out, 1)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def print_linear_fit(rows) -> None:
    """Least-squares ``t = fixed + per_case * n`` per worker count (needs two case counts or more)."""
    for jobs in sorted({r[1] for r in rows}):
        sel = [r for r in rows if r[1] == jobs]
        if len({r[0] for r in sel}) < 2:
            continue
        n = np.array([r[0] for r in sel], float)
        (c_slope, c_fixed), (b_slope, b_fixed) = (np.polyfit(n, [r[k] for r in sel], 1) for k in (2, 3))
        print(f"fit -j {jobs}: convert {c_fixed:+.3f} s + {c_slope:.4f} s/case, baseline {b_fixed:+.3f} s + "
              f"{b_slope:.4f} s/case, per-case ratio {c_slope / b_slope:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[5, 10, 20], help="case counts (default 5 10 20)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement, fastest kept (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one -j 1 conversion")
    args = parser.parse_args(argv)

    from organmtl.demo_data import han

    work = Path(tempfile.mkdtemp(prefix="organmtl-bench-", dir=args.workdir))
    rows = []
    try:
        warm = work / "warm"
        han.write_han(warm, 1, args.seed, with_missing=False)
        run_convert(warm, work / "warm_out", 1)                     # imports and first-call costs
        for n in args.cases:
            src = work / f"src{n}"
            han.write_han(src, n, args.seed, with_missing=False)
            for jobs in args.jobs:
                t_conv, t_base = best_times([lambda: run_convert(src, work / "conv", jobs),
                                             lambda: run_baseline(src, work / "base", jobs)], args.repeats)
                rows.append((n, jobs, t_conv, t_base))
        print(f"PDDCA demo phantoms {'x'.join(map(str, han.SHAPE_ZYX))} voxels, {len(han.STRUCTURES)} "
              f"structures + landmarks per case; "
              f"in-process convert vs read/write baseline; best of {args.repeats}; "
              f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}, SimpleITK {sitk.Version_VersionString()}")
        print(f"{'cases':>5} {'-j':>3} {'convert s':>10} {'baseline s':>11} {'ratio':>6} "
              f"{'convert s/case':>15} {'baseline s/case':>16}")
        for n, jobs, t_conv, t_base in rows:
            flag = "" if t_conv / t_base <= TARGET_RATIO else f"  > {TARGET_RATIO}"
            print(f"{n:>5} {jobs:>3} {t_conv:>10.3f} {t_base:>11.3f} {t_conv / t_base:>6.2f} "
                  f"{t_conv / n:>15.4f} {t_base / n:>16.4f}{flag}")
        print_linear_fit(rows)
        if args.profile:
            print(profile_convert(work / f"src{args.cases[-1]}", work / "prof", 30))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
