"""DICOM CT series + RTSTRUCT (radiotherapy structure set) -> nnU-Net v2 raw dataset.

Layout read: ``SRC/<case>/`` holds, anywhere below it and under any file names, the slices of one CT
series (DICOM, Modality ``CT``) and one RT Structure Set (Modality ``RTSTRUCT``). Files ending in
``.dcm`` must be DICOM; other files are read when they carry the DICOM preamble and skipped
otherwise; DICOM files of other modalities (RTPLAN, RTDOSE, ...) are counted and skipped.

CT: slices are sorted by their position along the slice normal (ImageOrientationPatient row x
column), never by file name or InstanceNumber, checked (one orientation and size, distinct and
evenly spaced positions along the normal) and read with SimpleITK's ImageSeriesReader, which
applies RescaleSlope/Intercept. Several CT series in one case are refused unless
``--ct-series referenced`` picks the one the RTSTRUCT references.

Contours: each CLOSED_PLANAR contour (ContourData, patient LPS mm) is mapped to continuous voxel
indices with the CT geometry (the inverse of index -> point, as SimpleITK's
``TransformPhysicalPointToContinuousIndex``), assigned to the nearest slice (every point must lie
within ``--plane-tolerance`` mm of that slice plane) and filled in (x, y) by :func:`fill_polygons`:
a voxel belongs to the ROI when its centre lies inside an odd number of the ROI's contours on that
slice, so an inner contour cuts a hole (the DICOM-RT convention) and separate contours add up.
POINT contours become landmarks (``landmarks/<case>.json``); OPEN_* contours are counted and
skipped. The RTSTRUCT must reference the CT read (series, frame of reference, contour images).

Labels: ``--roi-map FILE.json`` ``{"label": "regex" | ["regex", ...]}`` (case-insensitive full
match on ROIName; an ROI takes the first label that matches, labels are numbered in file order);
without it every ROI with contours, named by its sanitised ROIName, numbered in order of first
appearance over the cases. Unmatched ROIs are listed in the report; a label without ROI in a case
follows ``--missing`` (as pddca). Overlaps: the later label wins; overlapping voxels are counted.
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from organmtl.converters.command import SourceConverter
from organmtl.converters.common import ConversionError
from organmtl.converters.landmarks import write_case

POSITION_TOL_MM = 0.01          # slice positions: spacing regularity and drift off the normal
ORIENTATION_TOL = 1e-4          # direction cosines of different slices
INDEX_DECIMALS = 6              # contour indices are rounded to 1e-6 voxel before the fill
RESERVED_LABELS = {"background", "ignore"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roi-map", type=Path, metavar="FILE.json", default=None,
                        help='{"label": "regex" or [regexes]}: case-insensitive full match on ROIName '
                             "(default: every ROI, named by its sanitised ROIName)")
    parser.add_argument("--missing", choices=("drop", "ignore", "background"), default="drop",
                        help="what to do with cases lacking an ROI for a label (default: drop)")
    parser.add_argument("--ct-series", choices=("only", "referenced"), default="only",
                        help="several CT series in a case: refuse (only, default) or take the one "
                             "the RTSTRUCT references")
    parser.add_argument("--plane-tolerance", type=float, default=0.1, metavar="MM",
                        help="largest distance of a contour point from its CT slice plane (default 0.1 mm)")


# ------------------------------------------------------------------------------ reading DICOM

@dataclass
class CaseFiles:
    """The DICOM files of one case folder: CT slices by SeriesInstanceUID, and the RTSTRUCT."""

    folder: Path
    ct: dict[str, list[tuple[Path, pydicom.Dataset]]] = field(default_factory=dict)
    rtstruct: tuple[Path, pydicom.Dataset] | None = None
    skipped: int = 0


def read_dicom(path: Path, pixels: bool) -> pydicom.Dataset | None:
    """A DICOM dataset, ``None`` for a non-DICOM file without ``.dcm`` suffix; a ``.dcm`` file that
    is not DICOM, a file without Modality, or a CT slice whose pixel data is missing or shorter
    than Rows x Columns x BitsAllocated (a truncated file) raises ConversionError."""
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except InvalidDicomError:
        if path.suffix.lower() == ".dcm":
            raise ConversionError(f"{path}: not a DICOM file (no DICM preamble)") from None
        return None
    except Exception as e:  # pydicom raises many kinds on malformed elements
        raise ConversionError(f"{path}: corrupt DICOM ({e.__class__.__name__})") from None
    if not str(ds.get("Modality", "")).strip():
        raise ConversionError(f"{path}: corrupt DICOM (no Modality)")
    if pixels and str(ds.Modality).upper() == "CT":
        _check_pixel_data(path, ds)
    return ds


def _check_pixel_data(path: Path, ds: pydicom.Dataset) -> None:
    if "PixelData" not in ds:
        raise ConversionError(f"{path}: corrupt DICOM (no pixel data; truncated?)")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and not syntax.is_compressed:
        try:
            need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        except (AttributeError, TypeError, ValueError):
            raise ConversionError(f"{path}: CT slice without Rows/Columns/BitsAllocated") from None
        if len(ds.PixelData) < need:
            raise ConversionError(f"{path}: corrupt DICOM (pixel data {len(ds.PixelData)} of {need} bytes; truncated?)")


def scan_case(folder: Path, pixels: bool = True) -> CaseFiles:
    """Classify every file below ``folder`` (hidden files and folders skipped, sorted walk)."""
    files = CaseFiles(folder)
    rtstructs = []
    paths = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in paths:
        ds = read_dicom(path, pixels)
        modality = "" if ds is None else str(ds.Modality).strip().upper()
        if modality == "CT":
            files.ct.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
        elif modality == "RTSTRUCT":
            rtstructs.append((path, ds))
        elif ds is not None:
            files.skipped += 1
    if not files.ct:
        raise ConversionError(f"{folder}: no CT image files (DICOM with Modality CT) in the case folder")
    if not rtstructs:
        raise ConversionError(f"{folder}: no RTSTRUCT file (DICOM with Modality RTSTRUCT) in the case folder")
    if len(rtstructs) > 1:
        raise ConversionError(f"{rtstructs[1][0]}: a second RTSTRUCT in the case (also {rtstructs[0][0].name}); "
                              "keep one per case folder")
    files.rtstruct = rtstructs[0]
    return files


def referenced_series(rtstruct: pydicom.Dataset) -> set[str]:
    """SeriesInstanceUIDs named in ReferencedFrameOfReferenceSequence > RTReferencedStudySequence >
    RTReferencedSeriesSequence."""
    return {str(series.get("SeriesInstanceUID", ""))
            for frame in rtstruct.get("ReferencedFrameOfReferenceSequence", [])
            for study in frame.get("RTReferencedStudySequence", [])
            for series in study.get("RTReferencedSeriesSequence", [])}


def select_series(files: CaseFiles, policy: str) -> str:
    """The SeriesInstanceUID of the CT to convert (``policy``: ``only`` or ``referenced``)."""
    if len(files.ct) == 1:
        return next(iter(files.ct))
    uids = sorted(files.ct)
    if policy == "referenced":
        chosen = [u for u in uids if u in referenced_series(files.rtstruct[1])]
        if len(chosen) == 1:
            return chosen[0]
        raise ConversionError(f"{files.rtstruct[0]}: RTSTRUCT references none of the {len(uids)} CT series "
                              f"of {files.folder.name} ({', '.join(uids)})")
    shown = ", ".join(uids[:3]) + (", ..." if len(uids) > 3 else "")
    raise ConversionError(f"{files.folder}: {len(uids)} CT series ({shown}); keep one per case "
                          "folder or pass --ct-series referenced")


def _vector(path: Path, ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray:
    try:
        v = np.asarray([float(x) for x in ds.get(keyword)], float)
    except (TypeError, ValueError):
        v = np.empty(0)
    if v.shape != (n,) or not np.isfinite(v).all():
        raise ConversionError(f"{path}: CT slice without a valid {keyword}")
    return v


def sort_slices(slices: list[tuple[Path, pydicom.Dataset]]) -> list[Path]:
    """Slice files ordered by position along the normal ``row x col`` of ImageOrientationPatient.

    Refused: a single slice, different orientations or sizes, two slices at one position, uneven
    spacing (a missing slice), positions that drift off the normal (gantry tilt).
    """
    first_path, first = slices[0]
    if len(slices) < 2:
        raise ConversionError(f"{first_path}: the CT series has a single slice; a volume needs two or more")
    iop = _vector(first_path, first, "ImageOrientationPatient", 6)
    normal = np.cross(iop[:3], iop[3:])
    size = (first.get("Rows"), first.get("Columns"))
    positions = []
    for path, ds in slices:
        if not np.allclose(_vector(path, ds, "ImageOrientationPatient", 6), iop, atol=ORIENTATION_TOL):
            raise ConversionError(f"{path}: ImageOrientationPatient differs from {first_path.name}")
        if (ds.get("Rows"), ds.get("Columns")) != size:
            raise ConversionError(f"{path}: slice size differs from {first_path.name}")
        _vector(path, ds, "PixelSpacing", 2)
        positions.append(_vector(path, ds, "ImagePositionPatient", 3))
    positions = np.array(positions)
    order = np.argsort(positions @ normal, kind="stable")
    paths = [slices[i][0] for i in order]
    along = positions[order] @ normal
    gaps = np.diff(along)
    for n, gap in enumerate(gaps):
        if gap < POSITION_TOL_MM:
            raise ConversionError(f"{paths[n + 1]}: same slice position as {paths[n].name}")
    usual = float(np.median(gaps))
    for n, gap in enumerate(gaps):
        if abs(gap - usual) > POSITION_TOL_MM:
            raise ConversionError(f"{paths[n + 1]}: gap of {gap:.4g} mm to {paths[n].name} differs from the "
                                  f"series' {usual:.4g} mm (missing slice?)")
    offsets = positions[order] - positions[order][0]
    drift = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if drift.max() > POSITION_TOL_MM:
        raise ConversionError(f"{paths[int(drift.argmax())]}: slice position off the slice normal by "
                              f"{drift.max():.3g} mm (gantry tilt?)")
    return paths


def read_ct(paths: list[Path]) -> sitk.Image:
    """The sorted slices as one volume (rescaled values; int16 when that holds them exactly)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in paths])
    try:
        image = reader.Execute()
    except RuntimeError:
        for p in paths:
            try:
                sitk.ReadImage(str(p))
            except RuntimeError:
                raise ConversionError(f"{p}: CT pixel data cannot be read") from None
        raise ConversionError(f"{paths[0].parent}: the CT series cannot be read as one volume") from None
    arr = sitk.GetArrayViewFromImage(image)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) and not np.isfinite(arr).all():
        raise ConversionError(f"{paths[0].parent}: CT contains NaN or Inf values")
    return _compact(image)


