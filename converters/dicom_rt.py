"""DICOM CT series + RTSTRUCT (radiotherapy structure set) -> nnU-Net v2 raw dataset.

Layout read: ``SRC/<case>/`` holds, anywhere below it and under any file names, the slices of a CT
series (CT Image Storage, Modality ``CT``) and one or more RT Structure Sets (Modality
``RTSTRUCT``), as planning systems export them. Every other file is skipped and listed in the
report (``skipped_files``) without stopping the case: DICOMDIR, RTPLAN, RTDOSE, registration, SR,
secondary captures and other non-CT-slice SOP classes with Modality CT, CT localizers (ImageType
``LOCALIZER``), DICOM files without Modality, and non-DICOM files. Files are recognised by the
``DICM`` preamble; a ``.dcm`` file without it is read as a raw data set (``force=True``), and is
an error only when that fails too.

Several RTSTRUCTs in a case (re-contouring, copies): copies (same SOPInstanceUID) count once;
those referencing no CT series of the folder are set aside; of the rest ``--rtstruct-select``
chooses: ``newest`` (default: the latest StructureSetDate/StructureSetTime, then
InstanceCreationDate/Time, then SeriesDate/Time; a tie is an error), ``oldest``, ``only`` (refuse
several) or ``label=REGEX`` (the one whose StructureSetLabel fully matches). The others are
listed in the report (``source.other_rtstructs``).

CT: slices are sorted by their position along the slice normal (ImageOrientationPatient row x
column), never by file name or InstanceNumber, checked (one orientation and size, distinct and
evenly spaced positions along the normal) and read with SimpleITK's ImageSeriesReader, which
applies RescaleSlope/Intercept. Several CT series in one case are refused unless
``--ct-series referenced`` picks the one the RTSTRUCT references.

Contours: each CLOSED_PLANAR contour (ContourData, patient LPS mm) is mapped to continuous voxel
indices with the CT geometry (the inverse of index -> point, as SimpleITK's
``TransformPhysicalPointToContinuousIndex``), assigned to the nearest slice (every point must lie
within ``--plane-tolerance`` mm of that slice plane) and filled in (x, y) by :func:`fill_slice`: a
voxel is inside a contour when its centre is (:func:`fill_polygons`); contours of one ROI on one
slice that overlap without nesting are a union, and a contour nested inside another (containment
test on its vertices) is a hole, inside a hole an island again, and so on. POINT contours become
landmarks (``landmarks/<case>.json``); OPEN_* contours are counted and skipped. The RTSTRUCT must
reference the CT read (series, frame of reference, contour images).

Labels: ``--roi-map FILE.json`` ``{"label": "regex" | ["regex", ...]}`` (case-insensitive full
match on ROIName; ``"@tg263"`` stands for the label's synonyms in
:mod:`organmtl.converters.roi_synonyms`; an ROI takes the first label that matches, labels are
numbered in file order), or ``--roi-map tg263`` (every synonym-table structure found in some
case); without it every ROI with CLOSED_PLANAR contours, named by its sanitised ROIName, numbered
in order of first appearance over the cases. ROIs without CLOSED_PLANAR contour (empty
placeholders, POINT markers, open contours) are skipped with a note in that mode; an ROI that the
map asks for and that is empty, or covers no voxel centre, counts as missing. A label without ROI
in a case follows ``--missing`` (as pddca). Unmatched ROIs are listed in the report.

Paint order: labels are painted largest volume first (voxels), so enclosing ROIs (Body/External)
never erase the organs inside them; ``--priority LABEL ...`` paints the listed labels last, the
first listed on top. Overlaps are counted per label (``overlap_voxels``: voxels it took over), and
two ROIs overlapping without one containing the other by more than ``OVERLAP_WARN_FRACTION`` of
the smaller are warned about (``warnings``).
"""
from __future__ import annotations

import argparse
import json
import os
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
from organmtl.converters.roi_synonyms import SYNONYMS

