"""Predictions back to the clinic: nnU-Net label maps -> DICOM RT Structure Set or DICOM Segmentation
on the CT series they were predicted from (``organmtl export rtstruct|seg``, docs/export.md).

The CT: the slices of one CT series below ``--dicom`` (other files, modalities, SOP classes and CT
localizers are skipped, as :func:`organmtl.converters.dicom_rt.classify` tells them), sorted
along the slice normal and checked by :func:`organmtl.converters.dicom_rt.sort_slices` (one
orientation and size, evenly spaced). Its grid: origin = ImagePositionPatient of the first slice,
direction = (row, column, normal) cosines of ImageOrientationPatient, spacing = (PixelSpacing[1],
PixelSpacing[0], slice gap), as SimpleITK's series reader builds it.

Geometry rule: the prediction must lie on that grid: same size, and every corner voxel centre of the
prediction within ``GRID_TOL_VOXELS`` of the smallest CT spacing of the CT's (NIfTI stores float32
geometry; a prediction of the CT converted by ``organmtl convert dicom-rt`` passes). Otherwise the
export stops with a one-line error, unless ``--resample`` is given: then the prediction is
resampled onto the CT grid with nearest neighbour (labels stay labels; thin structures may shrink).

RTSTRUCT (built with pydicom; highdicom writes no RT Structure Sets): patient and study copied from
the CT, a new series; ReferencedFrameOfReferenceSequence names the CT's FrameOfReferenceUID, study
and series with every slice in ContourImageSequence; one ROI per label present in the prediction
(ROINumber = label value, ROIName from dataset.json, distinct ROIDisplayColor, generation algorithm
AUTOMATIC); per slice and label, CLOSED_PLANAR contours in patient coordinates (LPS mm) on that
slice's own ImagePositionPatient, each referencing its slice's SOPInstanceUID. Contours come from
:func:`skimage.measure.find_contours` at level 0.6 of the mask: they run 0.4 voxel outside the
centres of the boundary voxels, so both kinds of reader give the mask back: those testing voxel
centres against the polygon (organmtl convert dicom-rt, skimage/matplotlib based ones: margins of
0.4 and 0.6 voxel) and those rounding vertices to the nearest voxel and filling with the boundary
(OpenCV based ones such as rt-utils: 0.4 rounds to the boundary voxel). The price: the polygon
area is smaller than the voxel count by about 0.1 voxel per voxel of perimeter (a 10 x 10 voxel
square: 9.8 x 9.8). Regions touching only at a corner get separate contours. A hole is a
separate contour nested inside its outer contour (an island in a hole nests one level deeper),
the even-odd / nesting convention readers use.

SEG (built with highdicom): one BINARY segment per label present, label names as segment labels,
category "Anatomical Structure" and type "Organ" (SNOMED CT) for every segment, algorithm type
AUTOMATIC; frames reference their CT slices.

UIDs: the export references the CT only through its own UIDs, so CT slices with an empty or absent
SOP/Study/Series Instance UID or FrameOfReferenceUID (anonymisers that blank UIDs) are refused
(:func:`check_uids`): new UIDs would reference no image a planning system holds. Before writing,
:func:`verify_references` checks the built file: no empty UID, every referenced image a slice of
the CT, frame of reference, study and referenced series the CT's.

Folder mode (PRED a folder, e.g. an ``nnUNetv2_predict`` output): one ``OUT/<case>.dcm`` per
prediction file; each case's CT folder comes from the conversion report (``--conversion-report``,
by default found through PRED/predict_from_raw_data_args.json: the input folder's dataset's
conversion_report.json) or, failing that, ``--dicom ROOT/<case>``. A bad case is reported on
stderr and in ``OUT/export_report.json`` and does not stop the others (exit 1 when some failed).
Every file is written to a temporary name beside its target and renamed: nothing half-written.
"""
from __future__ import annotations