def _compact(image: sitk.Image) -> sitk.Image:
    if image.GetPixelID() == sitk.sitkInt16:
        return image
    arr = sitk.GetArrayViewFromImage(image)
    if arr.min() >= -32768 and arr.max() <= 32767 and np.array_equal(arr, np.rint(arr)):
        return sitk.Cast(image, sitk.sitkInt16)
    return image


# ------------------------------------------------------------------------------ RTSTRUCT

@dataclass
class RoiData:
    """One ROI of the structure set: closed contours and points as (N, 3) LPS mm arrays."""

    number: int
    name: str
    frame_uid: str
    closed: list[np.ndarray] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)
    open_contours: int = 0
    image_refs: set[str] = field(default_factory=set)

    @property
    def point_only(self) -> bool:
        return bool(self.points) and not self.closed and not self.open_contours


def read_rois(path: Path, ds: pydicom.Dataset) -> list[RoiData]:
    """ROIs in StructureSetROISequence order with their contours from ROIContourSequence."""
    rois: dict[int, RoiData] = {}
    for item in ds.get("StructureSetROISequence", []):
        try:
            number = int(item.ROINumber)
        except (AttributeError, TypeError, ValueError):
            raise ConversionError(f"{path}: StructureSetROISequence item without ROINumber") from None
        name = str(item.get("ROIName", "")).strip() or f"ROI{number}"
        rois[number] = RoiData(number, name, str(item.get("ReferencedFrameOfReferenceUID", "")))
    if not rois:
        raise ConversionError(f"{path}: RTSTRUCT has no StructureSetROISequence")
    for item in ds.get("ROIContourSequence", []):
        try:
            number = int(item.get("ReferencedROINumber", -1))
        except (TypeError, ValueError):
            number = -1
        if number not in rois:
            raise ConversionError(f"{path}: ROIContourSequence refers to ROI number {number}, "
                                  "which StructureSetROISequence does not list")
        for n, contour in enumerate(item.get("ContourSequence", []), start=1):
            _add_contour(path, rois[number], n, contour)
    return list(rois.values())