POSITION_TOL_MM = 0.01          # slice positions: spacing regularity and drift off the normal
ORIENTATION_TOL = 1e-4          # direction cosines of different slices
INDEX_DECIMALS = 6              # contour indices are rounded to 1e-6 voxel before the fill
OVERLAP_WARN_FRACTION = 0.03    # warn when two non-nested ROIs share more than this of the smaller
RESERVED_LABELS = {"background", "ignore"}
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SYNONYM_TABLE = "tg263"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--roi-map", type=Path, metavar="FILE.json|tg263", default=None,
                        help='{"label": "regex" or [regexes] or "@tg263"}: case-insensitive full match on '
                             "ROIName; 'tg263': the built-in synonym table (default: every ROI with "
                             "contours, named by its sanitised ROIName)")
    parser.add_argument("--missing", choices=("drop", "ignore", "background"), default="drop",
                        help="what to do with cases lacking an ROI for a label (default: drop)")
    parser.add_argument("--ct-series", choices=("only", "referenced"), default="only",
                        help="several CT series in a case: refuse (only, default) or take the one "
                             "the RTSTRUCT references")
    parser.add_argument("--rtstruct-select", default="newest", metavar="newest|oldest|only|label=REGEX",
                        help="several RTSTRUCTs for one CT: the newest StructureSetDate/Time (default), the "
                             "oldest, refuse (only), or the one whose StructureSetLabel matches REGEX")
    parser.add_argument("--priority", nargs="+", metavar="LABEL", default=None,
                        help="labels painted last, the first listed on top (default: largest volume first)")
    parser.add_argument("--plane-tolerance", type=float, default=0.1, metavar="MM",
                        help="largest distance of a contour point from its CT slice plane (default 0.1 mm)")


# ------------------------------------------------------------------------------ reading DICOM