import argparse
import colorsys
import datetime
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from organmtl.converters.common import IMAGE_SUFFIXES, ConversionError, read_image, strip_image_suffix
from organmtl.converters.dicom_rt import classify, read_dicom, sort_slices

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT_SOP = "1.2.840.10008.3.1.2.3.1"   # RTReferencedStudySequence's ReferencedSOPClassUID (PS3.3 C.8.8.5)
GRID_TOL_VOXELS = 0.05       # largest corner-centre offset prediction vs CT, in units of the smallest CT spacing
CONTOUR_LEVEL = 0.6          # contours 0.4 voxel outside boundary voxel centres (see module docstring)
TRAILING_ZEROS = re.compile(r"\.?0+(?=\\|$)")     # "12.5000" -> "12.5", "3.0000" -> "3"
CONTOUR_DATA = 0x30060050    # (3006,0050) ContourData
COORD_DECIMALS = 4           # ContourData in mm rounded to 0.1 um (DS values stay well under 16 characters)
SOFTWARE = "organmtl"
EXIT_OK, EXIT_PARTIAL, EXIT_NONE = 0, 1, 2
KINDS = ("rtstruct", "seg")
NOT_EXPORTED = {"background", "ignore"}


# ------------------------------------------------------------------------------ the CT series

@dataclass
class CtSeries:
    """One CT series' slice headers, sorted along the normal, and the grid they span."""

    folder: Path
    slices: list[pydicom.Dataset]         # headers (no pixel data), slice k = k-th along the normal
    positions: np.ndarray                  # (nz, 3) ImagePositionPatient, LPS mm
    row: np.ndarray                        # direction of increasing column index (x)
    col: np.ndarray                        # direction of increasing row index (y)
    spacing: tuple[float, float, float]    # x, y, z in mm

    @property
    def size(self) -> tuple[int, int, int]:
        return int(self.slices[0].Columns), int(self.slices[0].Rows), len(self.slices)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.positions[0])

    @property
    def direction(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.stack([self.row, self.col, self.normal], axis=1).ravel())

    @property
    def series_uid(self) -> str:
        return str(self.slices[0].SeriesInstanceUID)

    @property
    def frame_uid(self) -> str:
        return str(self.slices[0].get("FrameOfReferenceUID", ""))

    def reference_image(self) -> sitk.Image:
        """An empty image on the CT grid (the target of ``--resample``)."""
        image = sitk.Image(list(self.size), sitk.sitkUInt8)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image

    def to_patient(self, k: int, xy: np.ndarray) -> np.ndarray:
        """LPS mm (N, 3) of continuous in-plane indices ``(x = column, y = row)`` on slice ``k``."""
        xy = np.asarray(xy, float)
        return (self.positions[k] + xy[:, :1] * (self.spacing[0] * self.row)
                + xy[:, 1:2] * (self.spacing[1] * self.col))


CT_UIDS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")


def check_uids(slices: list[tuple[Path, pydicom.Dataset]]) -> None:
    """Refuse CT slices without the UIDs an RTSTRUCT or SEG must reference (``CT_UIDS``: empty, as
    anonymisers that blank UIDs leave them, or absent) or sharing a SOPInstanceUID: new UIDs
    written in their place would reference no image a planning system or PACS holds."""
    seen: dict[str, Path] = {}
    for path, ds in slices:
        for keyword in CT_UIDS:
            if not str(ds.get(keyword, "") or "").strip():
                raise ConversionError(
                    f"{path}: CT slice with {'an empty' if keyword in ds else 'no'} {keyword} (blanked by "
                    "de-identification?); the export must reference the CT's own UIDs: give the series UIDs "
                    "(de-identify by replacing them, not blanking) and export again")
        sop = str(ds.SOPInstanceUID)
        if sop in seen:
            raise ConversionError(f"{path}: SOPInstanceUID {sop} is also that of {seen[sop]} (one slice copied "
                                  "twice, or UIDs replaced by one value?)")
        seen[sop] = path


