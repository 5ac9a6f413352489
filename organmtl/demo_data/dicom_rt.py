"""Radiotherapy planning CT in DICOM with an RT Structure Set, the layout of clinical TPS exports.

``<case>/CT/IM<nnnn>.dcm``: a CT Image Storage series (64 x 64 x 16 voxels, 1.2 x 1.2 x 2.5 mm,
non-zero origin; stored values HU + 1024 with RescaleIntercept -1024); the file numbers are a
permutation of the slice positions, so neither the names nor their order say where a slice lies.
``<case>/RTSTRUCT/RS.dcm``: an RTSTRUCT whose CLOSED_PLANAR contours are polygons drawn in patient
coordinates (LPS mm) around the phantom's shapes, one per CT slice plane:

- ``Body`` (external), ``PAROTID_L``, ``Parotid R``, ``Spinal Cord``;
- ``Vertebra``: a ring, i.e. an outer and an inner contour on the same slice, so the spinal canal
  is a hole (a contour nested in another is a hole);
- ``ISO``: a POINT ROI (the isocentre), which converters carry as a landmark.

Variations, by case index: 1, 5, ... have a body wider than the field of view (its contours leave
the image and must be clipped); 2, 6, ... have no ``Parotid R`` ROI; 3, 7, ... are scanned feet
first (ImageOrientationPatient ``-1 0 0 0 1 0``: the slice normal points to the feet, so the
direction matrix is not the identity). UIDs are derived from the seed and the study date is fixed,
so re-runs are byte-identical. :func:`ground_truth` gives the voxel masks the contours stand for.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"   # Detached Study Management SOP class (RTReferencedStudy)
SHAPE_ZYX = (16, 64, 64)
SPACING_XYZ = (1.2, 1.2, 2.5)
HEAD_FIRST_SUPINE = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
FEET_FIRST_SUPINE = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ROI_NAMES = ("Body", "PAROTID_L", "Parotid R", "Spinal Cord", "Vertebra")
STUDY_DATE, STUDY_TIME = "20260101", "120000"
HU = {"Body": 30.0, "Vertebra": 700.0, "Spinal Cord": 45.0, "PAROTID_L": -35.0, "Parotid R": -35.0}


def uid(seed: int, *parts) -> str:
    """A UID derived from the seed and ``parts`` only, so writes are repeatable: ``2.25.`` and a
    128-bit integer (the UUID-derived root of DICOM PS3.5 B.2), here taken from a SHA-256 hash."""
    text = "/".join(["organmtl-demo-dicom-rt", str(seed), *map(str, parts)])
    return "2.25." + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big"))


@dataclass(frozen=True)
class SeriesGeometry:
    """A CT series' grid: slice ``k`` has ImagePositionPatient ``position(k)``; voxel ``(i, j)`` of
    it lies at ``position(k) + i * sx * row + j * sy * col`` (LPS mm). Slices are numbered along
    the normal ``row x col``, as the converter sorts them."""

    shape_zyx: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    first_position: tuple[float, float, float]
    orientation: tuple[float, ...] = HEAD_FIRST_SUPINE

    @classmethod
    def centred(cls, center_xyz, shape_zyx=SHAPE_ZYX, spacing_xyz=SPACING_XYZ, orientation=HEAD_FIRST_SUPINE):
        """The grid of ``shape``/``spacing``/``orientation`` whose middle lies at ``center_xyz``
        (first position rounded to 0.1 um, as written to the DICOM header)."""
        g = cls(tuple(shape_zyx), tuple(spacing_xyz), (0.0, 0.0, 0.0), tuple(orientation))
        half = [(n - 1) / 2 * s for n, s in zip(shape_zyx[::-1], spacing_xyz)]
        first = np.asarray(center_xyz, float) - half[0] * g.row - half[1] * g.col - half[2] * g.normal
        return cls(tuple(shape_zyx), tuple(spacing_xyz), tuple(np.round(first, 4) + 0.0), tuple(orientation))

    @property
    def row(self) -> np.ndarray:
        return np.asarray(self.orientation[:3], float)

    @property
    def col(self) -> np.ndarray:
        return np.asarray(self.orientation[3:], float)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (rounded to 0.1 um, as written)."""
        return np.round(np.asarray(self.first_position) + k * self.spacing_xyz[2] * self.normal, 4) + 0.0

    @property
    def direction(self) -> tuple[float, ...]:
        """SimpleITK direction (row-major 3 x 3 whose columns are row, col, normal)."""
        return tuple(np.stack([self.row, self.col, self.normal], axis=1).ravel())

    def plane_points(self, k: int, uv_mm) -> np.ndarray:
        """Points (N, 3) in LPS mm on slice ``k``'s plane from in-plane offsets ``(u along row, v along
        col)`` in mm from the slice's first voxel, rounded to 0.1 um as written."""
        uv = np.asarray(uv_mm, float).reshape(-1, 2)
        pts = self.position(k) + uv[:, :1] * self.row + uv[:, 1:] * self.col
        return np.round(pts, 4) + 0.0