@dataclass
class CaseFiles:
    """The DICOM files of one case folder: CT slices by SeriesInstanceUID, the RTSTRUCTs (the
    chosen one in ``rtstruct``, the others with the reason in ``other_rtstructs``) and the skipped
    files with their reason."""

    folder: Path
    ct: dict[str, list[tuple[Path, pydicom.Dataset]]] = field(default_factory=dict)
    rtstructs: list[tuple[Path, pydicom.Dataset]] = field(default_factory=list)
    rtstruct: tuple[Path, pydicom.Dataset] | None = None
    other_rtstructs: list[tuple[Path, pydicom.Dataset, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def read_dicom(path: Path, pixels: bool) -> pydicom.Dataset | None:
    """A DICOM dataset, or ``None`` for a file without the DICM preamble that does not end in
    ``.dcm``; a ``.dcm`` file without preamble is read as a raw data set (``force=True``), and
    raises ConversionError only when that yields no DICOM data set either (nor SOPClassUID, nor
    Modality); a malformed file raises ConversionError."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=not pixels)
    except InvalidDicomError:
        if path.suffix.lower() != ".dcm":
            return None
    except Exception as e:  # pydicom raises many kinds on malformed elements
        raise ConversionError(f"{path}: corrupt DICOM ({e.__class__.__name__})") from None
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=True)
        if ds.get("SOPClassUID") or ds.get("Modality"):
            return ds
    except Exception:  # noqa: BLE001 - a forced read of a non-DICOM file fails in many ways
        pass
    raise ConversionError(f"{path}: not a DICOM file (no DICM preamble, and not readable as a raw DICOM data set)")


def _check_pixel_data(path: Path, ds: pydicom.Dataset) -> None:
    if "PixelData" not in ds:
        raise ConversionError(f"{path}: corrupt DICOM (no pixel data; truncated?)")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not syntax.is_compressed:
        try:
            need = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        except (AttributeError, TypeError, ValueError):
            raise ConversionError(f"{path}: CT slice without Rows/Columns/BitsAllocated") from None
        if len(ds.PixelData) < need:
            raise ConversionError(f"{path}: corrupt DICOM (pixel data {len(ds.PixelData)} of {need} bytes; truncated?)")


def classify(path: Path, ds: pydicom.Dataset | None) -> tuple[str, str]:
    """``("ct" | "rtstruct" | "skip", reason)`` for one file of a case folder."""
    if ds is None:
        return "skip", "not DICOM"
    try:
        meta = getattr(ds, "file_meta", None)
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        modality = str(ds.get("Modality", "")).strip().upper()
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    except Exception as e:  # noqa: BLE001 - pydicom parses elements lazily
        raise ConversionError(f"{path}: corrupt DICOM ({e.__class__.__name__})") from None
    if sop_class == MEDIA_STORAGE_DIRECTORY or path.name.upper() == "DICOMDIR":
        return "skip", "DICOMDIR (media directory)"
    if not modality:
        return "skip", "DICOM without Modality"
    if modality == "CT":
        if sop_class and sop_class != CT_IMAGE_STORAGE:
            return "skip", f"Modality CT but {pydicom.uid.UID(sop_class).name} (not a CT Image Storage slice)"
        if "LOCALIZER" in image_type:
            return "skip", "CT localizer (scout) image"
        return "ct", ""
    if modality == "RTSTRUCT":
        return "rtstruct", ""
    return "skip", f"{modality} object"


def scan_case(folder: Path, pixels: bool = True) -> CaseFiles:
    """Classify every file below ``folder`` (hidden files and folders skipped, sorted walk)."""
    files = CaseFiles(folder)
    paths = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for path in paths:
        ds = read_dicom(path, pixels)
        kind, reason = classify(path, ds)
        if kind == "ct":
            if pixels:
                _check_pixel_data(path, ds)
            files.ct.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
        elif kind == "rtstruct":
            files.rtstructs.append((path, ds))
        else:
            files.skipped.append((path, reason))
    if not files.ct:
        raise ConversionError(f"{folder}: no CT image files (DICOM with Modality CT) in the case folder")
    if not files.rtstructs:
        raise ConversionError(f"{folder}: no RTSTRUCT file (DICOM with Modality RTSTRUCT) in the case folder")
    return files


def _stamp(ds: pydicom.Dataset, date: str, time: str) -> tuple[str, str]:
    d = re.sub(r"\D", "", str(ds.get(date, "") or ""))[:8]
    t = str(ds.get(time, "") or "").replace(":", "").strip()
    main, _, frac = t.partition(".")
    return (d, (main.ljust(6, "0") + "." + frac.ljust(6, "0")) if d or main else "")


def structure_set_key(ds: pydicom.Dataset) -> tuple:
    """When a structure set was made: StructureSetDate/Time, then InstanceCreationDate/Time, then
    SeriesDate/Time (missing values sort first)."""
    return tuple(_stamp(ds, d, t) for d, t in (("StructureSetDate", "StructureSetTime"),
                                                ("InstanceCreationDate", "InstanceCreationTime"),
                                                ("SeriesDate", "SeriesTime")))


def choose_rtstruct(files: CaseFiles, rule: str) -> None:
    """Set ``files.rtstruct`` (and ``files.other_rtstructs``) by ``rule`` (see the module doc)."""
    unique, seen = [], {}
    for path, ds in files.rtstructs:
        sop = str(ds.get("SOPInstanceUID", "")) or str(path)
        if sop in seen:
            files.other_rtstructs.append((path, ds, f"copy of {seen[sop].name} (same SOPInstanceUID)"))
            continue
        seen[sop] = path
        unique.append((path, ds))
    present = set(files.ct)
    candidates = [(p, ds) for p, ds in unique if not (referenced_series(ds) - {""})
                  or (referenced_series(ds) - {""}) & present]            # an empty UID matches nothing
    if not candidates:
        candidates = unique                       # check_references names the mismatch
    candidate_ids = {id(ds) for _, ds in candidates}
    files.other_rtstructs += [(p, ds, "references no CT series of the case folder")
                              for p, ds in unique if id(ds) not in candidate_ids]
    if len(candidates) == 1:
        files.rtstruct = candidates[0]
        return
    names = ", ".join(p.name for p, _ in candidates)
    if rule == "only":
        raise ConversionError(f"{candidates[1][0]}: a second RTSTRUCT for the CT (also {candidates[0][0].name}); "
                              "keep one per case folder or pass --rtstruct-select newest|oldest|label=REGEX")
    if rule.startswith("label="):
        pattern = rule[len("label="):]
        chosen = [c for c in candidates
                  if re.fullmatch(pattern, str(c[1].get("StructureSetLabel", "")).strip(), flags=re.IGNORECASE)]
        if len(chosen) != 1:
            raise ConversionError(f"{files.folder}: {len(chosen)} of the RTSTRUCTs ({names}) have a StructureSetLabel "
                                  f"matching {pattern!r} (--rtstruct-select); exactly one must")
        reason = f"StructureSetLabel does not match {pattern!r}"
    else:
        ranked = sorted(candidates, key=lambda c: structure_set_key(c[1]), reverse=rule == "newest")
        if structure_set_key(ranked[0][1]) == structure_set_key(ranked[1][1]):
            raise ConversionError(f"{ranked[1][0]}: same StructureSetDate/Time as {ranked[0][0].name} "
                                  f"({'/'.join(structure_set_key(ranked[0][1])[0]) or 'none'}); choose one with "
                                  "--rtstruct-select label=REGEX")
        chosen, reason = ranked[:1], f"{'older' if rule == 'newest' else 'newer'} (--rtstruct-select {rule})"
    files.rtstruct = chosen[0]
    files.other_rtstructs += [(c[0], c[1], reason) for c in candidates if c is not chosen[0]]


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
        chosen = [u for u in uids if u and u in referenced_series(files.rtstruct[1])]   # empty matches nothing
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


def _inside(points: np.ndarray, polygon: np.ndarray, tol: float = 1e-3) -> np.ndarray:
    """Points (N, 2) inside ``polygon`` (M, 2) by the crossing rule, or within ``tol`` of its edges."""
    px, py = points[:, :1], points[:, 1:]
    x0, y0 = polygon[:, 0][None], polygon[:, 1][None]
    x1, y1 = np.roll(x0, -1, axis=1), np.roll(y0, -1, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crosses = ((y0 > py) != (y1 > py)) & (px < x0 + (py - y0) * (x1 - x0) / (y1 - y0))
        ex, ey = x1 - x0, y1 - y0
        t = np.clip(((px - x0) * ex + (py - y0) * ey) / (ex * ex + ey * ey), 0, 1)
    t = np.nan_to_num(t)
    near = np.hypot(x0 + t * ex - px, y0 + t * ey - py).min(axis=1) <= tol
    return (crosses.sum(axis=1) % 2 == 1) | near


def nesting_depths(polygons: list[np.ndarray]) -> list[int]:
    """For each polygon (continuous (x, y) indices) the number of other polygons containing it:
    ``a`` contains ``b`` when every vertex of ``b`` lies inside or on ``a`` and ``a`` is larger."""
    boxes = [(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()) for p in polygons]
    areas = [abs(float(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1)))) / 2
             for p in polygons]
    depths = [0] * len(polygons)
    for i, inner in enumerate(polygons):
        for j, outer in enumerate(polygons):
            bi, bj = boxes[i], boxes[j]
            if i == j or areas[j] <= areas[i] or bi[0] < bj[0] - 1e-3 or bi[1] < bj[1] - 1e-3 \
                    or bi[2] > bj[2] + 1e-3 or bi[3] > bj[3] + 1e-3:
                continue
            if _inside(inner, outer).all():
                depths[i] += 1
    return depths


def fill_slice(polygons, shape_yx) -> np.ndarray:
    """One ROI's contours on one slice as a bool (ny, nx) mask: contours that overlap without
    nesting are a union; a contour inside another (:func:`nesting_depths`) cuts a hole, one inside
    a hole fills again (depth 0 filled, 1 removed, 2 filled, ...). Each contour is filled by
    :func:`fill_polygons`, so a single contour and disjoint contours give the same voxels as the
    even-odd rule."""
    polygons = [np.round(np.asarray(p, float)[:, :2], INDEX_DECIMALS) for p in polygons]
    if len(polygons) == 1:
        return fill_polygons(polygons, shape_yx)
    depths = nesting_depths(polygons)
    out = np.zeros(shape_yx, bool)
    for d in sorted(set(depths)):
        layer = np.logical_or.reduce([fill_polygons([p], shape_yx) for p, dp in zip(polygons, depths) if dp == d])
        out = out | layer if d % 2 == 0 else out & ~layer
    return out


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
        mask[k] = fill_slice(polygons, (ny, nx))
    return mask, stats


# ------------------------------------------------------------------------------ ROI -> label

def sanitise(name: str) -> str:
    """A label name from an ROIName: runs of characters other than letters, digits, '_' and '-'
    become one '_' ("Parotid R" -> "Parotid_R")."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")


def load_roi_map(path: Path) -> dict[str, list[str]]:
    """``{label: [regex, ...]}`` from ``--roi-map`` (a value may be one regex or a list; ``"@tg263"``
    stands for the label's patterns in the synonym table); ``tg263`` gives the whole table."""
    if str(path) == SYNONYM_TABLE and not Path(path).exists():
        return {label: list(patterns) for label, patterns in SYNONYMS.items()}
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
        expanded = []
        for p in patterns:
            if p == f"@{SYNONYM_TABLE}":
                if label not in SYNONYMS:
                    raise ConversionError(f"{path}: label {label!r}: not in the {SYNONYM_TABLE} synonym table "
                                          "(see docs/converters.md, ROI synonyms)")
                expanded += SYNONYMS[label]
                continue
            try:
                re.compile(p)
            except re.error as e:
                raise ConversionError(f"{path}: label {label!r}: bad regex {p!r} ({e})") from None
            expanded.append(p)
        out[label] = expanded
    return out


def label_of(roi: RoiData, roi_map: dict[str, list[str]] | None) -> str | None:
    """The label an ROI takes: the first label of ``roi_map`` with a regex fully matching ROIName
    (case-insensitive), or without a map the sanitised name of an ROI with CLOSED_PLANAR contours."""
    if roi_map is None:
        return (sanitise(roi.name) or f"ROI{roi.number}") if roi.closed else None
    for label, patterns in roi_map.items():
        if any(re.fullmatch(p, roi.name, flags=re.IGNORECASE) for p in patterns):
            return label
    return None


def assign_rois(path: Path, rois: list[RoiData], roi_map) -> tuple[dict[str, RoiData], list[str], list[str]]:
    """``{label: ROI}``, the names of ROIs left without label, and notes on ROIs skipped for having
    no CLOSED_PLANAR contour (every-ROI mode); two ROIs for one label are refused."""
    assigned: dict[str, RoiData] = {}
    unmatched, notes = [], []
    for roi in rois:
        label = label_of(roi, roi_map)
        if label is None:
            if roi_map is None and not roi.point_only:
                what = f"{roi.open_contours} open contour(s) only" if roi.open_contours else "no contour"
                notes.append(f"ROI {roi.name!r} skipped: no CLOSED_PLANAR contour ({what})")
            elif roi_map is not None and not roi.point_only:
                unmatched.append(roi.name)
            continue
        if label.lower() in RESERVED_LABELS:
            raise ConversionError(f"{path}: ROI {roi.name!r} is named like nnU-Net's {label!r} label; "
                                  "name it with --roi-map")
        if label in assigned:
            raise ConversionError(f"{path}: ROIs {assigned[label].name!r} and {roi.name!r} both map to label "
                                  f"{label!r}; make --roi-map tell them apart")
        assigned[label] = roi
    return assigned, unmatched, notes


def _roi_labels(task) -> list[str]:
    case_dir, roi_map, rule = task
    files = scan_case(case_dir, pixels=False)
    choose_rtstruct(files, rule)
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


@dataclass
class _Mask:
    """One label's voxels, kept as the bounding box (slices) and the mask cropped to it."""

    label: str
    value: int
    box: tuple[slice, slice, slice]
    crop: np.ndarray

    @property
    def volume(self) -> int:
        return int(self.crop.sum())


def _crop(mask: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    box = tuple(slice(int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))).min()),
                      int(np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))).max()) + 1)
                for ax in range(3))
    return box, mask[box].copy()