def load_ct(folder: Path, series_uid: str | None = None) -> CtSeries:
    """The CT series below ``folder`` (``series_uid`` picks one of several)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: CT folder not found")
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in sorted(p for p in folder.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)):
        ds = read_dicom(path, pixels=False)
        if classify(path, ds)[0] == "ct":            # CT Image Storage slices; scouts, RTSTRUCTs, ... skipped
            series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if not series:
        raise ConversionError(f"{folder}: no CT image files (DICOM with Modality CT) in the folder")
    if series_uid is not None:
        if series_uid not in series:
            raise ConversionError(f"{folder}: no CT series {series_uid} (found {', '.join(sorted(series))})")
        slices = series[series_uid]
    elif len(series) > 1:
        raise ConversionError(f"{folder}: {len(series)} CT series ({', '.join(sorted(series)[:3])}); "
                              "pick one with --series-uid")
    else:
        slices = next(iter(series.values()))
    check_uids(slices)
    order = {p: ds for p, ds in slices}
    headers = [order[p] for p in sort_slices(slices)]
    for keyword in ("FrameOfReferenceUID", "StudyInstanceUID"):
        if len({str(ds.get(keyword, "")) for ds in headers}) != 1:
            raise ConversionError(f"{folder}: CT slices without one common {keyword}")
    iop = np.asarray([float(v) for v in headers[0].ImageOrientationPatient])
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    row, col = iop[:3], iop[3:]
    gap = float((positions[-1] - positions[0]) @ np.cross(row, col)) / (len(headers) - 1)
    pixel_spacing = [float(v) for v in headers[0].PixelSpacing]
    return CtSeries(folder, headers, positions, row, col, (pixel_spacing[1], pixel_spacing[0], gap))


# ------------------------------------------------------------------------------ the prediction

def read_labels(dataset_json: Path | None) -> dict[int, str] | None:
    """``{value: name}`` of the labels to export from an nnU-Net dataset.json (``None``: no file)."""
    if dataset_json is None:
        return None
    try:
        labels = json.loads(Path(dataset_json).read_text())["labels"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{dataset_json}: not an nnU-Net dataset.json with 'labels' "
                              f"({e.__class__.__name__})") from None
    out = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise ConversionError(f"{dataset_json}: label {name!r} is a region ({value}); region-based "
                                  "predictions cannot be exported (one label value per ROI needed)")
        if not isinstance(value, int) or value < 0:
            raise ConversionError(f"{dataset_json}: label {name!r} has value {value!r}, not a non-negative integer")
        if name.lower() not in NOT_EXPORTED:
            if len(name) > 64 or re.search(r"[\\\x00-\x1f]", name):
                raise ConversionError(f"{dataset_json}: label name {name!r} cannot be a DICOM ROIName / segment "
                                      "label (LO: at most 64 characters, no backslash or control character)")
            out[value] = name
    return out


def _grid_offset(pred: sitk.Image, ct: CtSeries) -> float:
    """Largest distance (mm) between the prediction's and the CT's centres of the eight corner voxels."""
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    corners *= np.asarray(ct.size, float) - 1

    def points(origin, spacing, direction):
        d = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)
        return np.asarray(origin, float) + corners @ d.T

    return float(np.abs(points(pred.GetOrigin(), pred.GetSpacing(), pred.GetDirection())
                        - points(ct.origin, ct.spacing, ct.direction)).max())


def read_prediction(path: Path, ct: CtSeries, labels: dict[int, str] | None,
                    resample: bool) -> tuple[np.ndarray, dict[int, str], bool]:
    """The label map (z, y, x) on the CT grid, ``{value: name}`` of the labels it holds, and whether
    it was resampled."""
    image = read_image(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"{path}: expected a 3D one-channel label map, got {image.GetDimension()}D with "
                              f"{image.GetNumberOfComponentsPerPixel()} component(s)")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        raise ConversionError(f"{path}: voxel type {image.GetPixelIDTypeAsString()}; expected an integer label map")
    tol = GRID_TOL_VOXELS * min(ct.spacing)
    on_grid = image.GetSize() == ct.size and _grid_offset(image, ct) <= tol
    if not on_grid and not resample:
        if image.GetSize() != ct.size:
            what = f"size {image.GetSize()} vs the CT's {ct.size}"
        else:
            what = f"voxel centres up to {_grid_offset(image, ct):.3g} mm off the CT's (tolerance {tol:.3g} mm)"
        raise ConversionError(f"{path}: not on the grid of the CT series in {ct.folder} ({what}); "
                              "pass --resample to resample it with nearest neighbour")
    if not on_grid:
        image = sitk.Resample(image, ct.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              image.GetPixelID())
    seg = sitk.GetArrayFromImage(image)
    values = [int(v) for v in np.unique(seg) if v != 0]
    if labels is None:
        if values and min(values) < 0:
            raise ConversionError(f"{path}: negative label value {min(values)}")
        present = {v: f"label_{v}" for v in values}
    else:
        unknown = [v for v in values if v not in labels]
        if unknown:
            raise ConversionError(f"{path}: label value {unknown[0]} is not a label of the dataset.json")
        present = {v: labels[v] for v in values}
    return seg, present, not on_grid


# ------------------------------------------------------------------------------ mask -> contours

def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(x, y)`` in voxel indices around the True voxels of a 2D mask (y, x).

    :func:`skimage.measure.find_contours` at level ``CONTOUR_LEVEL`` of the zero-padded mask: each
    contour runs ``1 - CONTOUR_LEVEL`` voxel outside the centres of the region's boundary voxels
    (just inside the voxel edges), outer and hole boundaries as separate non-touching polygons;
    vertices on a straight run dropped (their neighbours' edges turn by nothing).
    """
    from skimage import measure

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    y0, x0 = int(rows[0]), int(cols[0])
    crop = np.pad(mask[y0:int(rows[-1]) + 1, x0:int(cols[-1]) + 1], 1).astype(np.float32)
    out = []
    for contour in measure.find_contours(crop, CONTOUR_LEVEL):
        contour = contour[:-1]                                # closed: the last vertex repeats the first
        before, after = np.roll(contour, 1, axis=0), np.roll(contour, -1, axis=0)
        turn = ((contour[:, 0] - before[:, 0]) * (after[:, 1] - contour[:, 1])
                - (contour[:, 1] - before[:, 1]) * (after[:, 0] - contour[:, 0]))
        out.append((contour[np.abs(turn) > 1e-9] + (y0 - 1, x0 - 1))[:, ::-1])
    return out


