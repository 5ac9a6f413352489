"""CT liver and MR abdomen phantoms in the CHAOS challenge layout (DICOM series + PNG masks).

Written under ``out`` exactly as the real ``Train_Sets`` folder::

    CT/<patient>/DICOM_anon/i0007,0000b.dcm ...      CT/<patient>/Ground/liver_GT_000.png ...
    MR/<patient>/T1DUAL/DICOM_anon/InPhase/*.dcm     MR/<patient>/T1DUAL/DICOM_anon/OutPhase/*.dcm
    MR/<patient>/T1DUAL/Ground/*.png                 MR/<patient>/T2SPIR/DICOM_anon/*.dcm
    MR/<patient>/T2SPIR/Ground/*.png

Small grids (12 slices of 56 rows x 64 columns, unequal row/column pixel spacing, non-trivial
origins, axial orientation). The quirks converters must get right are built in:

- files are named as in the real set (CT ``i0000,0000b.dcm``, ``i0001,0000b.dcm`` ...; MR
  ``IMG-0004-00002.dcm`` with the InstanceNumber in the name, T1DUAL in and out phase of one
  series numbered interleaved); PNG ``i`` (sorted by name) is the DICOM file ``i`` (sorted by
  name), the organisers' rule; file-name order runs against the slice normal (head first, as in
  the real set) in even-indexed patients and along it in odd-indexed ones, and MR numbers never
  start from 1, so neither position order, reversed position order nor ``InstanceNumber - 1``
  maps every patient;
- organs sit off-centre along z, so a reversed stack changes the labels;
- CT masks are 0/255; MR masks are intensity coded (liver 63, right kidney 126, left kidney 189,
  spleen 252) with a per-patient offset that stays inside the documented ranges.

Everything, UIDs included, derives from the seed: reruns are byte-identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from organmtl.demo_data.shapes import Grid

SHAPE_ZYX = (12, 56, 64)
CT_SPACING_XYZ = (5.5, 5.0, 8.0)
MR_SPACING_XYZ = {"T1DUAL": (5.75, 5.25, 9.0), "T2SPIR": (5.5, 5.0, 8.5)}
MR_ORGANS = ("liver", "kidney_right", "kidney_left", "spleen")     # nnU-Net labels 1..4
MR_PNG_VALUE = {"liver": 63, "kidney_right": 126, "kidney_left": 189, "spleen": 252}
MR_PNG_OFFSETS = (0, -5, 3, -8)                                     # all stay inside the CHAOS ranges
MR_SIGNAL = {  # organ -> (T1 in phase, T1 out of phase, T2 SPIR); body first
    "body": (300, 280, 150), "liver": (520, 380, 210), "kidney_right": (440, 430, 640),
    "kidney_left": (440, 430, 640), "spleen": (400, 390, 560)}
CHANNELS = {"T1DUAL": ("InPhase", "OutPhase"), "T2SPIR": ("",)}


def ct_patients(n: int) -> list[str]:
    """Patient folder names of the CT set (numbers, as in CHAOS; 10 sorts after 7)."""
    return [str(1 + 3 * i) for i in range(n)]


def mr_patients(n: int) -> list[str]:
    """Patient folder names of the MR set."""
    return [str(2 + 3 * i) for i in range(n)]


def _grid(rng: np.random.Generator, spacing_xyz) -> Grid:
    origin = np.round([-170.0 + rng.uniform(-10, 10), -150.0 + rng.uniform(-10, 10),
                       -320.0 + rng.uniform(-40, 40)], 2)
    return Grid(SHAPE_ZYX, spacing_xyz, origin)


def _organ(g: Grid, rng: np.random.Generator, centre_frac, radii_frac) -> np.ndarray:
    """Ellipsoid placed by fractions of the grid extent (x, y, z), jittered by up to 3 %."""
    extent = np.array(g.spacing) * (np.array(g.shape[::-1]) - 1)
    centre = np.array(g.origin) + (np.array(centre_frac) + rng.uniform(-0.03, 0.03, 3)) * extent
    return g.ellipsoid(centre, np.array(radii_frac) * extent)


def make_ct(seed: int, index: int) -> tuple[Grid, np.ndarray, np.ndarray]:
    """CT patient ``index``: (grid, HU int16 volume, liver mask), arrays (z, y, x) with z along the
    slice normal (the order a position-sorted DICOM reader returns)."""
    rng = np.random.default_rng([seed, 7, index])
    g = _grid(rng, CT_SPACING_XYZ)
    body = _organ(g, rng, (0.5, 0.5, 0.5), (0.46, 0.42, 3.0))
    liver = _organ(g, rng, (0.32, 0.45, 0.34), (0.2, 0.22, 0.26)) & body   # low along z: asymmetric
    hu = np.full(g.shape, -1000.0)
    hu[body] = 40.0
    hu[liver] = 95.0
    hu += rng.normal(0, 8, g.shape)
    return g, np.clip(np.round(hu), -1024, 3071).astype(np.int16), liver


def make_mr(seed: int, index: int, sequence: str) -> tuple[Grid, dict[str, np.ndarray], np.ndarray]:
    """MR patient ``index``, ``sequence`` T1DUAL or T2SPIR: (grid, {channel: uint16 volume},
    labels uint8 with 1 liver, 2 right kidney, 3 left kidney, 4 spleen), arrays (z, y, x) along
    the slice normal. T1DUAL channels are ``InPhase`` and ``OutPhase``; T2SPIR has one, ``""``."""
    rng = np.random.default_rng([seed, 8, index, 0 if sequence == "T1DUAL" else 1])
    g = _grid(rng, MR_SPACING_XYZ[sequence])
    body = _organ(g, rng, (0.5, 0.5, 0.5), (0.46, 0.42, 3.0))
    masks = {"liver": _organ(g, rng, (0.3, 0.42, 0.62), (0.2, 0.2, 0.25)),       # LPS: patient right = low x
             "kidney_right": _organ(g, rng, (0.3, 0.72, 0.3), (0.08, 0.1, 0.18)),
             "kidney_left": _organ(g, rng, (0.7, 0.72, 0.36), (0.08, 0.1, 0.18)),
             "spleen": _organ(g, rng, (0.74, 0.5, 0.7), (0.1, 0.14, 0.16))}
    labels = np.zeros(g.shape, np.uint8)
    for value, organ in enumerate(MR_ORGANS, start=1):
        labels[masks[organ] & body & (labels == 0)] = value
    channels = {}
    for c, name in enumerate(CHANNELS[sequence]):
        contrast = c if sequence == "T1DUAL" else 2
        vol = np.zeros(g.shape)
        vol[body] = MR_SIGNAL["body"][contrast]
        for value, organ in enumerate(MR_ORGANS, start=1):
            vol[labels == value] = MR_SIGNAL[organ][contrast]
        channels[name] = np.clip(vol + rng.normal(0, 15, g.shape), 0, 4095).astype(np.uint16)
    return g, channels, labels


def instance_numbers(index: int, n_slices: int, start: int = 1, step: int = 1) -> list[int]:
    """InstanceNumber of each slice in position order (ascending along the normal): against the
    normal for even ``index`` (the first slice is the top one), along it for odd ``index``."""
    ranks = range(n_slices - 1, -1, -1) if index % 2 == 0 else range(n_slices)
    return [start + step * r for r in ranks]


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=[f"organmtl-chaos-demo-{seed}", *map(str, parts)])


def dicom_slice(pixels: np.ndarray, modality: str, uids: dict, number: int, position, orientation,
                pixel_spacing_rc, thickness: float, description: str = "") -> Dataset:
    """One uncompressed CT/MR Image Storage dataset (explicit VR little endian, 16-bit unsigned).

    ``pixels`` (rows, columns): HU for CT (stored + 1024, RescaleIntercept -1024), raw values for MR.
    ``uids``: ``study``, ``series``, ``frame``, ``sop`` UIDs and the ``patient`` id. ``position``
    (ImagePositionPatient), ``orientation`` (row then column cosines) and ``pixel_spacing_rc``
    (row spacing, column spacing) are in DICOM's order, written with up to 10 decimals.
    """
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uids["sop"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality, ds.PatientID, ds.PatientName = modality, uids["patient"], "Anonymized"
    ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = description, 1, number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing_rc]
    ds.SliceThickness = _ds(thickness)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        pixels = pixels.astype(np.int32) + 1024
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (up to 10 decimals, trailing zeros dropped)."""
    for decimals in range(10, -1, -1):
        text = f"{float(value):.{decimals}f}"
        text = text.rstrip("0").rstrip(".") if "." in text else text
        if len(text) <= 16:
            return "0" if text == "-0" else text
    raise ValueError(f"{value} does not fit a DICOM Decimal String")