def _overlap(a: _Mask, b: _Mask) -> int:
    box = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a.box, b.box))
    if any(s.start >= s.stop for s in box):
        return 0
    rel = lambda m: tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(box, m.box))  # noqa: E731
    return int((a.crop[rel(a)] & b.crop[rel(b)]).sum())


def paint_order(masks: list[_Mask], priority: list[str] | None) -> list[_Mask]:
    """Largest volume first (enclosing ROIs under the organs), then the ``priority`` labels, the
    first listed last (on top)."""
    priority = priority or []
    rest = sorted((m for m in masks if m.label not in priority), key=lambda m: -m.volume)
    ranked = {label: n for n, label in enumerate(priority)}
    return rest + sorted((m for m in masks if m.label in ranked), key=lambda m: -ranked[m.label])


def paint(shape, dtype, masks: list[_Mask], priority) -> tuple[np.ndarray, dict, list[str]]:
    """The label map (later in :func:`paint_order` wins), ``{label: voxels taken over}`` and
    warnings for ROI pairs that overlap by more than OVERLAP_WARN_FRACTION of the smaller without
    one containing the other."""
    seg = np.zeros(shape, dtype)
    order = paint_order(masks, priority)
    overlaps, warnings = {}, []
    for n, m in enumerate(order):
        clash = int((seg[m.box][m.crop] > 0).sum())
        if clash:
            overlaps[m.label] = clash
        seg[m.box][m.crop] = m.value
        for earlier in order[:n]:
            shared = _overlap(earlier, m)
            small = min(earlier.volume, m.volume)
            if shared and shared != small and shared > OVERLAP_WARN_FRACTION * small:
                smaller = earlier.label if earlier.volume <= m.volume else m.label
                warnings.append(f"{earlier.label!r} and {m.label!r} overlap by {shared} voxels "
                                f"({100 * shared / small:.1f}% of {smaller!r}) without one containing the other; "
                                f"{m.label!r} is painted over {earlier.label!r} (see --priority)")
    return seg, overlaps, warnings


