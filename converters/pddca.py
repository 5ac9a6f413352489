"""PDDCA 1.4.1 / MICCAI 2015 head-and-neck challenge (NRRD) -> nnU-Net v2 raw dataset.

Layout read: ``SRC/<case>/img.nrrd``, ``SRC/<case>/structures/<Name>.nrrd`` and any ``.fcsv``
below the case folder (landmarks). PDDCA ships as several part folders
(``PDDCA-1.4.1_part1/<case>/...``, ``_part2``, ``_part3``): ``SRC`` may be one part or the folder
holding the parts (case folders one level further down). Structure files are matched to the
label names case-insensitively (``brainstem.nrrd`` is ``BrainStem``). Label table:
:data:`LABELS`. Cases lacking a structure file are handled by ``--missing``:

- ``drop`` (default): the case is left out;
- ``ignore``: voxels not annotated as another structure get nnU-Net's ignore label, so the case
  still teaches the structures it has and never teaches "background" where the missing organ is;
- ``background``: the missing organ is silently absent (explicit opt-in, still reported).

Each decision is listed in ``conversion_report.json`` and printed.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from organmtl.converters.common import ConversionError, read_binary_mask, read_image
from organmtl.converters.landmarks import read_fcsv, write_case

LABELS = {"background": 0, "BrainStem": 1, "Chiasm": 2, "Mandible": 3, "OpticNerve_L": 4,
          "OpticNerve_R": 5, "Parotid_L": 6, "Parotid_R": 7, "Submandibular_L": 8, "Submandibular_R": 9}
#: structures ``--structures`` also accepts (not in PDDCA; the real-anatomy demo data has them:
#: ``organmtl demo-data --han-source atlas``, docs/han_atlas.md)
EXTRA_STRUCTURES = ("Lens_L", "Lens_R", "Cochlea_L", "Cochlea_R")
SMALL_ORGANS = ["Chiasm", "OpticNerve_L", "OpticNerve_R", *EXTRA_STRUCTURES]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--missing", choices=("drop", "ignore", "background"), default="drop",
                        help="what to do with cases lacking a structure file (default: drop)")
    parser.add_argument("--structures", nargs="+", metavar="NAME",
                        help=f"subset of structures to keep (default: all of {', '.join(list(LABELS)[1:])}; "
                        f"also {', '.join(EXTRA_STRUCTURES)})")


def _is_case(folder: Path) -> bool:
    return folder.is_dir() and (folder / "img.nrrd").is_file()


def discover(src: Path) -> list[Path]:
    """The case folders (holding ``img.nrrd``) of ``src`` and of its part folders, sorted by case id;
    a case id found in two parts is an error naming both."""
    if not src.is_dir():
        raise ConversionError(f"{src}: source folder not found")
    found: dict[str, Path] = {}
    for sub in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for case in [sub] if _is_case(sub) else sorted(p for p in sub.iterdir() if _is_case(p)):
            if case.name in found:
                raise ConversionError(f"{case}: case id {case.name!r} also in {found[case.name].parent}")
            found[case.name] = case
    if not found:
        raise ConversionError(f"{src}: no case folder with an img.nrrd inside (nor in a part folder)")
    return [found[k] for k in sorted(found)]


def structure_files(case_dir: Path) -> dict[str, Path]:
    """``{lower-case structure name: file}`` of ``case_dir/structures/*.nrrd``; two files whose
    names differ only in case are an error."""
    folder = case_dir / "structures"
    files: dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.name.lower().endswith(".nrrd") and not p.name.startswith("."):
                key = p.name[: -len(".nrrd")].lower()
                if key in files:
                    raise ConversionError(f"{p}: same structure as {files[key].name} (names differ only in case)")
                files[key] = p
    return files


def _convert_case(task):
    case_dir, out, labels, missing_policy, file_ending = task
    case = case_dir.name
    img_path = case_dir / "img.nrrd"
    image = read_image(img_path)
    names = [n for n in labels if n != "background" and n != "ignore"]
    seg = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    present, missing, overlaps = [], [], {}
    files = structure_files(case_dir)
    for name in names:
        path = files.get(name.lower())
        if path is None:
            missing.append(name)
            continue
        mask = read_binary_mask(path, image, img_path)
        clash = mask & (seg > 0)
        if clash.any():
            overlaps[name] = int(clash.sum())
        seg[mask] = labels[name]   # later (smaller, listed later) structures win overlaps
        present.append(name)
    record = {"case": case, "present": present, "missing": missing, "overlap_voxels": overlaps,
              "action": "kept"}
    if missing and missing_policy == "drop":
        record["action"] = "dropped"
        return record
    if missing and missing_policy == "ignore":
        seg[seg == 0] = labels["ignore"]
        record["action"] = "kept, unannotated voxels set to the ignore label"
    elif missing:
        record["action"] = "kept, missing structures counted as background"
    points = [p for f in sorted(case_dir.rglob("*.fcsv")) for p in read_fcsv(f)]
    return write_case(out, case, image, seg, points, file_ending, record)


def convert(src: Path, out: Path, args, run_cases) -> dict:
    """Write the nnU-Net raw dataset into ``out`` (a temporary folder the caller moves into place)."""
    labels = dict(LABELS)
    if args.structures:
        unknown = [s for s in args.structures if s not in LABELS and s not in EXTRA_STRUCTURES]
        if unknown:
            raise ConversionError(f"--structures: unknown structure {unknown[0]!r}")
        labels = {"background": 0, **{n: i for i, n in enumerate(args.structures, start=1)}}
    if args.missing == "ignore":
        labels["ignore"] = max(labels.values()) + 1
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    tasks = [(c, out, labels, args.missing, args.file_ending) for c in discover(src)]
    records = run_cases(_convert_case, tasks, desc="pddca", case=lambda t: t[0].name)
    kept = [r for r in records if r["action"] != "dropped"]
    if not kept:
        raise ConversionError(f"{src}: every case lacks a structure; try --missing ignore")
    small = [s for s in SMALL_ORGANS if s in labels]
    return {"labels": labels, "channel_names": {"0": "CT"}, "num_training": len(kept),
            "cases": records, "dataset_json_extra": {"organmtl_small_organs": small,
                                                    "organmtl_landmarks": "landmarks"}}
