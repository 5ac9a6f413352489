"""CHAOS challenge (CT liver, MR abdomen; DICOM series + PNG masks) -> nnU-Net v2 raw dataset.

Layout read (the ``Train_Sets`` folder, or its ``CT``/``MR`` folder itself)::

    CT/<patient>/DICOM_anon/*.dcm                     CT/<patient>/Ground/*.png   (liver 255)
    MR/<patient>/T1DUAL/DICOM_anon/InPhase/*.dcm      MR/<patient>/T1DUAL/Ground/*.png
    MR/<patient>/T1DUAL/DICOM_anon/OutPhase/*.dcm
    MR/<patient>/T2SPIR/DICOM_anon/*.dcm              MR/<patient>/T2SPIR/Ground/*.png

One ``--modality`` (CT, T1DUAL or T2SPIR) per dataset; case id = patient folder name. The image
is the DICOM series sorted by position along the slice normal (ImagePositionPatient ·
(row cosines × column cosines)), read by SimpleITK, whose geometry is kept exactly.

Slice rule (the one of the organisers' evaluation code, which pairs both by natural file-name
order): PNG masks and DICOM files (of the InPhase series for T1DUAL) are each sorted by file name
(numbers compared as numbers); PNG ``i`` belongs to DICOM file ``i``, placed at that slice's
position in the volume. The DICOM file-name order must run monotonically along or against the
slice normal (cross-check against ImagePositionPatient); otherwise the patient fails with one
line naming the first file out of order. InstanceNumber plays no part. PNG rows are DICOM rows,
PNG columns DICOM columns.

Test sets (``--test``, e.g. CHAOS ``Test_Sets``) have no ``Ground`` folder: such patients are
written as images only (``imagesTs``); a training patient without ``Ground`` fails.

MR masks are intensity coded; values are decoded by the ranges of :data:`MR_RANGES`; CT masks
hold 0 and 255. Any other value is an error.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from organmtl.converters.command import SourceConverter
from organmtl.converters.common import ConversionError, check_geometry, copy_geometry, read_image, write_image

MODALITIES = ("CT", "T1DUAL", "T2SPIR")
CT_LABELS = {"background": 0, "liver": 1}
MR_LABELS = {"background": 0, "liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4}
CT_VALUES = {0: 0, 255: 1}                                   # PNG value -> label
MR_RANGES = {"background": (0, 0), "liver": (55, 70), "kidney_right": (110, 135),
             "kidney_left": (175, 200), "spleen": (240, 255)}  # inclusive PNG ranges (CHAOS readme)
CHANNELS = {"CT": {"": "CT"}, "T1DUAL": {"InPhase": "T1_in_phase", "OutPhase": "T1_out_phase"},
            "T2SPIR": {"": "T2_SPIR"}}                          # DICOM sub-folder -> channel name
DICOM_MODALITY = {"CT": "CT", "T1DUAL": "MR", "T2SPIR": "MR"}
SLICE_TOL = 0.01                                             # mm: slice gaps and in-plane offsets
REQUIRED_TAGS = ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient",
                 "PixelSpacing", "Rows", "Columns", "BitsAllocated", "PixelData")


class _ModalityAction(argparse.Action):
    """Store ``--modality`` and make the default dataset name ``CHAOS_<modality>``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        if getattr(namespace, "name", None) is None:
            namespace.name = f"CHAOS_{values}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--modality CT|T1DUAL|T2SPIR`` (required): which CHAOS series becomes the dataset."""
    parser.add_argument("--modality", choices=MODALITIES, required=True, action=_ModalityAction,
                        help="CT (liver), T1DUAL (2 channels: in phase, out of phase) or T2SPIR; "
                             "the default --name is CHAOS_<modality>")


def natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers (``IMG-2`` before ``IMG-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _listing(folder: Path, suffix: str, what: str) -> list[Path]:
    if not folder.is_dir():
        raise ConversionError(f"{folder}: {what} folder not found")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == suffix and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def discover(src: Path, modality: str) -> list[tuple[str, Path]]:
    """``[(patient, patient folder)]`` of ``src/CT`` or ``src/MR`` (or of ``src`` if it is that folder)."""
    top = "CT" if modality == "CT" else "MR"
    if not src.is_dir():
        raise ConversionError(f"{src}: source folder not found")
    root = src / top if (src / top).is_dir() else src
    if root is src and src.name != top:
        raise ConversionError(f"{src}: no {top} folder inside (expected the CHAOS Train_Sets folder)")
    patients = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: natural_key(p.name))
    if not patients:
        raise ConversionError(f"{root}: no patient folder inside")
    return [(p.name, p) for p in patients]


# ---------------------------------------------------------------- DICOM series

def _read_header(path: Path) -> dict:
    """The tags the conversion needs, parsed and checked (pixel data length included)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for corrupt files; all mean "bad input"
        raise ConversionError(f"{path}: not a readable DICOM file ({type(e).__name__})") from None
    missing = [t for t in REQUIRED_TAGS if t not in ds]
    if missing:
        raise ConversionError(f"{path}: DICOM tag {missing[0]} missing")
    try:
        h = {"series": str(ds.SeriesInstanceUID), "modality": str(ds.get("Modality", "") or ""),
             "rows": int(ds.Rows), "cols": int(ds.Columns),
             "ipp": np.array(ds.ImagePositionPatient, float), "iop": np.array(ds.ImageOrientationPatient, float),
             "spacing": np.array(ds.PixelSpacing, float)}
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{path}: malformed geometry tag ({e.__class__.__name__})") from None
    if h["ipp"].shape != (3,) or h["iop"].shape != (6,) or h["spacing"].shape != (2,):
        raise ConversionError(f"{path}: ImagePositionPatient/ImageOrientationPatient/PixelSpacing of wrong length")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and not syntax.is_compressed:
        expected = h["rows"] * h["cols"] * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            raise ConversionError(f"{path}: truncated pixel data ({len(ds.PixelData)} of {expected} bytes)")
    return h


def _check_same_series(path: Path, h: dict, first: dict, first_path: Path, modality: str) -> None:
    if h["series"] != first["series"]:
        raise ConversionError(f"{path}: SeriesInstanceUID differs from {first_path.name} (mixed series in one folder)")
    if h["modality"] not in ("", DICOM_MODALITY[modality]):
        raise ConversionError(f"{path}: Modality {h['modality']} in a {modality} series")
    if (h["rows"], h["cols"]) != (first["rows"], first["cols"]):
        raise ConversionError(f"{path}: {h['cols']}x{h['rows']} pixels, {first_path.name} has "
                              f"{first['cols']}x{first['rows']}")
    for key, tag in (("iop", "ImageOrientationPatient"), ("spacing", "PixelSpacing")):
        if not np.allclose(h[key], first[key], atol=1e-4):
            raise ConversionError(f"{path}: {tag} differs from {first_path.name}")


def _position_order(paths: list[Path], headers: list[dict]) -> np.ndarray:
    """Indices sorting the slices along the normal; checks evenly spaced, stacked slices."""
    iop = headers[0]["iop"]
    normal = np.cross(iop[:3], iop[3:])
    ipp = np.array([h["ipp"] for h in headers])
    along = ipp @ normal
    order = np.argsort(along, kind="stable")
    along, ipp = along[order], ipp[order]
    gaps = np.diff(along)
    if len(gaps) and gaps.min() < SLICE_TOL:
        k = int(np.argmin(gaps))
        raise ConversionError(f"{paths[order[k + 1]]}: same slice position as {paths[order[k]].name}")
    if len(gaps) and np.abs(gaps - gaps.mean()).max() > SLICE_TOL:
        k = int(np.argmax(np.abs(gaps - gaps.mean())))
        raise ConversionError(f"{paths[order[k + 1]]}: uneven slice spacing ({gaps[k]:.3f} mm, "
                              f"mean {gaps.mean():.3f} mm)")
    inplane = ipp - np.outer(along, normal)
    off = np.linalg.norm(inplane - inplane[0], axis=1)
    if off.max() > SLICE_TOL:
        raise ConversionError(f"{paths[order[int(np.argmax(off))]]}: slice not stacked along the normal "
                              f"(tilted/sheared series)")
    return order


def _check_name_order(paths: list[Path], position_of: np.ndarray) -> None:
    """The natural file-name order (``paths``) must run monotonically through the positions."""
    steps = np.diff(position_of)
    if len(steps) and not ((steps > 0).all() or (steps < 0).all()):
        sign = 1 if np.sum(steps > 0) >= np.sum(steps < 0) else -1
        k = int(np.argmax(np.sign(steps) != sign)) + 1
        raise ConversionError(f"{paths[k]}: file-name order disagrees with ImagePositionPatient (slice "
                              f"{position_of[k]} along the normal follows {paths[k - 1].name} at slice "
                              f"{position_of[k - 1]}); CHAOS pairs PNG masks with DICOM files by file name")


def read_series(folder: Path, modality: str) -> tuple[sitk.Image, list[int]]:
    """A DICOM series folder as a position-sorted volume, and the position index of each file in
    natural file-name order (``[k_0, k_1, ...]``: the first file by name is slice ``k_0``), checked
    to run monotonically along or against the slice normal."""
    paths = _listing(folder, ".dcm", "DICOM")
    if not paths:
        raise ConversionError(f"{folder}: no .dcm files inside")
    headers = [_read_header(p) for p in paths]
    for p, h in zip(paths[1:], headers[1:]):
        _check_same_series(p, h, headers[0], paths[0], modality)
    order = _position_order(paths, headers)
    position_of = np.empty(len(order), int)
    position_of[order] = np.arange(len(order))
    _check_name_order(paths, position_of)
    return _read_pixels([paths[i] for i in order]), [int(k) for k in position_of]


def _read_pixels(sorted_paths: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in sorted_paths])
    try:
        return reader.Execute()
    except RuntimeError:
        for p in sorted_paths:                     # name the file SimpleITK choked on
            read_image(p)
        raise ConversionError(f"{sorted_paths[0].parent}: DICOM series cannot be read by SimpleITK") from None


# ---------------------------------------------------------------- PNG masks

def _decode_table(modality: str) -> np.ndarray:
    """256-entry look-up table PNG value -> label; 255 marks values outside every range."""
    table = np.full(256, 255, np.uint8)
    if modality == "CT":
        for value, label in CT_VALUES.items():
            table[value] = label
    else:
        for name, (lo, hi) in MR_RANGES.items():
            table[lo: hi + 1] = MR_LABELS[name]
    return table


def _read_png(path: Path, rows: int, cols: int, table: np.ndarray, modality: str) -> np.ndarray:
    img = read_image(path)
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() != 2:
        raise ConversionError(f"{path}: expected a 2D grey-level PNG, found {img.GetNumberOfComponentsPerPixel()} "
                              f"channels in {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img)
    if arr.shape != (rows, cols):
        raise ConversionError(f"{path}: {arr.shape[1]}x{arr.shape[0]} pixels (columns x rows), the DICOM "
                              f"slices have {cols}x{rows}")
    if arr.dtype.kind not in "ui" or arr.min() < 0 or arr.max() > 255:
        raise ConversionError(f"{path}: values outside 0-255 ({arr.dtype})")
    labels = table[arr.astype(np.int64)]
    if (labels == 255).any():
        bad = sorted(set(np.unique(arr[labels == 255]).tolist()))
        rule = "0 and 255" if modality == "CT" else ", ".join(f"{lo}-{hi}" for lo, hi in MR_RANGES.values())
        raise ConversionError(f"{path}: unexpected mask intensity {bad[0]} (allowed: {rule})")
    return labels


def read_ground(folder: Path, image: sitk.Image, slice_of_png: list[int], modality: str,
                dicom_folder: Path) -> np.ndarray:
    """Stack the PNG masks of ``folder`` into a (z, y, x) label volume on the image grid."""
    pngs = _listing(folder, ".png", "Ground")
    cols, rows, n_slices = image.GetSize()
    if len(pngs) != n_slices:
        raise ConversionError(f"{folder}: {len(pngs)} PNG masks for {n_slices} DICOM slices in {dicom_folder}")
    table = _decode_table(modality)
    seg = np.zeros((n_slices, rows, cols), np.uint8)
    for png, k in zip(pngs, slice_of_png):
        seg[k] = _read_png(png, rows, cols, table, modality)
    return seg


# ---------------------------------------------------------------- cases

def _case_folders(patient_dir: Path, modality: str) -> tuple[Path, Path]:
    """(DICOM_anon folder, Ground folder) of one patient."""
    base = patient_dir if modality == "CT" else patient_dir / modality
    if not base.is_dir():
        raise ConversionError(f"{base}: {modality} folder not found")
    return base / "DICOM_anon", base / "Ground"


def _name_direction(slice_of_png: list[int]) -> str:
    steps = set(np.sign(np.diff(slice_of_png)).tolist())
    return {frozenset({1}): "along the slice normal", frozenset({-1}): "against the slice normal"}.get(
        frozenset(steps), "not monotonic in position")


def _convert_case(task) -> dict:
    (patient, patient_dir), out, modality, file_ending, test = task
    dicom_root, ground = _case_folders(patient_dir, modality)
    images, first_map, reference, reference_dir = [], None, None, None
    for sub in CHANNELS[modality]:
        folder = dicom_root / sub if sub else dicom_root
        image, slice_of_png = read_series(folder, modality)
        if reference is None:
            reference, reference_dir, first_map = image, folder, slice_of_png
        else:
            check_geometry(reference, image, folder, reference_dir)
        images.append(image)
    unlabelled = test and not ground.exists()
    seg = None if unlabelled else read_ground(ground, reference, first_map, modality, reference_dir)
    for c, image in enumerate(images):
        write_image(image, out / "imagesTr" / f"{patient}_{c:04d}{file_ending}")
    record = {"case": patient, "action": "kept", "slices": len(first_map),
              "file_names_run": _name_direction(first_map)}
    if unlabelled:
        return {**record, "action": "kept, image only (no Ground folder in a test set)"}
    write_image(copy_geometry(seg, reference), out / "labelsTr" / f"{patient}{file_ending}")
    labels = CT_LABELS if modality == "CT" else MR_LABELS
    return {**record, "label_voxels": {name: int((seg == v).sum()) for name, v in labels.items() if v}}


def convert(src: Path, out: Path, args, run_cases) -> dict:
    """Write the nnU-Net raw dataset of one CHAOS modality into ``out`` (a temporary folder)."""
    modality = args.modality
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    test = getattr(run_cases, "split", "train") == "test"          # CaseRunner converting --test
    tasks = [(p, out, modality, args.file_ending, test) for p in discover(Path(src), modality)]
    records = run_cases(_convert_case, tasks, desc=f"chaos {modality}", case=lambda t: t[0][0])
    labels = CT_LABELS if modality == "CT" else MR_LABELS
    channels = {str(c): name for c, name in enumerate(CHANNELS[modality].values())}
    return {"labels": dict(labels), "channel_names": channels, "num_training": len(records), "cases": records,
            "dataset_json_extra": {"organmtl_chaos_modality": modality}}


CONVERTER = SourceConverter("chaos", "CHAOS challenge CT liver / MR abdomen (DICOM + PNG masks)",
                            add_arguments, convert)
