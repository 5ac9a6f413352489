"""VISCERAL Anatomy3 (RadLex-named structure masks) -> nnU-Net v2 raw dataset.

Layout read::

    SRC/Volumes/<id>_<n>_<modality>_<region>.nii.gz
    SRC/Segmentations/<id>_<n>_<modality>_<region>_<RadLexID>_<k>.nii.gz   (one binary mask per structure)
    SRC/Landmarks/<id>_<n>_<modality>_<region>_landmarks_<k>.fcsv          (optional, Slicer markups)

``<k>`` is the annotator id. A structure (or the landmarks) of one volume annotated by several
annotators takes one annotation: ``--annotator K``'s where it exists, else the lowest annotator
id (:func:`choose_annotation`); the others are listed in the case record. Other ``.fcsv`` files
of ``Landmarks/`` (``_lesions_<k>.fcsv``, ...) are not landmarks and are skipped.

The case id is ``<id>_<n>``. One dataset holds one modality (``CT``, ``CTce``, ``MRT1``,
``MRT1cefs``...): ``--modality`` picks it, and a source holding several is refused without it.
Structure masks are named by RadLex id and mapped with :data:`RADLEX` (the 20 Anatomy3
structures); a mask with an id outside that table is reported and skipped. Labels are the
structures found in the source (or ``--structures``), numbered in the table's order; cases lacking
one of them follow ``--missing`` (as PDDCA, :func:`organmtl.converters.common.apply_missing_policy`).
Landmarks outside the image or duplicated are reported and dropped (real VISCERAL landmark files
hold some).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from organmtl.converters.command import SourceConverter
from organmtl.converters.common import (ConversionError, add_missing_argument, apply_missing_policy,
                                        check_nifti_complete, find_files, paint_structures,
                                        read_binary_mask, read_image, strip_image_suffix, structure_labels,
                                        unique_ids)
from organmtl.converters.landmarks import read_fcsv, write_case

# The 20 Anatomy3 structures by RadLex id, in ascending id order (= label order; a structure listed
# later wins overlaps, so the gallbladder is painted over the liver and the adrenals over the kidneys).
RADLEX = {
    "58": "liver", "86": "spleen", "170": "pancreas", "187": "gallbladder", "237": "urinary_bladder",
    "480": "aorta", "1247": "trachea", "1302": "lung_right", "1326": "lung_left", "2473": "sternum",
    "7578": "thyroid_gland", "29193": "lumbar_vertebra_1", "29662": "kidney_right", "29663": "kidney_left",
    "30324": "adrenal_gland_right", "30325": "adrenal_gland_left", "32248": "psoas_major_right",
    "32249": "psoas_major_left", "40357": "rectus_abdominis_right", "40358": "rectus_abdominis_left",
}
NAME_TO_RADLEX = {name: rid for rid, name in RADLEX.items()}

_STEM = r"(?P<stem>(?P<id>\d+)_(?P<n>\d+)_(?P<modality>[A-Za-z0-9]+)_(?P<region>[A-Za-z0-9]+))"
VOLUME_RE = re.compile(rf"^{_STEM}$")
SEGMENTATION_RE = re.compile(rf"^{_STEM}_(?P<rid>\d+)_(?P<k>\d+)$")
LANDMARKS_RE = re.compile(rf"^{_STEM}_landmarks_(?P<k>\d+)\.fcsv$")


@dataclass
class Volume:
    """One ``Volumes/`` file and what belongs to it."""

    case: str
    modality: str
    path: Path
    masks: dict[str, dict[int, Path]] = field(default_factory=dict)   # RadLex id -> {annotator: mask}
    unknown: list[Path] = field(default_factory=list)          # masks with an id outside RADLEX
    landmarks: dict[int, Path] = field(default_factory=dict)   # annotator -> landmark file
    other_fcsv: list[Path] = field(default_factory=list)       # .fcsv files that are not landmarks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", default=None,
                        help="modality to convert, as in the file names: CT, CTce, MRT1, MRT1cefs... "
                             "(default: the only one present)")
    parser.add_argument("--structures", nargs="+", metavar="NAME",
                        help=f"subset of structures to keep, in label order (default: those found; "
                             f"names: {', '.join(RADLEX.values())})")
    parser.add_argument("--annotator", type=int, default=None, metavar="K",
                        help="take annotator K's mask (and landmarks) where a structure has several "
                             "(default: the lowest annotator id)")
    add_missing_argument(parser)


def choose_annotation(by_annotator: dict[int, Path], preferred: int | None) -> tuple[int, list[int]]:
    """``(chosen annotator, the others)``: ``preferred`` when it annotated, else the lowest id."""
    chosen = preferred if preferred in by_annotator else min(by_annotator)
    return chosen, sorted(k for k in by_annotator if k != chosen)


def channel_name(modality: str) -> str:
    """nnU-Net channel name: ``CT`` for every CT flavour (CT normalisation), the modality otherwise."""
    return "CT" if modality.upper().startswith("CT") else modality


def _match(regex: re.Pattern, path: Path, name: str, expected: str) -> re.Match:
    m = regex.match(name)
    if m is None:
        raise ConversionError(f"{path}: file name is not {expected}")
    return m


def read_volumes(src: Path) -> dict[str, Volume]:
    """``Volumes/`` by file stem; every image file there must follow the Anatomy3 naming."""
    if not src.is_dir():
        raise ConversionError(f"{src}: source folder not found")
    volumes = {}
    for p in find_files(src / "Volumes", "Volumes"):
        m = _match(VOLUME_RE, p, strip_image_suffix(p.name), "<id>_<n>_<modality>_<region>")
        volumes[m["stem"]] = Volume(f"{m['id']}_{m['n']}", m["modality"], p)
    if not volumes:
        raise ConversionError(f"{src / 'Volumes'}: no volumes")
    return volumes


def choose_modality(volumes: dict[str, Volume], wanted: str | None, folder: Path) -> str:
    """The one modality of the dataset: ``wanted``, or the only one present (mixing is refused)."""
    found = sorted({v.modality for v in volumes.values()})
    if wanted is not None:
        if wanted not in found:
            raise ConversionError(f"{folder}: no volume of modality {wanted!r} (found: {', '.join(found)})")
        return wanted
    if len(found) > 1:
        raise ConversionError(f"{folder}: volumes of several modalities ({', '.join(found)}); "
                              f"choose one with --modality")
    return found[0]


def attach_masks(volumes: dict[str, Volume], folder: Path) -> None:
    """Attach each ``Segmentations/`` mask to its volume; one mask per structure and volume."""
    for p in find_files(folder, "Segmentations"):
        m = _match(SEGMENTATION_RE, p, strip_image_suffix(p.name),
                   "<id>_<n>_<modality>_<region>_<RadLexID>_<k>")
        vol = volumes.get(m["stem"])
        if vol is None:
            raise ConversionError(f"{p}: no volume {m['stem']} in Volumes/")
        rid, k = m["rid"], int(m["k"])
        if rid not in RADLEX:
            vol.unknown.append(p)
        elif k in vol.masks.get(rid, {}):
            raise ConversionError(f"{p}: a second mask of RadLex {rid} ({RADLEX[rid]}) by annotator {k} for "
                                  f"{m['stem']} (also {vol.masks[rid][k].name})")
        else:
            vol.masks.setdefault(rid, {})[k] = p


def attach_landmarks(volumes: dict[str, Volume], folder: Path) -> None:
    """Attach ``Landmarks/*_landmarks_<k>.fcsv`` files to their volumes (the folder is optional);
    other ``.fcsv`` files (lesion marks ``_lesions_<k>.fcsv``, ...) are kept aside, reported with
    their volume when their name starts with one, else printed."""
    if not folder.is_dir():
        return
    for p in sorted(folder.glob("*.fcsv")):
        m = LANDMARKS_RE.match(p.name)
        if m is None:
            owner = next((v for stem, v in volumes.items() if p.name.startswith(f"{stem}_")), None)
            if owner is None:
                print(f"  {p.name} skipped (not a landmark file)")
            else:
                owner.other_fcsv.append(p)
            continue
        if m["stem"] not in volumes:
            raise ConversionError(f"{p}: no volume {m['stem']} in Volumes/")
        volumes[m["stem"]].landmarks[int(m["k"])] = p


def choose_structures(volumes: list[Volume], wanted: list[str] | None, folder: Path) -> list[str]:
    """``--structures`` (checked against the table), else every table structure found, in table order."""
    if wanted:
        unknown = [s for s in wanted if s not in NAME_TO_RADLEX]
        if unknown:
            raise ConversionError(f"--structures: unknown structure {unknown[0]!r} "
                                  f"(Anatomy3 names: {', '.join(RADLEX.values())})")
        if len(set(wanted)) != len(wanted):
            raise ConversionError("--structures: a structure is named twice")
        return list(wanted)
    found = {rid for v in volumes for rid in v.masks}
    if not found:
        raise ConversionError(f"{folder}: no mask of an Anatomy3 structure for the selected volumes")
    return [name for rid, name in RADLEX.items() if rid in found]


def _read_mask(path: Path, image: sitk.Image, image_path: Path):
    check_nifti_complete(path)
    return read_binary_mask(path, image, image_path)


def _convert_case(task) -> dict:
    """One volume: its label map from the structure masks, the missing policy, its landmarks."""
    vol, out, labels, policy, file_ending, annotator = task
    check_nifti_complete(vol.path)
    image = read_image(vol.path)
    names = [n for n in labels if n not in ("background", "ignore")]
    present = [n for n in names if NAME_TO_RADLEX[n] in vol.masks]
    missing = [n for n in names if n not in present]
    chosen, others = {}, []
    for n in present:
        by_k = vol.masks[NAME_TO_RADLEX[n]]
        k, rest = choose_annotation(by_k, annotator)
        chosen[n] = by_k[k]
        others += [{"file": by_k[r].name, "reason": f"{n}: annotator {k} chosen"} for r in rest]
    landmark_files = []
    if vol.landmarks:
        k, rest = choose_annotation(vol.landmarks, annotator)
        landmark_files = [vol.landmarks[k]]
        others += [{"file": vol.landmarks[r].name, "reason": f"landmarks: annotator {k} chosen"} for r in rest]
    masks = ((n, _read_mask(chosen[n], image, vol.path)) for n in present)
    seg, overlaps = paint_structures(sitk.GetArrayViewFromImage(image).shape, masks, labels)
    record = {"case": vol.case, "volume": vol.path.name, "present": present, "missing": missing,
              "overlap_voxels": overlaps,
              "skipped": [{"file": p.name, "reason": "RadLex id not among the Anatomy3 structures"}
                          for p in vol.unknown]
              + [{"file": p.name, "reason": "not a landmark file"} for p in vol.other_fcsv],
              "other_annotations": others}
    record["action"] = apply_missing_policy(seg, missing, policy, labels)
    if record["action"] == "dropped":
        return record
    points = [p for f in landmark_files for p in read_fcsv(f)]
    return write_case(out, vol.case, image, seg, points, file_ending, record)


def convert(src: Path, out: Path, args, run_cases) -> dict:
    """Write the nnU-Net raw dataset into ``out`` (a temporary folder the caller moves into place)."""
    src = Path(src)
    volumes = read_volumes(src)
    attach_masks(volumes, src / "Segmentations")
    attach_landmarks(volumes, src / "Landmarks")
    modality = choose_modality(volumes, args.modality, src / "Volumes")
    selected = [v for _, v in sorted(volumes.items()) if v.modality == modality]
    unique_ids((v.case, v.path) for v in selected)
    names = choose_structures(selected, args.structures, src / "Segmentations")
    labels = structure_labels(names, args.missing)
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    tasks = [(v, out, labels, args.missing, args.file_ending, args.annotator)
             for v in sorted(selected, key=lambda v: v.case)]
    records = run_cases(_convert_case, tasks, desc="visceral", case=lambda t: t[0].case)
    for r in records:
        for s in r["skipped"]:
            print(f"  {r['case']}: {s['file']} skipped ({s['reason']})")
        for s in r["other_annotations"]:
            print(f"  {r['case']}: {s['file']} not used ({s['reason']})")
    kept = [r for r in records if r["action"] != "dropped"]
    if not kept:
        raise ConversionError(f"{src}: every case lacks a structure; try --missing ignore or --structures")
    extra = {"organmtl_visceral": {"modality": modality,
                                   "radlex": {n: NAME_TO_RADLEX[n] for n in names}}}
    if any(v.landmarks for v in selected):
        extra["organmtl_landmarks"] = "landmarks"
    return {"labels": labels, "channel_names": {"0": channel_name(modality)}, "num_training": len(kept),
            "cases": records, "dataset_json_extra": extra}


CONVERTER = SourceConverter("visceral", "VISCERAL Anatomy3 (Volumes/, RadLex-named Segmentations/, Landmarks/)",
                            add_arguments, convert)