def _add_contour(path: Path, roi: RoiData, n: int, contour: pydicom.Dataset) -> None:
    kind = str(contour.get("ContourGeometricType", "")).strip().upper()
    try:
        data = np.asarray([float(v) for v in contour.get("ContourData", [])], float)
        count = contour.get("NumberOfContourPoints")
        count = data.size // 3 if count is None else int(count)
    except (TypeError, ValueError):
        data, count = np.full(1, np.nan), -1
    if data.size == 0 or data.size != 3 * count or not np.isfinite(data).all():
        raise ConversionError(f"{path}: ROI {roi.name!r} contour {n}: malformed ContourData")
    roi.image_refs |= {str(r.get("ReferencedSOPInstanceUID", "")) for r in contour.get("ContourImageSequence", [])}
    if kind == "CLOSED_PLANAR":
        roi.closed.append(data.reshape(-1, 3))
    elif kind == "POINT":
        roi.points.append(data.reshape(-1, 3))
    elif kind in ("OPEN_PLANAR", "OPEN_NONPLANAR"):
        roi.open_contours += 1
    else:
        raise ConversionError(f"{path}: ROI {roi.name!r} contour {n}: unknown ContourGeometricType {kind!r}")


def check_references(path: Path, rtstruct: pydicom.Dataset, rois: list[RoiData],
                     series: tuple[str, str, set[str]]) -> None:
    """Refuse an RTSTRUCT drawn on another series (``series`` = the CT's SeriesInstanceUID,
    FrameOfReferenceUID and SOPInstanceUIDs): the series it names must include the CT's, the frames
    of reference it names must include the CT's, and the ``rois`` converted must lie in the CT's
    frame and be drawn on its slices (ContourImageSequence)."""
    series_uid, frame_uid, sop_uids = series
    named = referenced_series(rtstruct) - {""}
    if named and series_uid not in named:
        raise ConversionError(f"{path}: RTSTRUCT references another series ({sorted(named)[0]}), "
                              f"not the CT series {series_uid}")
    frames = {str(f.get("FrameOfReferenceUID", "")) for f in rtstruct.get("ReferencedFrameOfReferenceSequence", [])}
    frames -= {""}
    if frame_uid and frames and frame_uid not in frames:
        raise ConversionError(f"{path}: RTSTRUCT references another series (frame of reference "
                              f"{sorted(frames)[0]}, the CT's is {frame_uid})")
    for roi in rois:
        if frame_uid and roi.frame_uid and roi.frame_uid != frame_uid:
            raise ConversionError(f"{path}: RTSTRUCT references another series (ROI {roi.name!r} lies in frame "
                                  f"of reference {roi.frame_uid}, the CT's is {frame_uid})")
        foreign = sorted(roi.image_refs - sop_uids - {""})
        if foreign:
            raise ConversionError(f"{path}: RTSTRUCT references another series (ROI {roi.name!r} is drawn on "
                                  f"image {foreign[0]}, not a slice of the CT)")