@dataclass
class Contour:
    """One ContourSequence item: LPS points (N, 3) on CT slice ``slice_index`` (``None``: no
    ContourImageSequence reference is written)."""

    points: np.ndarray
    slice_index: int | None
    kind: str = "CLOSED_PLANAR"


@dataclass
class Roi:
    number: int
    name: str
    contours: list[Contour] = field(default_factory=list)
    interpreted_type: str = "ORGAN"


@dataclass
class Case:
    """Everything one case folder holds: geometry, HU volume (z, y, x), ROIs, UIDs, file names."""

    case_id: str
    geometry: SeriesGeometry
    hu: np.ndarray
    rois: list[Roi]
    seed: int = 0
    file_names: list[str] | None = None

    @property
    def study_uid(self) -> str:
        return uid(self.seed, self.case_id, "study")

    @property
    def series_uid(self) -> str:
        return uid(self.seed, self.case_id, "ct-series")

    @property
    def frame_uid(self) -> str:
        return uid(self.seed, self.case_id, "frame-of-reference")

    def slice_uid(self, k: int) -> str:
        return uid(self.seed, self.case_id, "ct-slice", k)


def ellipse(center_xy, radii_xy, n: int, phase: float) -> np.ndarray:
    """Vertices (n, 2) of a polygon inscribed in an axis-aligned ellipse."""
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([center_xy[0] + radii_xy[0] * np.cos(t), center_xy[1] + radii_xy[1] * np.sin(t)], axis=1)


def axial_contour(geometry: SeriesGeometry, k: int, polygon_xy) -> Contour:
    """A contour on axial slice ``k`` from patient (x, y) vertices; z is the slice's plane."""
    xy = np.asarray(polygon_xy, float)
    z = np.full((len(xy), 1), geometry.position(k)[2])
    return Contour(np.round(np.hstack([xy, z]), 4) + 0.0, k)


