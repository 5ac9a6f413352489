"""organmtl export rtstruct|seg: nnU-Net label maps back to DICOM on their CT series.

Round trips through the real console scripts: the demo DICOM-RT phantoms are converted, their label
maps exported (folder mode, CTs found through conversion_report.json) and converted again (Dice
per ROI, exact geometry); an independent reader (rt-utils, OpenCV based, installed without its
opencv-python dependency into a private folder: the headless OpenCV here provides the same cv2)
reads the files; SEG is read back with highdicom. Hard shapes (holes with islands, single
voxels, corner-touching voxels, the image border, random blobs) come back voxel for voxel; a
prediction stored in another orientation comes back only with --resample; bad inputs give one
line naming the file; a folder with one bad case exports the others (exit 1). dciodvfy
(dicom3tools) finds no error in the files; references resolve to the CT's slices; a CT whose
UIDs an anonymiser blanked is refused, and on import an empty UID matches nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from organmtl.cli import main
from organmtl.converters.common import ConversionError
from organmtl.converters.export_dicom import colours, load_ct, slice_contours, verify_references
from organmtl.demo_data.dicom_rt import write_dicom_rt
from tests.helpers import ONE_THREAD, dciodvfy, run_cli

CASES = ("rt000", "rt001", "rt003")          # head first, body wider than the field of view, feet first
RT_UTILS = "rt-utils==1.2.7"                  # the independent reader (pydicom 3 compatible)


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _labels(dataset: Path) -> dict[str, int]:
    return {k: v for k, v in json.loads((dataset / "dataset.json").read_text())["labels"].items() if v}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def _convert(src: Path, out: Path, dataset_id: int) -> Path:
    r = run_cli("convert", "dicom-rt", src, "--dataset-id", dataset_id, "--name", "RT", "--out", out, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    return out / f"Dataset{dataset_id:03d}_RT"


def _case_with_rtstruct(ct_dir: Path, rtstruct: Path, dest: Path) -> None:
    shutil.copytree(ct_dir, dest / "CT")
    (dest / "RS").mkdir()
    shutil.copy(rtstruct, dest / "RS" / "RS.dcm")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(DICOM source root, converted nnU-Net dataset) of the demo phantoms."""
    root = tmp_path_factory.mktemp("export")
    write_dicom_rt(root / "src", 4, seed=0)
    return root / "src", _convert(root / "src", root / "raw", 31)


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory) -> Path:
    """``organmtl export rtstruct`` of an nnUNetv2_predict-like folder (label maps, dataset.json,
    predict_from_raw_data_args.json naming the dataset's imagesTr): one CASE.dcm each."""
    _, dataset = converted
    root = tmp_path_factory.mktemp("exported")
    pred = root / "pred"
    pred.mkdir()
    for f in (dataset / "labelsTr").iterdir():
        shutil.copy(f, pred / f.name)
    shutil.copy(dataset / "dataset.json", pred / "dataset.json")
    args = {"list_of_lists_or_source_folder": str(dataset / "imagesTr"),          # as nnUNetv2_predict writes it
            "output_folder_or_list_of_truncated_output_files": str(pred)}
    (pred / "predict_from_raw_data_args.json").write_text(json.dumps(args))
    r = run_cli("export", "rtstruct", pred, "--out", root / "out", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (root / "out").iterdir()) == ["export_report.json", *(f"{c}.dcm" for c in CASES)]
    return root / "out"


def test_rtstruct_round_trip_through_convert(converted, exported, tmp_path):
    """convert dicom-rt of (CT + exported RTSTRUCT) gives the prediction back: same label names,
    Dice 1.0 per ROI (the issue asks >= 0.98; the contour rule makes it exact), same geometry."""
    src, dataset = converted
    for case in CASES:
        _case_with_rtstruct(src / case / "CT", exported / f"{case}.dcm", tmp_path / "src2" / case)
    again = _convert(tmp_path / "src2", tmp_path / "raw2", 32)
    names, names2 = _labels(dataset), _labels(again)
    assert set(names2) == set(names)
    for case in CASES:
        before = sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz"))
        after = sitk.ReadImage(str(again / "labelsTr" / f"{case}.nii.gz"))
        assert (after.GetSize(), after.GetSpacing(), after.GetOrigin(), after.GetDirection()) == \
            (before.GetSize(), before.GetSpacing(), before.GetOrigin(), before.GetDirection())
        a, b = sitk.GetArrayFromImage(before), sitk.GetArrayFromImage(after)
        for name, value in names.items():
            assert (a == value).any()
            assert _dice(a == value, b == names2[name]) >= 0.98, (case, name)
            assert np.array_equal(a == value, b == names2[name]), (case, name)