def _rasterise_labels(assigned, labels, image, opts, path):
    shape = sitk.GetArrayViewFromImage(image).shape
    missing, outside, clipped, notes, masks = [], {}, {}, [], []
    for label, value in labels.items():
        if label in RESERVED_LABELS:
            continue
        if label not in assigned:
            missing.append(label)
            continue
        roi = assigned[label]
        if not roi.closed:
            missing.append(label)
            notes.append(f"ROI {roi.name!r} (label {label!r}) has no CLOSED_PLANAR contour: counted as missing")
            continue
        mask, stats = rasterise_roi(roi, image, opts["tolerance"], path)
        for name, count in (("outside", outside), ("clipped", clipped)):
            if stats[name]:
                count[roi.name] = stats[name]
        if not mask.any():
            missing.append(label)
            notes.append(f"ROI {roi.name!r} (label {label!r}) covers no voxel centre of the CT: counted as missing")
            continue
        masks.append(_Mask(label, value, *_crop(mask)))
        del mask
    seg, overlaps, warnings = paint(shape, np.uint8 if max(labels.values()) < 256 else np.uint16, masks,
                                    opts["priority"])
    return seg, {"missing": missing, "overlap_voxels": overlaps, "contours_outside_slices": outside,
                 "contours_clipped": clipped, "paint_order": [m.label for m in paint_order(masks, opts["priority"])],
                 "warnings": warnings}, notes