def label_contours(seg: np.ndarray, value: int, box: tuple[slice, ...] | None = None) -> list[tuple[int, np.ndarray]]:
    """``(slice k, contour (x, y))`` for every slice holding voxels of ``value``; ``box``: the
    label's bounding box (``scipy.ndimage.find_objects``), to look inside it only."""
    box = box or (slice(None),) * 3
    z0, y0, x0 = (b.start or 0 for b in box)
    mask = seg[box] == value
    return [(z0 + int(k), c + (x0, y0)) for k in np.flatnonzero(mask.any(axis=(1, 2)))
            for c in slice_contours(mask[k])]


def label_boxes(seg: np.ndarray) -> tuple[dict[int, tuple[slice, ...]], np.ndarray]:
    """Bounding box of each label value present and the voxel count of every value."""
    from scipy import ndimage

    boxes = {v: b for v, b in enumerate(ndimage.find_objects(seg), start=1)
             if b is not None}
    return boxes, np.bincount(seg.ravel().astype(np.int64, copy=False))


def colours(n: int) -> list[list[int]]:
    """``n`` distinct RGB colours: hues stepped by the golden angle (bright, saturated)."""
    out: list[list[int]] = []
    i = 0
    while len(out) < n:
        hue = (0.0 + i * 0.6180339887) % 1.0
        value = 0.95 if (i // 7) % 2 == 0 else 0.75
        rgb = [int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, 0.8, value)]
        if rgb not in out:
            out.append(rgb)
        i += 1
    return out


# ------------------------------------------------------------------------------ RTSTRUCT

def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _copy_patient_study(ds: Dataset, ct: pydicom.Dataset) -> None:
    for keyword in PATIENT_STUDY:
        setattr(ds, keyword, ct.get(keyword, ""))


