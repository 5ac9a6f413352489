"""Generic folder of volumes + label maps (NIfTI / NRRD / MHA) -> nnU-Net v2 raw dataset.

Layout read::

    SRC/images/<case>_0000.nii.gz [<case>_0001.nii.gz ...]   (or <case>.nii.gz for one channel;
                                                              see split_channel for amos_0001.nii.gz)
    SRC/labels/<case>.nii.gz                                  (integer label map)
    SRC/mapping.json  {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 6, ...}}
    SRC/landmarks/<case>.fcsv | <case>.txt                    (optional)

Landmarks, where given, are Slicer ``.fcsv`` files or text files of three voxel coordinates
(x y z) per line, named in order by the mapping's optional ``landmark_names``; they are written to
``landmarks/<case>.json`` (see :mod:`organmtl.converters.landmarks`).

``labels`` maps each structure name to its value in the source label maps; nnU-Net labels are
renumbered consecutively in the order of the source values (background must be 0). A label map
holding a value the mapping does not name is an error.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from organmtl.converters.common import (ConversionError, check_geometry, copy_geometry, find_files,
                                        read_image, strip_image_suffix, unique_ids, write_image, write_json)
from organmtl.converters.landmarks import landmarks_record, read_fcsv, read_voxel_txt

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mapping", type=Path, help="mapping file (default: SRC/mapping.json)")


def read_mapping(path: Path) -> dict:
    try:
        mapping = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: mapping file not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    for key in ("channel_names", "labels"):
        if key not in mapping:
            raise ConversionError(f"{path}: missing key {key!r}")
    values = list(mapping["labels"].values())
    if mapping["labels"].get("background") != 0:
        raise ConversionError(f"{path}: labels must map 'background' to 0")
    if len(set(values)) != len(values):
        raise ConversionError(f"{path}: two structures share a source value")
    return mapping


def split_channel(stem: str, n_channels: int, stems: set[str], label_ids: set[str]) -> tuple[str, int]:
    """``(case id, channel)`` of an image file name without suffix.

    ``<case>_NNNN`` names channel NNNN, except in a one-channel dataset, where the whole name is
    the case id (``amos_0001`` of AMOS) when a label map carries that whole name and none carries
    ``<case>``, or when NNNN is not 0000 and there is no ``<case>_0000`` sibling.
    """
    m = _CHANNEL.match(stem)
    if not m:
        return stem, 0
    case, ch = m["case"], int(m["channel"])
    if n_channels == 1:
        if stem in label_ids and case not in label_ids:
            return stem, 0
        if ch != 0 and f"{case}_0000" not in stems:
            return stem, 0
    return case, ch


def group_channels(images: list[Path], n_channels: int, folder: Path,
                   label_ids: set[str] = frozenset()) -> dict[str, list[Path]]:
    cases: dict[str, dict[int, Path]] = {}
    stems = {strip_image_suffix(p.name) for p in images}
    for p in images:
        case, ch = split_channel(strip_image_suffix(p.name), n_channels, stems, label_ids)
        if ch in cases.setdefault(case, {}):
            raise ConversionError(f"{p}: duplicate case id {case!r} channel {ch}")
        cases[case][ch] = p
    out = {}
    for case, chans in sorted(cases.items()):
        if sorted(chans) != list(range(n_channels)):
            raise ConversionError(f"{folder}: case {case!r} has channels {sorted(chans)}, "
                                  f"expected 0..{n_channels - 1}")
        out[case] = [chans[c] for c in range(n_channels)]
    return out


def landmark_file(folder: Path, case: str) -> Path | None:
    """The case's landmark file in ``SRC/landmarks`` (``.fcsv`` or ``.txt``), if any."""
    found = [folder / f"{case}{ext}" for ext in (".fcsv", ".txt") if (folder / f"{case}{ext}").is_file()]
    if len(found) > 1:
        raise ConversionError(f"{found[0]}: case {case!r} has both a .fcsv and a .txt landmark file")
    return found[0] if found else None