def test_export_beside_the_planning_rtstruct_is_read_as_the_newest(converted, exported, tmp_path):
    """Dropped into the case folder next to the original structure set, the export is the one
    convert dicom-rt takes by default (--rtstruct-select newest: its StructureSetDate is the
    export's), and the original is listed as older."""
    src, dataset = converted
    case = "rt000"
    shutil.copytree(src / case, tmp_path / "src" / case)
    shutil.copy(exported / f"{case}.dcm", tmp_path / "src" / case / "RTSTRUCT" / "prediction.dcm")
    again = _convert(tmp_path / "src", tmp_path / "raw", 35)
    record = json.loads((again / "conversion_report.json").read_text())["cases"][0]
    assert Path(record["source"]["rtstruct_file"]).name == "prediction.dcm"
    assert [Path(o["file"]).name for o in record["source"]["other_rtstructs"]] == ["RS.dcm"]
    names2 = _labels(again)
    a, b = _read(dataset / "labelsTr" / f"{case}.nii.gz"), _read(again / "labelsTr" / f"{case}.nii.gz")
    for name, value in _labels(dataset).items():
        assert np.array_equal(a == value, b == names2[name]), name


def test_rtstruct_references_the_ct_series(converted, exported):
    """FrameOfReference, study, series with every slice, per contour the SOPInstanceUID of the
    slice whose plane it lies in; names from dataset.json, distinct colours, CLOSED_PLANAR only."""
    src, dataset = converted
    report = json.loads((exported / "export_report.json").read_text())
    assert [c["status"] for c in report["cases"]] == ["written"] * len(CASES)
    for case in CASES:
        ct = [pydicom.dcmread(str(p)) for p in sorted((src / case / "CT").iterdir())]
        normal = np.cross(*np.reshape(np.asarray(ct[0].ImageOrientationPatient, float), (2, 3)))
        plane = {s.SOPInstanceUID: float(np.dot(np.asarray(s.ImagePositionPatient, float), normal)) for s in ct}
        rs = pydicom.dcmread(str(exported / f"{case}.dcm"))
        assert rs.Modality == "RTSTRUCT" and rs.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
        assert (rs.PatientID, rs.StudyInstanceUID) == (ct[0].PatientID, ct[0].StudyInstanceUID)
        frame = rs.ReferencedFrameOfReferenceSequence[0]
        assert frame.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        assert series.SeriesInstanceUID == ct[0].SeriesInstanceUID
        assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(plane)
        assert {r.ROIName for r in rs.StructureSetROISequence} == set(_labels(dataset))
        assert {r.ReferencedFrameOfReferenceUID for r in rs.StructureSetROISequence} == {ct[0].FrameOfReferenceUID}
        assert len({tuple(c.ROIDisplayColor) for c in rs.ROIContourSequence}) == len(rs.ROIContourSequence)
        for roi in rs.ROIContourSequence:
            for contour in roi.ContourSequence:
                assert contour.ContourGeometricType == "CLOSED_PLANAR"
                points = np.asarray(contour.ContourData, float).reshape(-1, 3)
                assert len(points) == contour.NumberOfContourPoints >= 3
                ref = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
                assert np.allclose(points @ normal, plane[ref], atol=1e-3)


@pytest.fixture(scope="module")
def rt_utils_path(tmp_path_factory) -> Path:
    """rt-utils installed into a private folder without its opencv-python requirement (the
    opencv-python-headless that detectron2 uses provides the same ``cv2`` module)."""
    target = tmp_path_factory.mktemp("rt_utils")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                        "--target", str(target), RT_UTILS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return target


READ_WITH_RT_UTILS = """
import sys, numpy as np
from rt_utils import RTStructBuilder
rt = RTStructBuilder.create_from(dicom_series_path=sys.argv[1], rt_struct_path=sys.argv[2])
np.savez(sys.argv[3], **{name: np.moveaxis(rt.get_roi_mask_by_name(name), 2, 0) for name in rt.get_roi_names()})
"""