def _image_ref(ct_slice: pydicom.Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ct_slice.SOPClassUID
    ref.ReferencedSOPInstanceUID = ct_slice.SOPInstanceUID
    return ref


def _referenced_frame(ct: CtSeries) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = ct.series_uid
    series.ContourImageSequence = Sequence([_image_ref(s) for s in ct.slices])
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT_SOP
    study.ReferencedSOPInstanceUID = ct.slices[0].StudyInstanceUID
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = ct.frame_uid
    frame.RTReferencedStudySequence = Sequence([study])
    return frame


def _contour_item(ct: CtSeries, k: int, xy: np.ndarray) -> Dataset:
    item = Dataset()
    item.ContourImageSequence = Sequence([_image_ref(ct.slices[k])])
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(xy)
    item[CONTOUR_DATA] = ds_element(CONTOUR_DATA, ct.to_patient(k, xy).ravel())
    return item


def ds_element(tag: int, values: np.ndarray) -> RawDataElement:
    """A DS element of many numbers, rounded to ``COORD_DECIMALS`` and encoded once: the value as
    pydicom would write it, without a validated DSfloat per number (the RTSTRUCT's hot spot)."""
    values = (np.round(np.asarray(values, float), COORD_DECIMALS) + 0.0).tolist()
    text = "\\".join([f"%.{COORD_DECIMALS}f"] * len(values)) % tuple(values)
    raw = TRAILING_ZEROS.sub("", text).encode("ascii")
    raw += b" " * (len(raw) % 2)                          # even length, padded with a space (PS3.5 6.2)
    return RawDataElement(Tag(tag), "DS", len(raw), raw, 0, True, True)


def build_rtstruct(ct: CtSeries, seg: np.ndarray, labels: dict[int, str]) -> tuple[Dataset, dict]:
    """The RT Structure Set of label map ``seg`` (z, y, x on the CT grid) and counts per ROI."""
    first = ct.slices[0]
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RT_STRUCTURE_SET_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian     # 32-bit lengths: a long contour's ContourData stays DS
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    date, time = _now()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RT_STRUCTURE_SET_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    _copy_patient_study(ds, first)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(first.get("SeriesNumber", 0) or 0) + 1000
    ds.SeriesDescription = "organmtl prediction"
    ds.OperatorsName = ""
    ds.Manufacturer = SOFTWARE
    ds.SoftwareVersions = _version()
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "organmtl"
    ds.StructureSetName = "prediction"
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.FrameOfReferenceUID = ct.frame_uid                     # Frame of Reference module (PS3.3 C.7.4.1)
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame(ct)])
    structure_set, roi_contours, observations, counts = [], [], [], {}
    boxes, voxels = label_boxes(seg)
    for (value, name), rgb in zip(sorted(labels.items()), colours(len(labels))):
        s = Dataset()
        s.ROINumber = value
        s.ReferencedFrameOfReferenceUID = ct.frame_uid
        s.ROIName = name
        s.ROIGenerationAlgorithm = "AUTOMATIC"
        s.ROIGenerationDescription = "nnU-Net prediction exported by organmtl"
        structure_set.append(s)
        contours = label_contours(seg, value, boxes[value])
        c = Dataset()
        c.ROIDisplayColor = rgb
        c.ReferencedROINumber = value
        c.ContourSequence = Sequence([_contour_item(ct, k, xy) for k, xy in contours])
        roi_contours.append(c)
        o = Dataset()
        o.ObservationNumber = value
        o.ReferencedROINumber = value
        o.RTROIInterpretedType = ""          # type 2: left for the clinician (ORGAN, PTV, ...)
        o.ROIInterpreter = ""
        observations.append(o)
        counts[name] = {"contours": len(contours), "slices": len({k for k, _ in contours}),
                        "voxels": int(voxels[value])}
    ds.StructureSetROISequence = Sequence(structure_set)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    _mark_encoded(ds)
    return ds, counts


def _mark_encoded(ds: Dataset) -> None:
    """Declare every (nested) dataset as already in the written encoding (implicit VR little
    endian, its character set): :func:`pydicom.dcmwrite` then writes the raw ContourData values
    as they are instead of decoding them (``Dataset.set_original_encoding``). The datasets hold
    no element of ambiguous VR, whose correction this skips."""
    charset = getattr(ds, "_character_set", None)
    if charset is None:                   # another pydicom: keep its default (slower) write path
        return
    ds.set_original_encoding(True, True, charset)
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if not element.is_raw and element.VR == "SQ":
            for item in element.value:
                _mark_encoded(item)


# ------------------------------------------------------------------------------ SEG