def make_case(case_index: int, seed: int) -> Case:
    """The phantom of case ``case_index``: geometry, contours drawn around its shapes, HU volume."""
    rng = np.random.default_rng([seed, 8, case_index])
    center = np.array([12.0, -25.0, 310.0]) + rng.uniform(-6, 6, 3)
    orientation = FEET_FIRST_SUPINE if case_index % 4 == 3 else HEAD_FIRST_SUPINE
    g = SeriesGeometry.centred(center, orientation=orientation)
    cx, cy, cz = center + rng.normal(0, 1.0, 3)
    body_rx = 41.0 if case_index % 4 == 1 else 33.0 + rng.uniform(-1, 1)
    rois = {name: Roi(n, name, interpreted_type="EXTERNAL" if name == "Body" else "ORGAN")
            for n, name in enumerate(ROI_NAMES, start=1)}
    parotids = {"PAROTID_L": (cx + 18.0, rng.uniform(0.9, 1.1)), "Parotid R": (cx - 18.0, rng.uniform(0.9, 1.1))}
    pz = cz + rng.uniform(-2, 2)
    for k in range(g.shape_zyx[0]):
        z = g.position(k)[2]
        phase = rng.uniform(0, 2 * np.pi)
        rois["Body"].contours.append(axial_contour(g, k, ellipse((cx, cy), (body_rx, 27.0), 48, phase)))
        rois["Spinal Cord"].contours.append(axial_contour(g, k, ellipse((cx, cy + 15), (3.6, 3.4), 16, phase)))
        if z < cz:
            rois["Vertebra"].contours.append(axial_contour(g, k, ellipse((cx, cy + 15), (9.1, 8.2), 24, phase)))
            rois["Vertebra"].contours.append(axial_contour(g, k, ellipse((cx, cy + 15), (5.1, 4.9), 16, -phase)))
        scale = 1.0 - ((z - pz) / 10.0) ** 2
        for name, (px, size) in parotids.items():
            if scale > 0.1:
                radii = (6.3 * size * np.sqrt(scale), 8.2 * size * np.sqrt(scale))
                rois[name].contours.append(axial_contour(g, k, ellipse((px, cy + 2), radii, 20, phase)))
    iso = Roi(len(ROI_NAMES) + 1, "ISO", [Contour(np.round([[cx, cy, cz]], 4) + 0.0, None, "POINT")], "ISOCENTER")
    kept = [r for r in rois.values() if not (case_index % 4 == 2 and r.name == "Parotid R")] + [iso]
    case = Case(f"rt{case_index:03d}", g, np.zeros(g.shape_zyx, np.int16), kept, seed)
    case.hu = phantom_hu(case, rng)
    names = rng.permutation(g.shape_zyx[0]) + 1
    case.file_names = [f"IM{n:04d}.dcm" for n in names]
    return case


def phantom_hu(case: Case, rng: np.random.Generator) -> np.ndarray:
    """CT values: air, then each ROI's tissue painted over the ground-truth masks, plus noise."""
    masks = ground_truth(case)
    img = np.full(case.geometry.shape_zyx, -1000.0, np.float32)
    for name in ("Body", "Vertebra", "Spinal Cord", "PAROTID_L", "Parotid R"):
        if name in masks:
            img[masks[name]] = HU[name]
    img += rng.normal(0, 8.0, img.shape).astype(np.float32)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