def test_independent_reader_agrees(converted, exported, rt_utils_path, tmp_path):
    """rt-utils (no code shared with the exporter: OpenCV fill of rounded vertices, slices matched
    through ContourImageSequence) reads every ROI with Dice >= 0.95 to the prediction."""
    src, dataset = converted
    names = _labels(dataset)
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(rt_utils_path)}
    for case in CASES:
        out = tmp_path / f"{case}.npz"
        r = subprocess.run([sys.executable, "-c", READ_WITH_RT_UTILS, str(src / case / "CT"),
                            str(exported / f"{case}.dcm"), str(out)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        masks = np.load(out)
        assert set(masks.files) == set(names)
        label = _read(dataset / "labelsTr" / f"{case}.nii.gz")
        for name, value in names.items():
            assert _dice(label == value, masks[name]) >= 0.95, (case, name)


def test_seg_round_trip_with_highdicom(converted, tmp_path):
    """export seg: highdicom reads one segment per label, masks equal to the prediction (Dice 1.0),
    frames referencing the CT slices of its series."""
    import highdicom as hd

    src, dataset = converted
    names = _labels(dataset)
    for case in ("rt000", "rt003"):
        out = tmp_path / f"{case}_seg.dcm"
        r = run_cli("export", "seg", dataset / "labelsTr" / f"{case}.nii.gz", "--dicom", src / case,   # CT + RTSTRUCT
                    "--dataset-json", dataset / "dataset.json", "--out", out, env=ONE_THREAD)
        assert r.returncode == 0, r.stderr
        seg = hd.seg.segread(str(out))
        ct = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in (src / case / "CT").iterdir()]
        normal = np.cross(*np.reshape(np.asarray(ct[0].ImageOrientationPatient, float), (2, 3)))
        ct.sort(key=lambda s: float(np.dot(np.asarray(s.ImagePositionPatient, float), normal)))
        assert seg.FrameOfReferenceUID == ct[0].FrameOfReferenceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct[0].SeriesInstanceUID
        assert {uid for _, _, uid in seg.get_source_image_uids()} <= {s.SOPInstanceUID for s in ct}
        labels = {seg.get_segment_description(n).segment_label: n for n in seg.get_segment_numbers()}
        assert set(labels) == set(names)
        pixels = seg.get_pixels_by_source_instance([s.SOPInstanceUID for s in ct], combine_segments=True)
        label = _read(dataset / "labelsTr" / f"{case}.nii.gz")
        for name, value in names.items():
            assert _dice(label == value, pixels == labels[name]) == 1.0, (case, name)


# ------------------------------------------------------------------ exact shapes, geometry rule

def _hard_label_map(shape_zyx, seed=0) -> np.ndarray:
    """Rings with an island in the hole, single voxels, corner-touching voxels, a line, regions on
    the image border, two labels touching, random blobs (many holes and saddles)."""
    nz, ny, nx = shape_zyx
    seg = np.zeros(shape_zyx, np.uint8)
    seg[1, 10:30, 10:30] = 1
    seg[1, 14:26, 14:26] = 0
    seg[1, 18:22, 18:22] = 1                      # island inside the hole (nested twice)
    seg[2, 5, 5] = seg[2, 6, 6] = seg[2, 7, 5] = 2  # single voxels touching at corners
    seg[2, 20, 3:40] = 2                          # one-voxel-wide line
    seg[3, :12, :12] = 3                          # on the image border (corner)
    seg[3, 30:, 50:] = 3
    seg[3, 12:20, 0:12] = 4                       # touches label 3 along an edge
    rng = np.random.default_rng(seed)
    blobs = rng.random((ny, nx)) > 0.55
    seg[4][blobs & (seg[4] == 0)] = 5
    seg[0, 0, :] = 2                              # first and last slice
    seg[nz - 1, :, nx - 1] = 4
    return seg


def _write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


def test_hard_shapes_come_back_voxel_for_voxel(converted, tmp_path):
    src, dataset = converted
    for case in ("rt000", "rt003"):
        reference = sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz"))
        seg = _hard_label_map(sitk.GetArrayViewFromImage(reference).shape)
        pred = _write_like(seg, reference, tmp_path / f"{case}.nii.gz")
        r = run_cli("export", "rtstruct", pred, "--dicom", src / case / "CT", "--out", tmp_path / f"{case}.dcm",
                    env=ONE_THREAD)
        assert r.returncode == 0, r.stderr
        _no_dciodvfy_error(tmp_path / f"{case}.dcm")
        _case_with_rtstruct(src / case / "CT", tmp_path / f"{case}.dcm", tmp_path / "src2" / case)
    again = _convert(tmp_path / "src2", tmp_path / "raw2", 33)
    names = _labels(again)
    assert set(names) == {f"label_{v}" for v in range(1, 6)}
    for case in ("rt000", "rt003"):
        seg = _hard_label_map(_read(dataset / "labelsTr" / f"{case}.nii.gz").shape)
        back = _read(again / "labelsTr" / f"{case}.nii.gz")
        for name, value in names.items():
            assert np.array_equal(back == value, seg == int(name.split("_")[1])), (case, name)


def test_slice_contours_nest_holes_and_stay_off_voxel_centres():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 1:8] = True
    mask[3:6, 3:6] = False
    mask[4, 4] = True
    contours = slice_contours(mask)
    assert len(contours) == 3                     # outer, hole, island
    for c in contours:
        assert c.shape[1] == 2 and len(c) >= 4
        frac = np.abs(c - np.rint(c))             # every vertex 0.4 (or 0) voxel off a centre row/column
        assert np.all(np.isclose(frac, 0.4) | np.isclose(frac, 0.0))
    xs = sorted((c[:, 0].min(), c[:, 0].max()) for c in contours)
    assert np.allclose(xs, [(0.6, 7.4), (2.4, 5.6), (3.6, 4.4)])   # 0.4 voxel off the foreground centres
    assert slice_contours(np.zeros((4, 4), bool)) == []