def build_seg(ct: CtSeries, seg: np.ndarray, labels: dict[int, str]) -> tuple[Dataset, dict]:
    """A highdicom BINARY Segmentation of ``seg`` (z, y, x on the CT grid), one segment per label."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="nnU-Net", version=_version(),
                                                   family=codes.cid7162.ArtificialIntelligence)
    for ct_slice in ct.slices:        # type 2 attributes highdicom copies; absent ones become empty
        for keyword in PATIENT_STUDY:
            if keyword not in ct_slice:
                setattr(ct_slice, keyword, "")
    ordered = sorted(labels.items())
    descriptions = []
    for number, ((value, name), rgb) in enumerate(zip(ordered, colours(len(ordered))), start=1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*rgb)))
    numbers = np.zeros(max(labels, default=0) + 1, np.uint8 if len(ordered) < 256 else np.uint16)
    for number, (value, _) in enumerate(ordered, start=1):
        numbers[value] = number
    pixels = numbers[seg]
    out = hd.seg.Segmentation(
        source_images=ct.slices, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=int(ct.slices[0].get("SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=SOFTWARE, manufacturer_model_name="organmtl export seg",
        software_versions=_version(), device_serial_number="0", content_label="PREDICTION",
        series_description="organmtl prediction")
    voxels = np.bincount(seg.ravel().astype(np.int64, copy=False))
    counts = {name: {"segment": n, "voxels": int(voxels[value])}
              for n, (value, name) in enumerate(ordered, start=1)}
    return out, counts


# ------------------------------------------------------------------------------ references

def verify_references(ds: Dataset, ct: CtSeries) -> None:
    """Refuse (:class:`ConversionError` naming the CT folder) an RTSTRUCT or SEG that does not tie
    itself to ``ct``: an empty UID anywhere in it; a ReferencedSOPInstanceUID that is not one of
    the CT's slices (or not of that slice's SOP class; a study component reference must name the
    CT's study); a (Referenced)FrameOfReferenceUID, StudyInstanceUID or referenced
    SeriesInstanceUID other than the CT's; no top-level FrameOfReferenceUID. Run on the built data
    set before it is written; raw elements (ContourData) are not decoded."""
    slices = {str(s.SOPInstanceUID): str(s.SOPClassUID) for s in ct.slices if s.get("SOPInstanceUID")}
    study = str(ct.slices[0].StudyInstanceUID)
    expected = {"FrameOfReferenceUID": ct.frame_uid, "ReferencedFrameOfReferenceUID": ct.frame_uid,
                "StudyInstanceUID": study}
    what = str(ds.get("Modality", "") or "file")

    def fail(where: str, problem: str):
        raise ConversionError(f"{ct.folder}: the {what} built on this CT {problem} ({where}); not written")

    def visit(item: Dataset, where: str) -> int:
        refs = 0
        if "ReferencedSOPInstanceUID" in item:
            uid, sop_class = str(item.ReferencedSOPInstanceUID or ""), str(item.get("ReferencedSOPClassUID", ""))
            if sop_class == STUDY_COMPONENT_SOP:
                if uid != study:
                    fail(where + "ReferencedSOPInstanceUID", f"references study {uid!r}, not the CT's {study}")
            elif uid not in slices:
                fail(where + "ReferencedSOPInstanceUID", f"references image {uid!r}, not a slice of the CT series")
            elif sop_class and sop_class != slices[uid]:
                fail(where + "ReferencedSOPClassUID", f"gives slice {uid} SOP class {sop_class}, not {slices[uid]}")
            else:
                refs += 1
        for tag in item.keys():
            vr = item.get_item(tag).VR
            if vr is not None and vr not in ("SQ", "UI"):
                continue
            element = item[tag]
            name = where + (element.keyword or str(element.tag))
            if element.VR == "SQ":
                for i, sub in enumerate(element.value):
                    refs += visit(sub, f"{name}[{i}].")
                continue
            if element.VR != "UI":
                continue
            values = list(element.value) if element.VM > 1 else [element.value]
            if any(not str(v or "").strip() for v in values):
                fail(name, "has an empty UID")
            want = expected.get(element.keyword)
            if element.keyword == "SeriesInstanceUID" and where:          # a referenced series (nested)
                want = ct.series_uid
            if want is not None and str(element.value) != want:
                fail(name, f"names {element.keyword} {element.value}, not the CT's {want}")
        return refs

    if str(ds.get("FrameOfReferenceUID", "") or "") != ct.frame_uid:
        fail("FrameOfReferenceUID", "has no top-level FrameOfReferenceUID equal to the CT's")
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPInstanceUID", "")) != str(ds.SOPInstanceUID):
        fail("MediaStorageSOPInstanceUID", "has file meta naming another SOPInstanceUID")
    if not visit(ds, ""):
        fail("ReferencedSOPInstanceUID", "references no CT slice")


# ------------------------------------------------------------------------------ writing

def _version() -> str:
    from organmtl import __version__

    return str(__version__)


def write_atomic(ds: Dataset, out: Path) -> None:
    """Write a DICOM Part 10 file via a temporary file in ``out``'s folder, renamed into place;
    temporary files an earlier, killed run left for the same target are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        ds.save_as(str(tmp), enforce_file_format=True)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_case(kind: str, pred: Path, ct_folder: Path, out: Path, labels: dict[int, str] | None,
                series_uid: str | None = None, resample: bool = False, overwrite: bool = False,
                slice_uids: list[str] | None = None) -> dict:
    """Export one prediction file as ``kind`` (``rtstruct`` or ``seg``) into ``out``; a record for the
    report. ``slice_uids``: the SOPInstanceUIDs the conversion read, in slice order (checked)."""
    if out.exists() and not overwrite:
        raise ConversionError(f"{out}: already exists (pass --overwrite to replace it)")
    ct = load_ct(ct_folder, series_uid)
    if slice_uids is not None and [str(s.SOPInstanceUID) for s in ct.slices] != list(slice_uids):
        raise ConversionError(f"{ct_folder}: the CT slices differ from those the conversion report lists "
                              "(files changed since the conversion?)")
    seg, present, resampled = read_prediction(pred, ct, labels, resample)
    if not present:
        raise ConversionError(f"{pred}: no foreground voxel; nothing to export")
    ds, counts = (build_rtstruct if kind == "rtstruct" else build_seg)(ct, seg, present)
    verify_references(ds, ct)
    write_atomic(ds, out)
    record = {"prediction": str(pred), "ct": str(ct_folder), "ct_series": ct.series_uid, "file": str(out),
              "resampled": resampled, "rois": counts}
    if labels is not None:
        record["labels_absent"] = [labels[v] for v in sorted(labels) if v not in present]
    return record