def _source_record(files: CaseFiles, slices, paths: list[Path]) -> dict:
    """Where a case came from (conversion_report.json ``source``; docs/converters.md)."""
    by_path = {p: ds for p, ds in slices}
    ct_folder = Path(os.path.commonpath([str(p.parent) for p in paths])).resolve()
    first = by_path[paths[0]]
    rt_path, rt = files.rtstruct

    def rt_entry(path, ds):
        key = structure_set_key(ds)[0]
        return {"file": str(path.resolve()), "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
                "structure_set_label": str(ds.get("StructureSetLabel", "")),
                "structure_set_date": key[0], "structure_set_time": str(ds.get("StructureSetTime", "") or "")}

    chosen = rt_entry(rt_path, rt)
    return {"case_folder": str(files.folder.resolve()), "ct_series_folder": str(ct_folder),
            "ct_files": [str(p.resolve().relative_to(ct_folder)) for p in paths],
            "sop_instance_uids": [str(by_path[p].get("SOPInstanceUID", "")) for p in paths],
            "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
            "study_instance_uid": str(first.get("StudyInstanceUID", "")),
            "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
            "rtstruct_file": chosen["file"], "rtstruct_sop_instance_uid": chosen["sop_instance_uid"],
            "structure_set_label": chosen["structure_set_label"],
            "structure_set_date": chosen["structure_set_date"], "structure_set_time": chosen["structure_set_time"],
            "other_rtstructs": [{**rt_entry(p, ds), "reason": why} for p, ds, why in files.other_rtstructs]}