def _read_landmarks(path: Path, image: sitk.Image, names) -> list:
    return read_fcsv(path) if path.suffix == ".fcsv" else read_voxel_txt(path, image, names)


def _convert_case(task):
    case, image_paths, label_path, out, remap, file_ending, lm_path, lm_names = task
    images = [read_image(p) for p in image_paths]
    for p, img in zip(image_paths[1:], images[1:]):
        check_geometry(images[0], img, p, image_paths[0])
    lab_img = read_image(label_path)
    check_geometry(images[0], lab_img, label_path, image_paths[0])
    lab = sitk.GetArrayFromImage(lab_img)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.mod(lab, 1) == 0):
            raise ConversionError(f"{label_path}: label map holds non-integer values")
        lab = lab.astype(np.int64)
    present = np.unique(lab)
    unknown = [int(v) for v in present if int(v) not in remap]
    if unknown:
        raise ConversionError(f"{label_path}: value(s) {unknown[:5]} not named in the mapping")
    lut = np.zeros(int(max(max(remap), present.max())) + 1, np.uint8)
    for src_value, dst in remap.items():
        lut[src_value] = dst
    for c, img in enumerate(images):
        write_image(img, out / "imagesTr" / f"{case}_{c:04d}{file_ending}")
    write_image(copy_geometry(lut[lab], images[0]), out / "labelsTr" / f"{case}{file_ending}")
    record = {"case": case, "action": "kept", "labels_present": [int(lut[v]) for v in present]}
    if lm_path is not None:
        lm = landmarks_record(case, _read_landmarks(lm_path, images[0], lm_names), images[0])
        write_json(out / "landmarks" / f"{case}.json", lm)
        record["landmarks_dropped"] = lm["dropped"]
    return record


def convert(src: Path, out: Path, args, run_cases) -> dict:
    mapping = read_mapping(args.mapping or src / "mapping.json")
    n_channels = len(mapping["channel_names"])
    label_files = {strip_image_suffix(p.name): p for p in find_files(src / "labels", "labels")}
    image_cases = group_channels(find_files(src / "images", "images"), n_channels, src / "images",
                                 set(label_files))
    unique_ids((strip_image_suffix(p.name), p) for p in find_files(src / "labels", "labels"))
    for case in image_cases:
        if case not in label_files:
            raise ConversionError(f"{src / 'labels'}: no label map for case {case!r}")
    for case, p in label_files.items():
        if case not in image_cases:
            raise ConversionError(f"{p}: label map without image")
    if not image_cases:
        raise ConversionError(f"{src / 'images'}: no images")
    ordered = sorted(mapping["labels"].items(), key=lambda kv: kv[1])
    remap = {int(v): i for i, (_, v) in enumerate(ordered)}
    labels = {name: i for i, (name, _) in enumerate(ordered)}
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    lm_dir = src / "landmarks"
    lm_names = mapping.get("landmark_names")
    if lm_dir.is_dir():
        for p in sorted(lm_dir.iterdir()):
            if p.suffix in (".fcsv", ".txt") and p.stem not in image_cases:
                raise ConversionError(f"{p}: landmark file without image")
    tasks = [(case, imgs, label_files[case], out, remap, args.file_ending, landmark_file(lm_dir, case), lm_names)
             for case, imgs in image_cases.items()]
    records = run_cases(_convert_case, tasks, desc="volumes", case=lambda t: t[0])
    extra = {"organmtl_label_remap": {name: {"source_value": int(v), "nnunet_label": labels[name]}
                                      for name, v in ordered}}
    if any(t[6] for t in tasks):
        extra["organmtl_landmarks"] = "landmarks"
    return {"labels": labels, "channel_names": mapping["channel_names"], "num_training": len(records),
            "cases": records, "dataset_json_extra": extra}