# ------------------------------------------------------------------------------ rasterisation

def physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Continuous (x, y, z) indices of LPS points (N, 3): ``(D diag(s))^-1 (p - origin)``, the
    mapping of ``image.TransformPhysicalPointToContinuousIndex``, vectorised."""
    d = np.asarray(image.GetDirection(), float).reshape(3, 3) * np.asarray(image.GetSpacing(), float)
    return np.linalg.solve(d, (np.asarray(points, float) - np.asarray(image.GetOrigin(), float)).T).T


def fill_polygons(polygons, shape_yx) -> np.ndarray:
    """Even-odd fill of closed polygons given in continuous voxel indices ``(x, y)``: bool (ny, nx).

    Voxel ``(j, i)`` is set when its centre ``(i, j)`` lies inside an odd number of the polygons,
    so several polygons on one slice combine by XOR (inner contours cut holes). Scanline rule:
    each edge crosses rows ``min(y0, y1) <= j < max(y0, y1)`` (half-open, so vertices are counted
    once), and a crossing at ``x_c`` toggles voxels ``i >= x_c``. Centres exactly on a left or
    top edge are inside, on a right or bottom edge outside: polygons sharing an edge tile the grid
    without gap or overlap, and an axis-aligned square with corners ``(a, b)``, ``(c, d)`` covers
    ``a <= i < c``, ``b <= j < d``. Indices are rounded to 1e-6 voxel first; parts outside the
    grid are clipped.
    """
    ny, nx = shape_yx
    toggles = np.zeros((ny, nx + 1), np.int64)
    for poly in polygons:
        poly = np.round(np.asarray(poly, float)[:, :2], INDEX_DECIMALS)
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        first = np.maximum(np.ceil(np.minimum(y0, y1)), 0)
        stop = np.minimum(np.ceil(np.maximum(y0, y1)), ny)
        counts = np.maximum(stop - first, 0).astype(np.int64)
        if counts.sum() == 0:
            continue
        edge = np.repeat(np.arange(len(poly)), counts)
        rows = first[edge] + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        xc = x0[edge] + (rows - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        cols = np.clip(np.ceil(np.round(xc, INDEX_DECIMALS)), 0, nx).astype(np.int64)
        np.add.at(toggles, (rows.astype(np.int64), cols), 1)
    return (np.cumsum(toggles, axis=1)[:, :nx] % 2).astype(bool)


def rasterise_roi(roi: RoiData, image: sitk.Image, tolerance_mm: float, path: Path) -> tuple[np.ndarray, dict]:
    """The ROI's closed contours as a bool (z, y, x) mask on the CT grid, and counts of contours
    lying outside the slice range (skipped) or leaving the slice (clipped)."""
    nx, ny, nz = image.GetSize()
    spacing_z = image.GetSpacing()[2]
    by_slice: dict[int, list[np.ndarray]] = {}
    stats = {"outside": 0, "clipped": 0}
    for n, contour in enumerate(roi.closed, start=1):
        idx = physical_to_index(image, contour)
        k = int(np.rint(idx[:, 2].mean()))
        off = float(np.abs(idx[:, 2] - k).max()) * spacing_z
        if off > tolerance_mm:
            raise ConversionError(f"{path}: ROI {roi.name!r} contour {n} lies {off:.3g} mm off the nearest CT "
                                  f"slice plane (tolerance {tolerance_mm:g} mm, see --plane-tolerance)")
        if not 0 <= k < nz:
            stats["outside"] += 1
            continue
        if idx[:, 0].min() < -0.5 or idx[:, 1].min() < -0.5 or idx[:, 0].max() > nx - 0.5 or idx[:, 1].max() > ny - 0.5:
            stats["clipped"] += 1
        by_slice.setdefault(k, []).append(idx[:, :2])
    mask = np.zeros((nz, ny, nx), bool)
    for k, polygons in by_slice.items():
        mask[k] = fill_polygons(polygons, (ny, nx))
    return mask, stats


# ------------------------------------------------------------------------------ ROI -> label

def sanitise(name: str) -> str:
    """A label name from an ROIName: runs of characters other than letters, digits, '_' and '-'
    become one '_' ("Parotid R" -> "Parotid_R")."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def load_roi_map(path: Path) -> dict[str, list[str]]:
    """``{label: [regex, ...]}`` from ``--roi-map`` (a value may be one regex or a list)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot be read as JSON ({e.__class__.__name__})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConversionError(f"{path}: expected a non-empty object {{\"label\": \"regex\"}}")
    out = {}
    for label, patterns in raw.items():
        patterns = [patterns] if isinstance(patterns, str) else patterns
        if label.lower() in RESERVED_LABELS or not re.fullmatch(r"[A-Za-z0-9_\-]+", label):
            raise ConversionError(f"{path}: label {label!r} is reserved or not made of letters, digits, '_', '-'")
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
            raise ConversionError(f"{path}: label {label!r}: expected a regex or a list of regexes")
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ConversionError(f"{path}: label {label!r}: bad regex {p!r} ({e})") from None
        out[label] = patterns
    return out


def label_of(roi: RoiData, roi_map: dict[str, list[str]] | None) -> str | None:
    """The label an ROI takes: the first label of ``roi_map`` with a regex fully matching ROIName
    (case-insensitive), or the sanitised name without a map (point-only ROIs take none)."""
    if roi_map is None:
        return None if roi.point_only else (sanitise(roi.name) or f"ROI{roi.number}")
    for label, patterns in roi_map.items():
        if any(re.fullmatch(p, roi.name, flags=re.IGNORECASE) for p in patterns):
            return label
    return None


def assign_rois(path: Path, rois: list[RoiData], roi_map) -> tuple[dict[str, RoiData], list[str]]:
    """``{label: ROI}`` and the names of ROIs left without label; two ROIs for one label are refused."""
    assigned: dict[str, RoiData] = {}
    unmatched = []
    for roi in rois:
        label = label_of(roi, roi_map)
        if label is None:
            if not roi.point_only:
                unmatched.append(roi.name)
            continue
        if label.lower() in RESERVED_LABELS:
            raise ConversionError(f"{path}: ROI {roi.name!r} is named like nnU-Net's {label!r} label; "
                                  "name it with --roi-map")
        if label in assigned:
            raise ConversionError(f"{path}: ROIs {assigned[label].name!r} and {roi.name!r} both map to label "
                                  f"{label!r}; make --roi-map tell them apart")
        assigned[label] = roi
    return assigned, unmatched


def _roi_labels(task) -> list[str]:
    case_dir, roi_map = task
    files = scan_case(case_dir, pixels=False)
    path, ds = files.rtstruct
    return list(assign_rois(path, read_rois(path, ds), roi_map)[0])


# ------------------------------------------------------------------------------ conversion

def discover(src: Path) -> list[Path]:
    if not src.is_dir():
        raise ConversionError(f"{src}: source folder not found")
    cases = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise ConversionError(f"{src}: no case folder inside")
    return cases


def _landmark_points(rois: list[RoiData]) -> list[tuple[str, np.ndarray]]:
    out = []
    for roi in rois:
        pts = [p for contour in roi.points for p in contour]
        out += [(roi.name if len(pts) == 1 else f"{roi.name}_{n}", p) for n, p in enumerate(pts, start=1)]
    return out


def _rasterise_labels(assigned, labels, image, tolerance, path):
    seg = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8 if max(labels.values()) < 256 else np.uint16)
    missing, overlaps, outside, clipped = [], {}, {}, {}
    for label, value in labels.items():
        if label in RESERVED_LABELS:
            continue
        if label not in assigned:
            missing.append(label)
            continue
        roi = assigned[label]
        if not roi.closed:
            raise ConversionError(f"{path}: ROI {roi.name!r} has no CLOSED_PLANAR contour (empty ROI; "
                                  "leave it out with --roi-map)")
        mask, stats = rasterise_roi(roi, image, tolerance, path)
        if not mask.any():
            raise ConversionError(f"{path}: ROI {roi.name!r} covers no voxel centre of the CT (empty ROI)")
        clash = mask & (seg > 0)
        if clash.any():
            overlaps[label] = int(clash.sum())
        seg[mask] = value
        for name, count in (("outside", outside), ("clipped", clipped)):
            if stats[name]:
                count[roi.name] = stats[name]
    return seg, {"missing": missing, "overlap_voxels": overlaps, "contours_outside_slices": outside,
                 "contours_clipped": clipped}


def _convert_case(task):
    case_dir, out, labels, roi_map, opts = task
    case = case_dir.name
    files = scan_case(case_dir)
    series_uid = select_series(files, opts["ct_series"])
    slices = files.ct[series_uid]
    paths = sort_slices(slices)
    image = read_ct(paths)
    rt_path, rt = files.rtstruct
    rois = read_rois(rt_path, rt)
    assigned, unmatched = assign_rois(rt_path, rois, roi_map)
    used = list(assigned.values()) + [r for r in rois if r.points and r not in assigned.values()]
    sops = {str(ds.get("SOPInstanceUID", "")) for _, ds in slices}
    check_references(rt_path, rt, used, (series_uid, str(slices[0][1].get("FrameOfReferenceUID", "")), sops))
    seg, found = _rasterise_labels(assigned, labels, image, opts["tolerance"], rt_path)
    record = {"case": case, "rtstruct": str(rt_path.relative_to(case_dir)), "ct_series": series_uid,
              "slices": len(paths), "rois": {label: roi.name for label, roi in assigned.items()},
              "unmatched_rois": unmatched, **found,
              "open_contours_skipped": {r.name: r.open_contours for r in rois if r.open_contours},
              "other_dicom_files": files.skipped, "action": "kept"}
    if found["missing"] and opts["missing"] == "drop":
        record["action"] = "dropped"
        return record
    if found["missing"] and opts["missing"] == "ignore":
        seg[seg == 0] = labels["ignore"]
        record["action"] = "kept, unannotated voxels set to the ignore label"
    elif found["missing"]:
        record["action"] = "kept, missing structures counted as background"
    points = _landmark_points([r for r in used if r.points])
    return write_case(out, case, image, seg, points, opts["file_ending"], record)


def _label_names(cases: list[Path], roi_map, run_cases) -> list[str]:
    if roi_map is not None:
        return list(roi_map)
    names: list[str] = []
    for found in run_cases(_roi_labels, [(c, None) for c in cases], desc="dicom-rt rois"):
        names += [n for n in found if n not in names]
    return names


def convert(src: Path, out: Path, args, run_cases) -> dict:
    """Write the nnU-Net raw dataset into ``out`` (a temporary folder the caller moves into place)."""
    if not args.plane_tolerance > 0:
        raise ConversionError(f"--plane-tolerance {args.plane_tolerance}: must be positive")
    roi_map = load_roi_map(args.roi_map) if args.roi_map is not None else None
    cases = discover(src)
    names = _label_names(cases, roi_map, run_cases)
    if not names:
        raise ConversionError(f"{src}: no RTSTRUCT has an ROI with contours")
    labels = {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}
    if args.missing == "ignore":
        labels["ignore"] = len(names) + 1
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    opts = {"missing": args.missing, "ct_series": args.ct_series, "tolerance": args.plane_tolerance,
            "file_ending": args.file_ending}
    records = run_cases(_convert_case, [(c, out, labels, roi_map, opts) for c in cases], desc="dicom-rt")
    kept = [r for r in records if r["action"] != "dropped"]
    if not kept:
        raise ConversionError(f"{src}: every case lacks an ROI for some label; try --missing ignore or --roi-map")
    extra = {"organmtl_landmarks": "landmarks"} if (out / "landmarks").is_dir() else {}
    return {"labels": labels, "channel_names": {"0": "CT"}, "num_training": len(kept), "cases": records,
            "dataset_json_extra": extra}


CONVERTER = SourceConverter("dicom-rt", "DICOM CT series + RTSTRUCT (radiotherapy contours)", add_arguments, convert)