def _write_series(folder: Path, g: Grid, volume: np.ndarray, modality: str, numbers: list[int],
                  names: list[str], uid_parts: tuple, seed: int, description: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": _uid(seed, *uid_parts[:2], "study"), "series": _uid(seed, *uid_parts, "series"),
            "frame": _uid(seed, *uid_parts[:2], "frame"), "patient": f"CHAOS-DEMO-{uid_parts[1]}"}
    for k in range(volume.shape[0]):
        uids["sop"] = _uid(seed, *uid_parts, "sop", k)
        position = (g.origin[0], g.origin[1], g.origin[2] + k * g.spacing[2])
        ds = dicom_slice(volume[k], modality, uids, numbers[k], position, (1, 0, 0, 0, 1, 0),
                         (g.spacing[1], g.spacing[0]), g.spacing[2], description)
        pydicom.dcmwrite(folder / names[k], ds, enforce_file_format=True)


def _write_pngs(folder: Path, masks_in_position_order: np.ndarray, numbers: list[int], names: list[str]) -> None:
    """PNG ``i`` (``names`` sorted) = the slice with the ``i``-th smallest InstanceNumber, which is
    DICOM file ``i`` by name (the demo names files after their InstanceNumber)."""
    folder.mkdir(parents=True, exist_ok=True)
    by_number = np.argsort(numbers, kind="stable")
    for name, k in zip(sorted(names), by_number):
        sitk.WriteImage(sitk.GetImageFromArray(masks_in_position_order[k].astype(np.uint8)), str(folder / name))