def points_in_polygon(px: np.ndarray, py: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd (crossing number) test of points against one polygon, all in the same 2D frame."""
    inside = np.zeros(px.shape, bool)
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for a, b, c, d in zip(x0, y0, x1, y1):
        if b == d:
            continue
        crosses = (b > py) != (d > py)
        inside ^= crosses & (px < a + (py - b) * (c - a) / (d - b))
    return inside


def ground_truth(case: Case) -> dict[str, np.ndarray]:
    """Voxel masks (z, y, x) of the ROIs with CLOSED_PLANAR contours: on each slice, a contour lying
    inside another of the same ROI (all its vertices inside it) is a hole, one inside a hole an
    island again; contours that overlap without nesting add up (union), as the converter reads them.

    Computed in each slice plane in mm (voxel centres from the header values, contour points
    projected on the row/column cosines), independently of the converter's index-space fill.
    """
    g = case.geometry
    nz, ny, nx = g.shape_zyx
    u = np.arange(nx)[None, :] * g.spacing_xyz[0] + np.zeros((ny, 1))
    v = np.arange(ny)[:, None] * g.spacing_xyz[1] + np.zeros((1, nx))
    out = {}
    for roi in case.rois:
        closed = [c for c in roi.contours if c.kind == "CLOSED_PLANAR"]
        if not closed:
            continue
        by_slice: dict[int, list[np.ndarray]] = {}
        for c in closed:
            k = int(np.rint((c.points[0] - g.position(0)) @ g.normal / g.spacing_xyz[2]))
            rel = c.points - g.position(k)
            by_slice.setdefault(k, []).append(np.stack([rel @ g.row, rel @ g.col], axis=1))
        mask = np.zeros(g.shape_zyx, bool)
        for k, polygons in by_slice.items():
            depth = [sum(1 for j, outer in enumerate(polygons) if j != i and _area(outer) > _area(inner)
                         and points_in_polygon(inner[:, 0], inner[:, 1], outer).all())
                     for i, inner in enumerate(polygons)]
            for d in sorted(set(depth)):
                layer = np.zeros((ny, nx), bool)
                for poly, dp in zip(polygons, depth):
                    if dp == d:
                        layer |= points_in_polygon(u, v, poly)
                mask[k] = mask[k] | layer if d % 2 == 0 else mask[k] & ~layer
        out[roi.name] = mask
    return out


def _area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return abs(float(x @ np.roll(y, -1) - y @ np.roll(x, -1))) / 2


# ------------------------------------------------------------------------------ DICOM writing

def _file_dataset(sop_class: str, sop_instance: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = uid(0, "implementation")
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    return ds


def _patient_study_equipment(ds: Dataset, case: Case) -> None:
    """The modules a CT image and an RT structure set share (PS3.3 A.3, A.19): Patient, General
    Study, Frame of Reference and General Equipment. Type 2 elements with no value for a phantom
    (birth date, sex, referring physician, accession number, position reference) are written empty,
    as the standard allows; the study date and time are fixed, so re-runs stay byte-identical."""
    ds.PatientName = "Demo^Patient" + case.case_id.removeprefix("rt")   # PN: family^given
    ds.PatientID = case.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = case.study_uid
    ds.StudyID = "1"
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.FrameOfReferenceUID = case.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "organmtl"
    ds.ManufacturerModelName = "demo phantom"


def save(ds: Dataset, path: Path) -> None:
    """Write a DICOM Part 10 file (preamble, file meta, explicit VR little endian)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    else:                                  # pydicom 2.4
        ds.is_little_endian, ds.is_implicit_VR = True, False
        pydicom.dcmwrite(str(path), ds, write_like_original=False)


def save_raw(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a bare data set: no 128-byte preamble, no ``DICM`` prefix, no file meta
    (implicit VR little endian), as some exports and older archives store files."""
    import copy

    path.parent.mkdir(parents=True, exist_ok=True)
    bare = copy.deepcopy(ds)
    bare.file_meta = FileMetaDataset()
    bare.preamble = None
    if int(pydicom.__version__.split(".")[0]) >= 3:
        pydicom.dcmwrite(str(path), bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
    else:                                  # pydicom 2.4
        bare.is_little_endian, bare.is_implicit_VR = True, True
        pydicom.dcmwrite(str(path), bare, write_like_original=True)


def ct_slice(case: Case, k: int) -> Dataset:
    """The CT Image Storage dataset of slice ``k`` (stored value = HU + 1024, 12 bits)."""
    g = case.geometry
    ds = _file_dataset(CT_IMAGE_STORAGE, case.slice_uid(k))
    _patient_study_equipment(ds, case)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = case.series_uid
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "HEADNECK"       # not a paired part, so no Laterality (General Series)
    ds.PatientPosition = "FFS" if g.orientation == FEET_FIRST_SUPINE else "HFS"
    ds.InstanceNumber = k + 1
    ds.AcquisitionNumber = 1
    ds.KVP = ""                            # Type 2: a phantom has no tube voltage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [float(v) for v in g.position(k)]
    ds.ImageOrientationPatient = [float(v) for v in g.orientation]
    ds.PixelSpacing = [g.spacing_xyz[1], g.spacing_xyz[0]]      # row spacing (y), column spacing (x)
    ds.SliceThickness = g.spacing_xyz[2]
    ds.Rows, ds.Columns = g.shape_zyx[1], g.shape_zyx[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.PixelData = (case.hu[k].astype(np.int32) + 1024).astype("<u2").tobytes()
    return ds


def write_ct_series(folder: Path, case: Case) -> list[Path]:
    """One file per slice under ``folder`` (names from ``case.file_names``, else ``CT<k>.dcm``)."""
    names = case.file_names or [f"CT{k:04d}.dcm" for k in range(case.geometry.shape_zyx[0])]
    paths = []
    for k, name in enumerate(names):
        save(ct_slice(case, k), folder / name)
        paths.append(folder / name)
    return paths


def _image_ref(case: Case, k: int) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
    ref.ReferencedSOPInstanceUID = case.slice_uid(k)
    return ref


def _referenced_frame(case: Case) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = case.series_uid
    series.ContourImageSequence = Sequence([_image_ref(case, k) for k in range(case.geometry.shape_zyx[0])])
    study = Dataset()
    study.ReferencedSOPClassUID = STUDY_COMPONENT
    study.ReferencedSOPInstanceUID = case.study_uid
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = case.frame_uid
    frame.RTReferencedStudySequence = Sequence([study])
    return frame


def _contour_item(case: Case, contour: Contour) -> Dataset:
    item = Dataset()
    if contour.slice_index is not None:
        item.ContourImageSequence = Sequence([_image_ref(case, contour.slice_index)])
    item.ContourGeometricType = contour.kind
    item.NumberOfContourPoints = len(contour.points)
    item.ContourData = [float(v) for v in np.asarray(contour.points).ravel()]
    return item


def rtstruct(case: Case) -> Dataset:
    """The RT Structure Set dataset of ``case`` (one ROI per :class:`Roi`)."""
    ds = _file_dataset(RT_STRUCTURE_SET_STORAGE, uid(case.seed, case.case_id, "rtstruct"))
    _patient_study_equipment(ds, case)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uid(case.seed, case.case_id, "rtstruct-series")
    ds.SeriesNumber = 2
    ds.OperatorsName = ""                  # Type 2 in the RT Series module
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "organmtl demo"
    ds.StructureSetDate = ""
    ds.StructureSetTime = ""
    ds.ReferencedFrameOfReferenceSequence = Sequence([_referenced_frame(case)])
    structure_set, roi_contours, observations = [], [], []
    for roi in case.rois:
        s = Dataset()
        s.ROINumber = roi.number
        s.ReferencedFrameOfReferenceUID = case.frame_uid
        s.ROIName = roi.name
        s.ROIGenerationAlgorithm = "MANUAL"
        structure_set.append(s)
        c = Dataset()
        c.ROIDisplayColor = [int(v) for v in np.random.default_rng(roi.number).integers(0, 256, 3)]
        c.ReferencedROINumber = roi.number
        if roi.contours:
            c.ContourSequence = Sequence([_contour_item(case, contour) for contour in roi.contours])
        roi_contours.append(c)
        o = Dataset()
        o.ObservationNumber = roi.number
        o.ReferencedROINumber = roi.number
        o.RTROIInterpretedType = roi.interpreted_type
        o.ROIInterpreter = ""
        observations.append(o)
    ds.StructureSetROISequence = Sequence(structure_set)
    ds.ROIContourSequence = Sequence(roi_contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds


def write_case(folder: Path, case: Case) -> None:
    """``folder/CT/*.dcm`` and ``folder/RTSTRUCT/RS.dcm``."""
    write_ct_series(folder / "CT", case)
    save(rtstruct(case), folder / "RTSTRUCT" / "RS.dcm")


def write_dicom_rt(out: Path, n_cases: int, seed: int) -> list[str]:
    """Write ``n_cases`` DICOM-RT cases (CT series + RTSTRUCT) under ``out``; return the case ids."""
    ids = []
    for i in range(n_cases):
        case = make_case(i, seed)
        write_case(Path(out) / case.case_id, case)
        ids.append(case.case_id)
    return ids