# ------------------------------------------------------------------------------ folder mode

def _prediction_files(folder: Path) -> dict[str, Path]:
    files = {strip_image_suffix(p.name): p for p in sorted(folder.iterdir())
             if p.is_file() and p.name.endswith(IMAGE_SUFFIXES) and not p.name.startswith(".")}
    if not files:
        raise ConversionError(f"{folder}: no prediction files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    return files


def find_conversion_report(pred_dir: Path) -> Path | None:
    """The conversion_report.json of the dataset whose images ``nnUNetv2_predict`` read (its
    ``predict_from_raw_data_args.json`` names the input folder, e.g. DatasetXXX/imagesTs)."""
    args_file = pred_dir / "predict_from_raw_data_args.json"
    try:
        source = json.loads(args_file.read_text()).get("list_of_lists_or_source_folder")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(source, str):
        return None
    report = Path(source).parent / "conversion_report.json"
    return report if report.is_file() else None


def case_sources(report: Path | None) -> dict[str, tuple[Path, str | None, list[str] | None]]:
    """``{case: (CT folder, SeriesInstanceUID, SOPInstanceUIDs in slice order)}`` from a conversion
    report of ``organmtl convert dicom-rt`` (docs/converters.md): each case record's
    ``source.ct_series_folder``, ``source.series_instance_uid`` and ``source.sop_instance_uids``
    (reports without ``source`` records: the report's source folder/<case> and ``ct_series``)."""
    if report is None:
        return {}
    try:
        data = json.loads(Path(report).read_text())
        records = data["cases"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{report}: not a conversion report with 'cases' ({e.__class__.__name__})") from None
    out = {}
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, dict) or "case" not in record:
            continue
        source = record.get("source")
        if isinstance(source, dict) and source.get("ct_series_folder"):
            out[str(record["case"])] = (Path(source["ct_series_folder"]), source.get("series_instance_uid"),
                                        source.get("sop_instance_uids"))
        elif isinstance(data.get("source"), str) and record.get("ct_series"):
            out[str(record["case"])] = (Path(data["source"]) / str(record["case"]), record["ct_series"], None)
    return out


def export_folder(kind: str, pred_dir: Path, out_dir: Path, args) -> int:
    """Export every prediction of ``pred_dir``; bad cases are listed, the others written."""
    files = _prediction_files(pred_dir)
    dataset_json = args.dataset_json or (pred_dir / "dataset.json" if (pred_dir / "dataset.json").is_file() else None)
    labels = read_labels(dataset_json)
    report = args.conversion_report or find_conversion_report(pred_dir)
    sources = case_sources(report)
    if not sources and args.dicom is None:
        raise ConversionError(f"{pred_dir}: no conversion report found; pass --conversion-report or --dicom ROOT "
                              "(a folder of per-case CT folders named like the cases)")
    out_dir.mkdir(parents=True, exist_ok=True)
    records, failed = [], 0
    for case, pred in files.items():
        try:
            if case in sources:
                folder, series_uid, slice_uids = sources[case]
            elif args.dicom is not None:
                folder, series_uid, slice_uids = args.dicom / case, args.series_uid, None
            else:
                raise ConversionError(f"{report}: no CT source recorded for case {case!r} (pass --dicom ROOT)")
            record = export_case(kind, pred, folder, out_dir / f"{case}.dcm", labels, series_uid,
                                 args.resample, args.overwrite, slice_uids)
            records.append({"case": case, "status": "written", **record})
            print(f"{case}: {kind.upper()} {out_dir / (case + '.dcm')} ({len(record['rois'])} ROIs)")
        except ConversionError as e:
            failed += 1
            records.append({"case": case, "status": "failed", "error": str(e)})
            print(f"organmtl export {kind}: {case}: error: {e}", file=sys.stderr)
    summary = {"kind": kind, "predictions": str(pred_dir), "dataset_json": str(dataset_json) if dataset_json else None,
               "conversion_report": str(report) if report else None, "written": len(files) - failed,
               "failed": failed, "cases": records}
    tmp = out_dir / f".export_report.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out_dir / "export_report.json")
    print(f"{len(files) - failed} of {len(files)} cases exported to {out_dir}"
          + (f"; {failed} failed (see {out_dir / 'export_report.json'})" if failed else ""))
    return EXIT_OK if not failed else EXIT_PARTIAL if failed < len(files) else EXIT_NONE


def run_export(args) -> int:
    kind = args.kind
    if args.pred.is_dir():
        return export_folder(kind, args.pred, args.out, args)
    if args.dicom is None:
        raise ConversionError(f"{args.pred}: --dicom CT_DIR is needed for a single prediction file")
    dataset_json = args.dataset_json
    if dataset_json is None and (args.pred.parent / "dataset.json").is_file():
        dataset_json = args.pred.parent / "dataset.json"
    record = export_case(kind, args.pred, args.dicom, args.out, read_labels(dataset_json), args.series_uid,
                         args.resample, args.overwrite)
    rois = ", ".join(f"{name} ({c.get('contours', c.get('voxels'))})" for name, c in record["rois"].items())
    print(f"{kind.upper()} written to {args.out}: {len(record['rois'])} ROIs: {rois}"
          + (" [prediction resampled onto the CT grid]" if record["resampled"] else ""))
    return EXIT_OK


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """``organmtl export rtstruct|seg``: register the command on the CLI's sub-parsers."""
    parser = subparsers.add_parser("export", help="nnU-Net predictions -> DICOM RTSTRUCT or SEG on their CT series "
                                   "(docs/export.md)")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="FORMAT")
    helps = {"rtstruct": "RT Structure Set: CLOSED_PLANAR contours per slice, one ROI per label (pydicom)",
             "seg": "DICOM Segmentation: one binary segment per label (highdicom)"}
    for kind in KINDS:
        p = kinds.add_parser(kind, help=helps[kind], description=helps[kind])
        p.add_argument("pred", type=Path, help="prediction label map (NIfTI, ...) or a folder of them "
                       "(nnUNetv2_predict output)")
        p.add_argument("--dicom", type=Path, default=None, metavar="CT_DIR",
                       help="the CT series' folder; folder mode: a folder of per-case CT folders named like the "
                       "cases (used for cases the conversion report does not name)")
        p.add_argument("--out", type=Path, required=True,
                       help="output .dcm file; folder mode: output folder (one CASE.dcm each)")
        p.add_argument("--dataset-json", type=Path, default=None,
                       help="nnU-Net dataset.json naming the labels (default: the one beside/in PRED)")
        p.add_argument("--conversion-report", type=Path, default=None,
                       help="folder mode: conversion_report.json of `organmtl convert dicom-rt` giving each "
                       "case's CT (default: found through PRED/predict_from_raw_data_args.json)")
        p.add_argument("--series-uid", default=None, help="the CT series to use when CT_DIR holds several")
        p.add_argument("--resample", action="store_true",
                       help="resample a prediction that is not on the CT grid (nearest neighbour) instead of "
                       "stopping")
        p.add_argument("--overwrite", action="store_true", help="replace existing output files")
        p.set_defaults(func=run_export)
    return parser