def _write_ct_patient(root: Path, seed: int, index: int, patient: str) -> None:
    g, hu, liver = make_ct(seed, index)
    n = g.shape[0]
    numbers = instance_numbers(index, n)
    _write_series(root / "DICOM_anon", g, hu, "CT", numbers, [f"i{f - 1:04d},0000b.dcm" for f in numbers],
                  ("CT", patient), seed, "CT abdomen portal venous")
    _write_pngs(root / "Ground", liver.astype(np.uint8) * 255, numbers, [f"liver_GT_{i:03d}.png" for i in range(n)])


def _write_mr_sequence(root: Path, seed: int, index: int, patient: str, sequence: str) -> None:
    g, channels, labels = make_mr(seed, index, sequence)
    n = g.shape[0]
    series_no = 4 if sequence == "T1DUAL" else 2
    coded = np.zeros(labels.shape, np.uint8)
    for value, organ in enumerate(MR_ORGANS, start=1):
        coded[labels == value] = MR_PNG_VALUE[organ] + MR_PNG_OFFSETS[index % len(MR_PNG_OFFSETS)]
    numbers = {}
    for c, name in enumerate(channels):          # T1DUAL: out phase odd numbers, in phase even ones
        start, step = ((2, 2) if c == 0 else (1, 2)) if sequence == "T1DUAL" else (31, 1)
        numbers[name] = instance_numbers(index, n, start, step)
        _write_series(root / sequence / "DICOM_anon" / name, g, channels[name], "MR", numbers[name],
                      [f"IMG-{series_no:04d}-{f:05d}.dcm" for f in numbers[name]],
                      ("MR", patient, sequence, name), seed, f"{sequence} {name}".strip())
    first = next(iter(channels))
    _write_pngs(root / sequence / "Ground", coded, numbers[first],
                [f"IMG-{series_no:04d}-{i + 1:05d}.png" for i in range(n)])


def write_chaos(out: Path, n_cases: int, seed: int) -> list[str]:
    """Write ``n_cases`` CT patients and ``n_cases`` MR patients (T1DUAL + T2SPIR) in the CHAOS
    ``Train_Sets`` layout under ``out``; return ``["CT/<patient>", ..., "MR/<patient>", ...]``."""
    out = Path(out)
    ids = []
    for i, patient in enumerate(ct_patients(n_cases)):
        _write_ct_patient(out / "CT" / patient, seed, i, patient)
        ids.append(f"CT/{patient}")
    for i, patient in enumerate(mr_patients(n_cases)):
        for sequence in ("T1DUAL", "T2SPIR"):
            _write_mr_sequence(out / "MR" / patient, seed, i, patient, sequence)
        ids.append(f"MR/{patient}")
    return ids