def _convert_case(task):
    case_dir, out, labels, roi_map, opts = task
    case = case_dir.name
    files = scan_case(case_dir)
    choose_rtstruct(files, opts["rtstruct_select"])
    series_uid = select_series(files, opts["ct_series"])
    slices = files.ct[series_uid]
    paths = sort_slices(slices)
    image = read_ct(paths)
    rt_path, rt = files.rtstruct
    rois = read_rois(rt_path, rt)
    assigned, unmatched, notes = assign_rois(rt_path, rois, roi_map)
    used = list(assigned.values()) + [r for r in rois if r.points and r not in assigned.values()]
    sops = {str(ds.get("SOPInstanceUID", "")) for _, ds in slices}
    check_references(rt_path, rt, used, (series_uid, str(slices[0][1].get("FrameOfReferenceUID", "")), sops))
    seg, found, empty_notes = _rasterise_labels(assigned, labels, image, opts, rt_path)
    notes += empty_notes
    notes += [f"RTSTRUCT {Path(p).name} not used: {why}" for p, _, why in files.other_rtstructs]
    record = {"case": case, "rtstruct": str(rt_path.relative_to(case_dir)), "ct_series": series_uid,
              "slices": len(paths), "rois": {label: roi.name for label, roi in assigned.items()},
              "unmatched_rois": unmatched, **found,
              "open_contours_skipped": {r.name: r.open_contours for r in rois if r.open_contours},
              "other_dicom_files": len([1 for _, why in files.skipped if why != "not DICOM"]),
              "skipped_files": [{"file": str(p.relative_to(case_dir)), "reason": why} for p, why in files.skipped],
              "notes": notes, "source": _source_record(files, slices, paths), "action": "kept"}
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


def _case_of(task) -> str:
    return task[0].name


def _label_names(cases: list[Path], roi_map, args, run_cases) -> list[str]:
    """The labels: the map's (in file order), the synonym table's found in some case (table
    order), or every ROI name with contours in order of first appearance."""
    whole_table = roi_map is not None and str(args.roi_map) == SYNONYM_TABLE and not Path(args.roi_map).exists()
    if roi_map is not None and not whole_table:
        return list(roi_map)
    names: list[str] = []
    for found in run_cases(_roi_labels, [(c, roi_map, args.rtstruct_select) for c in cases], desc="dicom-rt rois",
                           case=_case_of):
        names += [n for n in found if n not in names]
    return [n for n in roi_map if n in names] if whole_table else names


def _check_options(args) -> None:
    if not args.plane_tolerance > 0:
        raise ConversionError(f"--plane-tolerance {args.plane_tolerance}: must be positive")
    rule = args.rtstruct_select
    if rule not in ("newest", "oldest", "only") and not rule.startswith("label="):
        raise ConversionError(f"--rtstruct-select {rule!r}: use newest, oldest, only or label=REGEX")
    if rule.startswith("label="):
        try:
            re.compile(rule[len("label="):])
        except re.error as e:
            raise ConversionError(f"--rtstruct-select {rule!r}: bad regex ({e})") from None


def convert(src: Path, out: Path, args, run_cases) -> dict:
    """Write the nnU-Net raw dataset into ``out`` (a temporary folder the caller moves into place)."""
    _check_options(args)
    roi_map = load_roi_map(args.roi_map) if args.roi_map is not None else None
    cases = discover(src)
    names = _label_names(cases, roi_map, args, run_cases)
    if not names:
        raise ConversionError(f"{src}: no RTSTRUCT has an ROI with contours"
                              + (" matching --roi-map" if roi_map is not None else ""))
    labels = {"background": 0, **{n: i for i, n in enumerate(names, start=1)}}
    for label in args.priority or []:
        if label not in names:
            raise ConversionError(f"--priority {label}: not a label (labels: {', '.join(names)})")
    if args.missing == "ignore":
        labels["ignore"] = len(names) + 1
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    opts = {"missing": args.missing, "ct_series": args.ct_series, "tolerance": args.plane_tolerance,
            "file_ending": args.file_ending, "rtstruct_select": args.rtstruct_select, "priority": args.priority}
    records = run_cases(_convert_case, [(c, out, labels, roi_map, opts) for c in cases], desc="dicom-rt",
                        case=_case_of)
    kept = [r for r in records if r["action"] != "dropped"]
    if not kept:
        raise ConversionError(f"{src}: every case lacks an ROI for some label; try --missing ignore or --roi-map")
    extra = {"organmtl_landmarks": "landmarks"} if (out / "landmarks").is_dir() else {}
    return {"labels": labels, "channel_names": {"0": "CT"}, "num_training": len(kept), "cases": records,
            "dataset_json_extra": extra}


CONVERTER = SourceConverter("dicom-rt", "DICOM CT series + RTSTRUCT (radiotherapy contours)", add_arguments, convert)