def test_colours_distinct():
    rgb = colours(60)
    assert len({tuple(c) for c in rgb}) == 60 and all(0 <= v <= 255 for c in rgb for v in c)


def test_prediction_written_by_nnunet_io_is_on_the_ct_grid(converted, tmp_path):
    """A label map written by nnU-Net's SimpleITKIO from the properties of the converted CT, as
    nnUNetv2_predict writes its predictions (feet-first case: direction not the identity), passes
    the geometry rule and gives the same contours as the converter's own label file."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    src, dataset = converted
    case = "rt003"
    io = SimpleITKIO()
    _, properties = io.read_images([str(dataset / "imagesTr" / f"{case}_0000.nii.gz")])
    seg, _ = io.read_seg(str(dataset / "labelsTr" / f"{case}.nii.gz"))
    io.write_seg(seg[0].astype(np.uint8), str(tmp_path / f"{case}.nii.gz"), properties)
    contours = []
    for pred, out in ((tmp_path / f"{case}.nii.gz", "nnunet.dcm"), (dataset / "labelsTr" / f"{case}.nii.gz", "own.dcm")):
        r = run_cli("export", "rtstruct", pred, "--dicom", src / case / "CT", "--dataset-json", dataset / "dataset.json",
                    "--out", tmp_path / out, env=ONE_THREAD)
        assert r.returncode == 0, r.stderr
        assert "resampled" not in r.stdout
        rs = pydicom.dcmread(str(tmp_path / out))
        contours.append([[list(c.ContourData) for c in roi.ContourSequence] for roi in rs.ROIContourSequence])
    assert contours[0] == contours[1] and sum(map(len, contours[0])) > 0


def test_other_orientation_needs_resample(converted, tmp_path):
    """The same label map stored flipped along x (same physical voxels, other direction/origin)
    is refused without --resample, and with it comes back voxel for voxel."""
    src, dataset = converted
    case = "rt001"
    label = sitk.ReadImage(str(dataset / "labelsTr" / f"{case}.nii.gz"))
    flipped = tmp_path / "flipped.nii.gz"
    sitk.WriteImage(sitk.Flip(label, [True, False, False], flipAboutOrigin=False), str(flipped))
    args = ["export", "rtstruct", flipped, "--dicom", src / case / "CT", "--dataset-json", dataset / "dataset.json"]
    r = run_cli(*args, "--out", tmp_path / "no.dcm", env=ONE_THREAD)
    assert r.returncode == 2 and not (tmp_path / "no.dcm").exists()
    assert len(r.stderr.strip().splitlines()) == 1 and str(flipped) in r.stderr and "--resample" in r.stderr
    r = run_cli(*args, "--resample", "--out", tmp_path / "rs.dcm", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    assert "resampled" in r.stdout
    _case_with_rtstruct(src / case / "CT", tmp_path / "rs.dcm", tmp_path / "src2" / case)
    again = _convert(tmp_path / "src2", tmp_path / "raw2", 34)
    a, b = sitk.GetArrayFromImage(label), _read(again / "labelsTr" / f"{case}.nii.gz")
    names2 = _labels(again)
    for name, value in _labels(dataset).items():
        assert np.array_equal(a == value, b == names2[name]), name


# ------------------------------------------------------------------ folder mode, bad input

def test_folder_one_bad_case_costs_only_itself(converted, tmp_path):
    """--dicom ROOT of per-case CT folders (no conversion report): the bad case (a prediction on
    another grid) is listed with its one-line reason, the others are written, exit 1; no
    temporary file is left (nor one a killed run left); a second run without --overwrite refuses
    the existing files."""
    src, dataset = converted
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in CASES:
        shutil.copy(dataset / "labelsTr" / f"{case}.nii.gz", pred / f"{case}.nii.gz")
    shutil.copy(dataset / "dataset.json", pred / "dataset.json")
    bad = sitk.ReadImage(str(pred / "rt001.nii.gz"))[:, :, :-1]        # one slice short
    sitk.WriteImage(bad, str(pred / "rt001.nii.gz"))
    dicom_root = tmp_path / "dicom"
    for case in CASES:
        shutil.copytree(src / case / "CT", dicom_root / case)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".rt000.dcm.4242.tmp").write_bytes(b"left by a killed run")
    r = run_cli("export", "seg", pred, "--dicom", dicom_root, "--out", tmp_path / "out", env=ONE_THREAD)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and str(pred / "rt001.nii.gz") in errors[0] and "size" in errors[0]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["export_report.json", "rt000.dcm", "rt003.dcm"]
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert (report["written"], report["failed"]) == (2, 1)
    assert [c["case"] for c in report["cases"] if c["status"] == "failed"] == ["rt001"]
    r = run_cli("export", "seg", pred, "--dicom", dicom_root, "--out", tmp_path / "out", env=ONE_THREAD)
    assert r.returncode == 2 and r.stderr.count("already exists") == 2


def test_folder_checks_the_ct_against_the_conversion_report(converted, tmp_path):
    """--conversion-report: each case's CT folder, series and slice UIDs come from its record; a
    CT whose slices are not the ones converted (here: the record lists them in another order)
    fails that case only."""
    src, dataset = converted
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in ("rt000", "rt003"):
        shutil.copy(dataset / "labelsTr" / f"{case}.nii.gz", pred / f"{case}.nii.gz")
    report = json.loads((dataset / "conversion_report.json").read_text())
    record = next(r for r in report["cases"] if r["case"] == "rt003")
    assert Path(record["source"]["ct_series_folder"]) == (src / "rt003" / "CT").resolve()
    record["source"]["sop_instance_uids"].reverse()
    (tmp_path / "report.json").write_text(json.dumps(report))
    r = run_cli("export", "rtstruct", pred, "--dataset-json", dataset / "dataset.json", "--conversion-report",
                tmp_path / "report.json", "--out", tmp_path / "out", env=ONE_THREAD)
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "rt003" in errors[0] and "differ from those the conversion report lists" in errors[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export_report.json", "rt000.dcm"]


def _bad(tmp: Path, src: Path, dataset: Path, what: str) -> tuple[list, str, Path]:
    """(arguments, phrase of the error, file it must name) for one bad input."""
    label = sitk.ReadImage(str(dataset / "labelsTr" / "rt000.nii.gz"))
    ct = src / "rt000" / "CT"
    pred = tmp / "pred.nii.gz"
    djson = dataset / "dataset.json"
    if what == "shifted":
        shifted = sitk.Image(label)
        shifted.SetOrigin(tuple(np.asarray(label.GetOrigin()) + (0.6, 0, 0)))
        sitk.WriteImage(shifted, str(pred))
        return [pred, "--dicom", ct], "not on the grid", pred
    if what == "size":
        sitk.WriteImage(label[:-2, :, :], str(pred))
        return [pred, "--dicom", ct], "size", pred
    if what == "float":
        sitk.WriteImage(sitk.Cast(label, sitk.sitkFloat32), str(pred))
        return [pred, "--dicom", ct], "voxel type", pred
    sitk.WriteImage(label, str(pred))
    if what == "unknown label":
        arr = sitk.GetArrayFromImage(label)
        arr[0, 0, 0] = 9
        _write_like(arr, label, pred)
        return [pred, "--dicom", ct, "--dataset-json", djson], "label value 9", pred
    if what == "empty":
        _write_like(np.zeros_like(sitk.GetArrayFromImage(label)), label, pred)
        return [pred, "--dicom", ct], "no foreground", pred
    if what == "not an image":
        pred.write_bytes(b"not a NIfTI file")
        return [pred, "--dicom", ct], "cannot be read", pred
    if what == "region labels":
        j = tmp / "dataset.json"
        j.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2], "core": 2}}))
        return [pred, "--dicom", ct, "--dataset-json", j], "region", j
    if what in ("label name too long", "backslash in a label name"):
        j = tmp / "dataset.json"
        j.write_text(json.dumps({"labels": {"background": 0, "x" * 65 if what == "label name too long" else "b\\c": 1}}))
        return [pred, "--dicom", ct, "--dataset-json", j], "cannot be a DICOM ROIName", j
    if what == "broken dataset.json":
        j = tmp / "dataset.json"
        j.write_text("{not json")
        return [pred, "--dicom", ct, "--dataset-json", j], "not an nnU-Net dataset.json", j
    if what == "no CT":
        return [pred, "--dicom", src / "rt000" / "RTSTRUCT"], "no CT image files", src / "rt000" / "RTSTRUCT"
    if what == "CT folder missing":
        return [pred, "--dicom", tmp / "nowhere"], "CT folder not found", tmp / "nowhere"
    if what == "unknown series":
        return [pred, "--dicom", ct, "--series-uid", "1.2.3"], "no CT series 1.2.3", ct
    if what == "no --dicom":
        return [pred], "--dicom CT_DIR is needed", pred
    if what == "exists":
        (tmp / "out.dcm").write_bytes(b"keep me")
        return [pred, "--dicom", ct], "already exists", tmp / "out.dcm"
    if what == "empty prediction folder":
        (tmp / "p").mkdir()
        return [tmp / "p", "--dicom", src], "no prediction files", tmp / "p"
    raise AssertionError(what)


BAD = ("shifted", "size", "float", "unknown label", "empty", "not an image", "region labels", "label name too long",
       "backslash in a label name", "broken dataset.json", "no CT", "CT folder missing", "unknown series", "no --dicom",
       "exists", "empty prediction folder")


@pytest.mark.parametrize("what", BAD)
def test_bad_input_one_line(converted, tmp_path, capsys, what):
    src, dataset = converted
    args, phrase, named = _bad(tmp_path, src, dataset, what)
    out = tmp_path / "out.dcm"
    code = main(["export", "rtstruct", *map(str, args), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and phrase in err and str(named) in err, err
    assert out.read_bytes() == b"keep me" if what == "exists" else not out.exists()
    assert not [p for p in tmp_path.rglob(".*.tmp")]


# ------------------------------------------------------------------ the standard, references, de-identified CTs

def _no_dciodvfy_error(path: Path) -> list[str]:
    errors, warnings = dciodvfy(path)
    assert errors == [], (path, errors)
    return warnings


def test_dciodvfy_finds_no_error_in_rtstruct_and_seg(converted, exported, tmp_path):
    """dciodvfy (dicom3tools: its own data dictionary and IOD/module tables, no code shared with
    pydicom or highdicom) reports no error in the exported RTSTRUCTs and SEGs (its warnings: the
    demo CT's patient name form and missing study date/time, copied from the CT)."""
    src, dataset = converted
    warnings = set()
    for case in CASES:
        warnings |= set(_no_dciodvfy_error(exported / f"{case}.dcm"))
        out = tmp_path / f"{case}_seg.dcm"
        assert main(["export", "seg", str(dataset / "labelsTr" / f"{case}.nii.gz"), "--dicom", str(src / case / "CT"),
                     "--dataset-json", str(dataset / "dataset.json"), "--out", str(out)]) == 0
        warnings |= set(_no_dciodvfy_error(out))
    print("dciodvfy warnings:", *sorted(warnings), sep="\n  ")


def _uid_refs(ds) -> list:
    """Every (nested) data set holding a ReferencedSOPInstanceUID."""
    out = [ds] if "ReferencedSOPInstanceUID" in ds else []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                out += _uid_refs(item)
    return out


def test_references_resolve_and_the_check_catches_broken_ones(converted, exported, tmp_path):
    """verify_references (run by export before writing) accepts the written files: every
    referenced slice is one of the CT's, frame of reference, study and series the CT's. A file with
    one contour or one SEG frame pointing at another image, an empty reference, or another frame
    of reference is refused naming the CT folder."""
    import copy

    src, dataset = converted
    ct = load_ct(src / "rt000" / "CT")
    out = tmp_path / "seg.dcm"
    assert main(["export", "seg", str(dataset / "labelsTr" / "rt000.nii.gz"), "--dicom", str(src / "rt000" / "CT"),
                 "--out", str(out)]) == 0
    for path in (exported / "rt000.dcm", out):
        good = pydicom.dcmread(str(path))
        verify_references(good, ct)
        refs = _uid_refs(good)
        assert len(refs) > len(ct.slices)               # contours / frames and the series' slice list
        for breakage in ("other image", "empty", "frame"):
            bad = copy.deepcopy(good)
            if breakage == "frame":
                bad.FrameOfReferenceUID = pydicom.uid.generate_uid()
            else:
                _uid_refs(bad)[-1].ReferencedSOPInstanceUID = (pydicom.uid.generate_uid()
                                                               if breakage == "other image" else "")
            with pytest.raises(ConversionError, match=str(ct.folder)):
                verify_references(bad, ct)


BLANKED = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _deidentify(ct_dir: Path, dest: Path, how: str) -> Path:
    """A copy of a CT series whose SOP, Study and Series Instance UIDs an anonymiser blanked
    (``how="blank"``: empty values, file meta too) or removed (``"absent"``)."""
    dest.mkdir(parents=True)
    for path in sorted(ct_dir.iterdir()):
        ds = pydicom.dcmread(str(path))
        for keyword in BLANKED:
            if how == "blank":
                setattr(ds, keyword, "")
            else:
                delattr(ds, keyword)
        ds.file_meta.MediaStorageSOPInstanceUID = ""
        ds.save_as(str(dest / path.name))
    return dest


@pytest.mark.parametrize("how", ("blank", "absent"))
@pytest.mark.parametrize("kind", ("rtstruct", "seg"))
def test_deidentified_ct_without_uids_is_refused(converted, tmp_path, capsys, kind, how):
    """A CT whose SOP/Study/Series Instance UIDs were blanked (or removed): one line naming a CT
    file and the missing UID, exit 2, nothing written (new UIDs would reference no image the
    planning system holds)."""
    src, dataset = converted
    ct = _deidentify(src / "rt000" / "CT", tmp_path / "CT", how)
    out = tmp_path / "out.dcm"
    code = main(["export", kind, str(dataset / "labelsTr" / "rt000.nii.gz"), "--dicom", str(ct), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "SOPInstanceUID" in err, err
    assert any(str(p) in err for p in ct.iterdir()), err
    assert not out.exists() and not list(tmp_path.rglob(".*.tmp"))


def test_deidentified_case_costs_only_itself_in_folder_mode(converted, tmp_path, capsys):
    """export seg of a folder whose rt000 CT lost its UIDs: rt000 is listed as failed (the missing
    UID named), rt003 is written, exit 1."""
    src, dataset = converted
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in ("rt000", "rt003"):
        shutil.copy(dataset / "labelsTr" / f"{case}.nii.gz", pred / f"{case}.nii.gz")
    _deidentify(src / "rt000" / "CT", tmp_path / "dicom" / "rt000", "blank")
    shutil.copytree(src / "rt003" / "CT", tmp_path / "dicom" / "rt003")
    code = main(["export", "seg", str(pred), "--dicom", str(tmp_path / "dicom"), "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 1
    assert len(err) == 1 and "rt000" in err[0] and "SOPInstanceUID" in err[0], err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export_report.json", "rt003.dcm"]


def _blank_references(rtstruct: Path, dest: Path, series_only: bool = False) -> None:
    """A copy of an RTSTRUCT whose references to the CT were blanked: the referenced series, and
    (unless ``series_only``) every ReferencedSOPInstanceUID of its contours and slice list."""
    ds = pydicom.dcmread(str(rtstruct))
    for frame in ds.ReferencedFrameOfReferenceSequence:
        for study in frame.RTReferencedStudySequence:
            for series in study.RTReferencedSeriesSequence:
                series.SeriesInstanceUID = ""
                if not series_only:
                    for ref in series.ContourImageSequence:
                        ref.ReferencedSOPInstanceUID = ""
    if not series_only:
        for roi in ds.ROIContourSequence:
            for contour in roi.ContourSequence:
                for ref in contour.get("ContourImageSequence", []):
                    ref.ReferencedSOPInstanceUID = ""
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(dest))


def test_convert_an_empty_series_reference_picks_no_blank_series(converted, tmp_path):
    """convert dicom-rt --ct-series referenced, a case with the CT and a de-identified copy whose
    SeriesInstanceUID is empty, and an RTSTRUCT whose referenced SeriesInstanceUID is empty too:
    the empty reference matches neither series (refused, naming the RTSTRUCT)."""
    src, _ = converted
    case = tmp_path / "src" / "rt000"
    shutil.copytree(src / "rt000" / "CT", case / "CT")
    _deidentify(src / "rt000" / "CT", case / "CT_deid", "blank")
    _blank_references(src / "rt000" / "RTSTRUCT" / "RS.dcm", case / "RTSTRUCT" / "RS.dcm", series_only=True)
    r = run_cli("convert", "dicom-rt", tmp_path / "src", "--dataset-id", 36, "--name", "RT", "--ct-series",
                "referenced", "--out", tmp_path / "raw", env=ONE_THREAD)
    assert r.returncode == 2, r.stderr
    assert "references none of the 2 CT series" in r.stderr and str(case / "RTSTRUCT" / "RS.dcm") in r.stderr, r.stderr


def test_convert_places_contours_by_geometry_when_references_are_blank(converted, tmp_path):
    """A de-identified pair (CT UIDs and every RTSTRUCT reference blanked): no contour is matched
    to a slice through an empty UID (a reader doing so puts every contour on every slice); each
    is placed on its own slice plane, and the labels equal those of the original pair."""
    src, dataset = converted
    case = tmp_path / "src" / "rt000"
    _deidentify(src / "rt000" / "CT", case / "CT", "blank")
    _blank_references(src / "rt000" / "RTSTRUCT" / "RS.dcm", case / "RTSTRUCT" / "RS.dcm")
    again = _convert(tmp_path / "src", tmp_path / "raw", 37)
    a, b = _read(dataset / "labelsTr" / "rt000.nii.gz"), _read(again / "labelsTr" / "rt000.nii.gz")
    names2 = _labels(again)
    for name, value in _labels(dataset).items():
        assert np.array_equal(a == value, b == names2[name]), name


def test_long_contour_keeps_its_vr(tmp_path, capsys):
    """A noisy body outline on a 512 x 512 CT: one contour of ~3000 vertices, ContourData over
    64 KiB, more than an explicit-VR DS element's 16-bit length can hold (pydicom would silently
    write it as UN, which readers cannot decode). The RTSTRUCT (implicit VR little endian) keeps it
    DS: dciodvfy finds no error and the vertices read back."""
    from scipy import ndimage

    from organmtl.demo_data.dicom_rt import Case, SeriesGeometry, write_ct_series

    g = SeriesGeometry.centred((0.0, 0.0, 100.0), shape_zyx=(2, 512, 512), spacing_xyz=(0.977, 0.977, 2.5))
    write_ct_series(tmp_path / "CT", Case("big", g, np.zeros((2, 512, 512), np.int16), [], 0))
    ct = load_ct(tmp_path / "CT")
    yy, xx = np.mgrid[:512, :512]
    noise = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((512, 512)), 1.0)
    body = ((xx - 256.3) / 250) ** 2 + ((yy - 250.7) / 250) ** 2 + 0.08 * noise / noise.std() < 1
    parts, n = ndimage.label(body)
    body = ndimage.binary_fill_holes(parts == 1 + np.argmax(ndimage.sum(body, parts, range(1, n + 1))))
    seg = np.zeros((2, 512, 512), np.uint8)
    seg[1] = body
    pred = sitk.GetImageFromArray(seg)
    pred.CopyInformation(ct.reference_image())
    sitk.WriteImage(pred, str(tmp_path / "pred.nii.gz"))
    out = tmp_path / "rs.dcm"
    assert main(["export", "rtstruct", str(tmp_path / "pred.nii.gz"), "--dicom", str(tmp_path / "CT"),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    _no_dciodvfy_error(out)
    contour = pydicom.dcmread(str(out)).ROIContourSequence[0].ContourSequence[0]
    assert contour[0x30060050].VR == "DS"
    points = np.asarray(contour.ContourData, float).reshape(-1, 3)
    assert len(points) == contour.NumberOfContourPoints > 2500
    assert np.allclose(points[:, 2], ct.positions[1][2])
