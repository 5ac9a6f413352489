"""The bad-input corpus of ``organmtl convert``: each bad input gives one line naming the file and
the problem. A bad case costs only itself (the others are converted, exit code 1, the case and its
reason in conversion_report.json and on stderr); ``--strict`` stops at it (exit 2, nothing
written); a bad option or source, or a run where nothing converts, exits 2 with nothing written.
Also: kill -9 during a conversion leaves a state from which a re-run completes with whole output.

The other converters' corruptions are those of their own test modules (imported here) run
without ``--strict``: the same inputs, now as the one bad case of a multi-case run.
"""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from organmtl.cli import main
from organmtl.converters.common import CaseRunner, ConversionError
from organmtl.demo_data.dicom_rt import make_case, save, write_case, write_dicom_rt
from tests.test_converters_dicom_rt import add_roi, edit_rtstruct, roi_contours

DATASET = "Dataset009_T"


def _convert(source, out, *extra, converter="dicom-rt", dataset_id="9"):
    return main(["convert", converter, *map(str, source if isinstance(source, list) else [source]), "--dataset-id",
                 dataset_id, "--name", "T", "--out", str(out), *map(str, extra)])


def _stderr_lines(capsys, marker):
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
            if marker in line or "Traceback" in line]


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def _assert_partial(out: Path, dataset: str, bad_case: str, good_cases: list, culprit: str, problem: str,
                    err: list) -> None:
    """Exit 1 checked by the caller; one stderr line for the bad case; the report lists it; the
    good cases (and only they) are in the output, whole."""
    assert len(err) == 1 and f"case {bad_case} " in err[0] and culprit in err[0] and problem in err[0], err
    ds = out / dataset
    report = json.loads((ds / "conversion_report.json").read_text())
    assert report["status"] == "partial" and report["counts"]["failed"] == 1
    assert [f["case"] for f in report["failed"]] == [bad_case]
    assert culprit in report["failed"][0]["error"] and problem in report["failed"][0]["error"]
    assert "\n" not in report["failed"][0]["error"]
    names = sorted(p.name for p in (ds / "imagesTr").iterdir()) + sorted(p.name for p in (ds / "labelsTr").iterdir())
    assert not any(n.startswith(f"{bad_case}_") or n.startswith(f"{bad_case}.") for n in names), names
    for case in good_cases:
        assert any(n.startswith(f"{case}_0000") for n in names) and any(n.startswith(f"{case}.") for n in names), names
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == len([n for n in os.listdir(ds / "labelsTr")])


# ------------------------------------------------------------------ the case runner

def _half_written(task):
    """Write a case's image, then fail for case 'b' before its label map (a case cut short)."""
    out, case = task
    (out / "imagesTr" / f"{case}_0000.nii.gz").write_text("image")
    if case == "b":
        raise ConversionError(f"{case}.nrrd: broken\nsecond line")
    (out / "labelsTr" / f"{case}.nii.gz").write_text("label")
    return case


@pytest.mark.parametrize("jobs", [1, 2])
def test_case_runner_removes_a_failed_case_and_skips_it_later(jobs, tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    (tmp_path / "imagesTr" / "b_extra_0000.nii.gz").write_text("another case whose id starts with b_")
    runner = CaseRunner(jobs=jobs, out=tmp_path)
    tasks = [(tmp_path, c) for c in ("a", "b", "c")]
    assert runner(_half_written, tasks, case=lambda t: t[1]) == ["a", "c"]
    assert [(f.case, f.split, f.error) for f in runner.failures] == [("b", "train", "b.nrrd: broken second line")]
    assert sorted(os.listdir(tmp_path / "imagesTr")) == ["a_0000.nii.gz", "b_extra_0000.nii.gz", "c_0000.nii.gz"]
    assert runner(lambda t: t[1], tasks, jobs=1, case=lambda t: t[1]) == ["a", "c"]     # b is not retried
    with pytest.raises(ConversionError, match="b.nrrd: broken"):
        CaseRunner(jobs=jobs, strict=True, out=tmp_path)(_half_written, tasks, case=lambda t: t[1])
    with pytest.raises(ConversionError, match="b.nrrd: broken"):                      # the only case fails
        CaseRunner(jobs=jobs, out=tmp_path)(_half_written, tasks[1:2], case=lambda t: t[1])


# ------------------------------------------------------------------ DICOM CT + RTSTRUCT: one bad case

@pytest.fixture(scope="module")
def rt_pair(tmp_path_factory) -> Path:
    """Two demo cases: rt000 stays good, rt001 is damaged by each test."""
    root = tmp_path_factory.mktemp("bad_rt") / "src"
    write_dicom_rt(root, 2, seed=0)
    return root


def _slices(case: Path) -> list[Path]:
    """The case's CT slice files in position order (lowest z first)."""
    ct = case / "CT"
    z = {p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in ct.iterdir()}
    return sorted(z, key=z.get)


def _edit_slice(path: Path, edit) -> str:
    ds = pydicom.dcmread(path)
    edit(ds)
    save(ds, path)
    return path.name


def _second_rtstruct(case: Path, **changes) -> str:
    ds = pydicom.dcmread(case / "RTSTRUCT" / "RS.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.77"
    for k, v in changes.items():
        setattr(ds, k, v)
    save(ds, case / "RTSTRUCT" / "RS_v2.dcm")
    return "RS_v2.dcm"


def _set_contour(ds, roi, n, **values):
    item = roi_contours(ds, roi).ContourSequence[n]
    for k, v in values.items():
        setattr(item, k, v)


def _shift_contour(ds):
    contour = roi_contours(ds, "Spinal Cord").ContourSequence[3]
    data = [float(v) for v in contour.ContourData]
    data[2::3] = [z + 1.0 for z in data[2::3]]
    contour.ContourData = data


def _other_series(ds):
    ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0] \
        .SeriesInstanceUID = "1.2.3.4.5"


def _other_frame(ds):
    for s in ds.StructureSetROISequence:
        s.ReferencedFrameOfReferenceUID = "1.2.3.4.6"


def _add_decoy_series(case: Path) -> None:
    write_case(case / "decoy", make_case(1, 7))
    shutil.rmtree(case / "decoy" / "RTSTRUCT")


def _delete(ds, keyword):
    delattr(ds, keyword)


def _truncate(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name


def _corrupt(kind: str, case: Path) -> str:
    """Damage case folder ``case`` one way; returns the name the error must give."""
    ct, sl = case / "CT", _slices(case)
    rs = lambda edit: edit_rtstruct(case, edit)  # noqa: E731
    if kind == "no CT files":
        shutil.rmtree(ct)
        return case.name
    if kind == "no RTSTRUCT":
        shutil.rmtree(case / "RTSTRUCT")
        return case.name
    if kind == "not DICOM (.dcm)":
        sl[7].write_text("hello")
        return sl[7].name
    if kind == "truncated slice":
        return _truncate(sl[7])
    if kind == "missing slice":
        sl[5].unlink()
        return sl[6].name
    if kind == "two CT series":
        _add_decoy_series(case)
        return case.name
    if kind == "references another series":
        return rs(_other_series)
    if kind == "another frame of reference":
        return rs(_other_frame)
    if kind == "contour off-plane":
        return rs(_shift_contour)
    if kind == "malformed ContourData":
        return rs(lambda ds: _set_contour(ds, "Body", 0, ContourData=[1.0, 2.0, 3.0, 4.0]))
    if kind == "NaN in ContourData":
        return rs(lambda ds: _set_contour(ds, "Body", 1, ContourData=[float("nan")] * 9, NumberOfContourPoints=3))
    if kind == "NumberOfContourPoints wrong":
        return rs(lambda ds: _set_contour(ds, "Body", 2, NumberOfContourPoints=7))
    if kind == "unknown ContourGeometricType":
        return rs(lambda ds: _set_contour(ds, "Body", 0, ContourGeometricType="SPLINE"))
    if kind == "ROIContourSequence names an unknown ROI":
        return rs(lambda ds: setattr(ds.ROIContourSequence[0], "ReferencedROINumber", 99))
    if kind == "no StructureSetROISequence":
        return rs(lambda ds: _delete(ds, "StructureSetROISequence"))
    if kind == "ROI named background":
        return rs(lambda ds: add_roi(ds, "Background", copy.deepcopy(roi_contours(ds, "Body").ContourSequence[:2])))
    if kind == "two ROIs with one name":
        return rs(lambda ds: add_roi(ds, "Parotid_R", copy.deepcopy(roi_contours(ds, "Parotid R").ContourSequence)))
    if kind == "contour on a foreign image":
        return rs(lambda ds: setattr(roi_contours(ds, "Body").ContourSequence[0].ContourImageSequence[0],
                                     "ReferencedSOPInstanceUID", "1.2.3.4.8"))
    if kind == "RTSTRUCTs with the same date":
        return _second_rtstruct(case)
    if kind == "second RTSTRUCT, --rtstruct-select only":
        _second_rtstruct(case, StructureSetDate="20240101")
        return "RS_v2.dcm"
    if kind == "no StructureSetLabel matches":
        _second_rtstruct(case, StructureSetDate="20240101")
        return case.name
    if kind == "no ImagePositionPatient":
        return _edit_slice(sl[3], lambda ds: _delete(ds, "ImagePositionPatient"))
    if kind == "no PixelSpacing":
        return _edit_slice(sl[3], lambda ds: _delete(ds, "PixelSpacing"))
    if kind == "orientation differs":
        return _edit_slice(sl[3], lambda ds: setattr(ds, "ImageOrientationPatient", [1.0, 0, 0, 0, 0.8, 0.6]))
    if kind == "slice size differs":
        return _edit_slice(sl[3], lambda ds: setattr(ds, "Rows", int(ds.Rows) - 1))
    if kind == "same slice position":
        pos = pydicom.dcmread(sl[2]).ImagePositionPatient
        return _edit_slice(sl[3], lambda ds: setattr(ds, "ImagePositionPatient", pos))
    if kind == "gantry tilt":
        return _edit_slice(sl[-1], lambda ds: setattr(ds, "ImagePositionPatient",
                                                      [float(ds.ImagePositionPatient[0]) + 1.0,
                                                       *map(float, ds.ImagePositionPatient[1:])]))
    if kind == "no pixel data":
        return _edit_slice(sl[4], lambda ds: _delete(ds, "PixelData"))
    if kind == "no BitsAllocated":
        return _edit_slice(sl[4], lambda ds: _delete(ds, "BitsAllocated"))
    if kind == "single slice":
        for p in sl[1:]:
            p.unlink()
        return sl[0].name
    if kind == "RTSTRUCT references none of two series":
        _add_decoy_series(case)
        return rs(_other_series)
    raise AssertionError(kind)


RT_BAD = {   # kind: (problem the line names, extra options)
    "no CT files": ("no CT image files", []), "no RTSTRUCT": ("no RTSTRUCT file", []),
    "not DICOM (.dcm)": ("not a DICOM file", []), "truncated slice": ("truncated", []),
    "missing slice": ("missing slice", []), "two CT series": ("2 CT series", []),
    "references another series": ("references another series", []),
    "another frame of reference": ("references another series", []),
    "contour off-plane": ("off the nearest CT slice", []), "malformed ContourData": ("malformed ContourData", []),
    "NaN in ContourData": ("malformed ContourData", []), "NumberOfContourPoints wrong": ("malformed ContourData", []),
    "unknown ContourGeometricType": ("unknown ContourGeometricType 'SPLINE'", []),
    "ROIContourSequence names an unknown ROI": ("which StructureSetROISequence does not list", []),
    "no StructureSetROISequence": ("has no StructureSetROISequence", []),
    "ROI named background": ("named like nnU-Net's 'Background' label", []),
    "two ROIs with one name": ("both map to label 'Parotid_R'", []),
    "contour on a foreign image": ("is drawn on image 1.2.3.4.8", []),
    "RTSTRUCTs with the same date": ("same StructureSetDate/Time as RS.dcm", []),
    "second RTSTRUCT, --rtstruct-select only": ("a second RTSTRUCT", ["--rtstruct-select", "only"]),
    "no StructureSetLabel matches": ("have a StructureSetLabel matching 'organmtl demo'",
                                     ["--rtstruct-select", "label=organmtl demo"]),
    "no ImagePositionPatient": ("without a valid ImagePositionPatient", []),
    "no PixelSpacing": ("without a valid PixelSpacing", []),
    "orientation differs": ("ImageOrientationPatient differs", []), "slice size differs": ("slice size differs", []),
    "same slice position": ("same slice position", []), "gantry tilt": ("off the slice normal", []),
    "no pixel data": ("no pixel data", []), "no BitsAllocated": ("without Rows/Columns/BitsAllocated", []),
    "single slice": ("single slice", []),
    "RTSTRUCT references none of two series": ("references none of the 2 CT series", ["--ct-series", "referenced"]),
}


@pytest.mark.parametrize("kind", list(RT_BAD))
def test_dicom_rt_one_bad_case(kind, rt_pair, tmp_path, capsys):
    """The bad case is listed (stderr, report) and left out, the good one converted, exit 1; with
    --strict the same input stops the run: exit 2, one error line, nothing written."""
    src = tmp_path / "src"
    shutil.copytree(rt_pair, src)
    culprit = _corrupt(kind, src / "rt001")
    problem, extra = RT_BAD[kind]
    assert _convert(src, tmp_path / "raw", *extra) == 1
    _assert_partial(tmp_path / "raw", DATASET, "rt001", ["rt000"], culprit, problem,
                    _stderr_lines(capsys, "not converted"))
    assert _convert(src, tmp_path / "strict", *extra, "--strict") == 2
    err = _stderr_lines(capsys, "error:")
    assert len(err) == 1 and culprit in err[0] and problem in err[0], err
    _assert_nothing_written(tmp_path / "strict")


def test_dicom_rt_bad_test_case(rt_pair, tmp_path, capsys):
    """A bad case of the --test source is listed with split "test"; the other test case and the
    training cases are converted."""
    test_src = tmp_path / "test"
    for i in (4, 5):
        write_case(test_src / f"rt{i:03d}", make_case(i, 0))
    culprit = _corrupt("truncated slice", test_src / "rt005")
    assert _convert(rt_pair, tmp_path / "raw", "--test", test_src) == 1
    err = _stderr_lines(capsys, "not converted")
    assert len(err) == 1 and "case rt005 (test) not converted" in err[0] and culprit in err[0], err
    ds = tmp_path / "raw" / DATASET
    report = json.loads((ds / "conversion_report.json").read_text())
    assert [(f["case"], f["split"]) for f in report["failed"]] == [("rt005", "test")]
    assert [(r["case"], r["split"]) for r in report["cases"]] == [("rt000", "train"), ("rt001", "train"),
                                                                  ("rt004", "test")]
    assert sorted(os.listdir(ds / "imagesTs")) == ["rt004_0000.nii.gz"]
    assert sorted(os.listdir(ds / "labelsTs")) == ["rt004.nii.gz"]


def test_dicom_rt_every_test_case_bad_is_partial(rt_pair, tmp_path, capsys):
    """A --test folder whose cases all fail costs only those cases: the training cases are written
    (no imagesTs/labelsTs), each test case has its stderr line and report entry, exit 1."""
    test_src = tmp_path / "test"
    for i in (4, 5):
        write_case(test_src / f"rt{i:03d}", make_case(i, 0))
    culprits = [_corrupt("truncated slice", test_src / case) for case in ("rt004", "rt005")]
    assert _convert(rt_pair, tmp_path / "raw", "--test", test_src) == 1
    err = _stderr_lines(capsys, "not converted")
    assert len(err) == 2 and all(f"case {c} (test) not converted" in e and f in e
                                 for c, f, e in zip(("rt004", "rt005"), culprits, err)), err
    ds = tmp_path / "raw" / DATASET
    report = json.loads((ds / "conversion_report.json").read_text())
    assert report["status"] == "partial" and report["counts"]["failed"] == 2
    assert [(f["case"], f["split"]) for f in report["failed"]] == [("rt004", "test"), ("rt005", "test")]
    assert [(r["case"], r["split"]) for r in report["cases"]] == [("rt000", "train"), ("rt001", "train")]
    assert sorted(os.listdir(ds / "imagesTr")) == ["rt000_0000.nii.gz", "rt001_0000.nii.gz"]
    assert not (ds / "imagesTs").exists() and not (ds / "labelsTs").exists() and not (ds / ".test").exists()
    assert _convert(rt_pair, tmp_path / "strict", "--test", test_src, "--strict") == 2   # --strict: first bad stops
    _assert_nothing_written(tmp_path / "strict")


def test_missing_drop_says_which_cases_and_why(tmp_path, capsys):
    """--missing drop (the default) names each dropped case and the structures it lacks, on stdout
    and as its ``reason`` in conversion_report.json; the run is complete (exit 0)."""
    from organmtl.demo_data.han import missing_structures, write_han

    ids = write_han(tmp_path / "src", 4, seed=0)
    lacking = {case: sorted(missing_structures(int(case[-4:]))) for case in ids}
    dropped = {case: names for case, names in lacking.items() if names}
    assert dropped and len(dropped) < len(ids), lacking        # the phantoms lack structures in some cases
    assert _convert(tmp_path / "src", tmp_path / "raw", converter="pddca", dataset_id="7") == 0
    out = capsys.readouterr().out.splitlines()
    assert f"  {len(dropped)} of {len(ids)} cases dropped (not written):" in out, out
    for case, names in dropped.items():
        line = [x for x in out if x.startswith(f"  {case}: dropped: ")]
        assert len(line) == 1 and all(n in line[0] for n in names) and "--missing drop" in line[0], out
    report = json.loads((tmp_path / "raw" / "Dataset007_T" / "conversion_report.json").read_text())
    reasons = {r["case"]: r.get("reason") for r in report["cases"] if r["action"] == "dropped"}
    assert sorted(reasons) == sorted(dropped)
    assert all(all(n in reasons[c] for n in names) and "--missing drop" in reasons[c] for c, names in dropped.items())


# ------------------------------------------------------------------ DICOM: bad options and sources (exit 2)

def _global(kind: str, src: Path, tmp: Path) -> tuple[list, list, str, str]:
    """(source, options, culprit, problem) of a run that must convert nothing."""
    roi_map = tmp / "map.json"
    if kind == "--plane-tolerance 0":
        return [src], ["--plane-tolerance", "0"], "--plane-tolerance", "must be positive"
    if kind == "--rtstruct-select unknown rule":
        return [src], ["--rtstruct-select", "latest"], "--rtstruct-select 'latest'", "use newest, oldest"
    if kind == "--rtstruct-select bad regex":
        return [src], ["--rtstruct-select", "label=("], "--rtstruct-select", "bad regex"
    if kind == "--priority unknown label":
        return [src], ["--priority", "Liver"], "--priority Liver", "not a label"
    if kind == "--roi-map not JSON":
        roi_map.write_text("{oops")
        return [src], ["--roi-map", roi_map], "map.json", "cannot be read as JSON"
    if kind == "--roi-map label not in the synonym table":
        roi_map.write_text(json.dumps({"Tumour": "@tg263"}))
        return [src], ["--roi-map", roi_map], "map.json", "not in the tg263 synonym table"
    if kind == "--roi-map bad regex":
        roi_map.write_text(json.dumps({"Body": "bo(dy"}))
        return [src], ["--roi-map", roi_map], "map.json", "bad regex"
    if kind == "--roi-map reserved label":
        roi_map.write_text(json.dumps({"background": "body"}))
        return [src], ["--roi-map", roi_map], "map.json", "reserved"
    if kind == "--roi-map matches no ROI":
        roi_map.write_text(json.dumps({"Liver": "liver"}))
        return [src], ["--roi-map", roi_map], str(src), "every case lacks an ROI"
    if kind == "source folder missing":
        return [tmp / "nowhere"], [], "nowhere", "source folder not found"
    if kind == "no case folder":
        (tmp / "empty").mkdir()
        return [tmp / "empty"], [], "empty", "no case folder inside"
    if kind == "every case bad":
        for case in ("rt000", "rt001"):
            shutil.rmtree(src / case / "RTSTRUCT")
        return [src], [], "rt000", "no case converted: all 2 cases failed"
    if kind == "the only case bad":
        shutil.rmtree(src / "rt000")
        _slices(src / "rt001")[7].write_text("hello")
        return [src], [], "rt001", "not a DICOM file"
    if kind == "output exists":
        (tmp / "raw" / DATASET).mkdir(parents=True)
        return [src], [], DATASET, "already exists (use --overwrite"
    raise AssertionError(kind)


RT_GLOBAL = ["--plane-tolerance 0", "--rtstruct-select unknown rule", "--rtstruct-select bad regex",
             "--priority unknown label", "--roi-map not JSON", "--roi-map label not in the synonym table",
             "--roi-map bad regex", "--roi-map reserved label", "--roi-map matches no ROI", "source folder missing",
             "no case folder", "every case bad", "the only case bad", "output exists"]


@pytest.mark.parametrize("kind", RT_GLOBAL)
def test_dicom_rt_nothing_converted_exit_2(kind, rt_pair, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(rt_pair, src)
    source, extra, culprit, problem = _global(kind, src, tmp_path)
    assert _convert(source, tmp_path / "raw", *extra) == 2
    err = _stderr_lines(capsys, "error:")
    assert len(err) == 1 and culprit in err[0] and problem in err[0], err
    if kind == "output exists":
        assert not any((tmp_path / "raw" / DATASET).iterdir())
    else:
        _assert_nothing_written(tmp_path / "raw")


# ------------------------------------------------------------------ the other converters: one bad case of many

def _assert_one_failed(ds: Path, culprit: str, problem: str, err: list) -> str:
    """One failed case (report and one stderr line, naming ``culprit`` and ``problem``), none of its
    files written, every kept case whole; returns the failed case id."""
    report = json.loads((ds / "conversion_report.json").read_text())
    assert report["status"] == "partial" and len(report["failed"]) == 1, report["failed"]
    bad = report["failed"][0]
    assert culprit in bad["error"] and problem in bad["error"], bad
    assert len(err) == 1 and f"case {bad['case']} " in err[0] and culprit in err[0], err
    names = [p.name for sub in ("imagesTr", "labelsTr") for p in (ds / sub).iterdir()]
    assert not any(n.startswith(f"{bad['case']}_0") or n.startswith(f"{bad['case']}.") for n in names), names
    kept = [r["case"] for r in report["cases"] if r["action"] != "dropped"]
    assert kept and all(f"{c}_0000" in " ".join(names) for c in kept), (kept, names)
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == len(kept) == len(os.listdir(ds / "labelsTr"))
    return bad["case"]


@pytest.mark.parametrize("kind", ["size mismatch", "geometry mismatch", "not binary", "empty mask", "truncated image",
                                  "not an image", "NaN intensities", "malformed landmarks"])
def test_pddca_one_bad_case(kind, demo_root, tmp_path, capsys):
    from tests.test_converters_pddca import _corrupt as corrupt

    src = tmp_path / "src"
    shutil.copytree(demo_root / "han_pddca", src)
    culprit = corrupt(kind, src / "0522c0002")
    assert _convert(src, tmp_path / "raw", "-j", "2", converter="pddca", dataset_id="7") == 1
    assert _assert_one_failed(tmp_path / "raw" / "Dataset007_T", culprit, "0522c0002",
                              _stderr_lines(capsys, "not converted")) == "0522c0002"


@pytest.mark.parametrize("kind,message", [("structure file not an image", "cannot be read as an image"),
                                          ("NaN in a structure mask", "NaN or Inf")])
def test_pddca_bad_structure_file(kind, message, demo_root, tmp_path, capsys):
    import numpy as np
    import SimpleITK as sitk

    src = tmp_path / "src"
    shutil.copytree(demo_root / "han_pddca", src)
    chiasm = src / "0522c0002" / "structures" / "Chiasm.nrrd"
    if kind == "structure file not an image":
        chiasm.write_text("hello")
    else:
        m = sitk.ReadImage(str(chiasm))
        a = sitk.GetArrayFromImage(m).astype(np.float32)
        a[0, 0, 0] = np.nan
        n = sitk.GetImageFromArray(a)
        n.CopyInformation(m)
        sitk.WriteImage(n, str(chiasm))
    assert _convert(src, tmp_path / "raw", converter="pddca", dataset_id="7") == 1
    assert _assert_one_failed(tmp_path / "raw" / "Dataset007_T", "Chiasm.nrrd", message,
                              _stderr_lines(capsys, "not converted")) == "0522c0002"


@pytest.mark.parametrize("kind", ["size mismatch", "geometry mismatch", "not binary", "empty mask", "truncated volume",
                                  "malformed landmarks"])
def test_visceral_one_bad_case(kind, demo_root, tmp_path, capsys):
    from tests.test_converters_visceral import _corrupt as corrupt

    src = tmp_path / "src"
    shutil.copytree(demo_root / "visceral_ct", src)
    culprit = corrupt(kind, src)
    assert _convert(src, tmp_path / "raw", "-j", "2", converter="visceral", dataset_id="8") == 1
    _assert_one_failed(tmp_path / "raw" / "Dataset008_T", culprit, "", _stderr_lines(capsys, "not converted"))


@pytest.fixture(scope="module")
def chaos_src(tmp_path_factory) -> Path:
    from organmtl.demo_data.chaos import write_chaos

    root = tmp_path_factory.mktemp("chaos") / "Train_Sets"
    write_chaos(root, 3, seed=0)
    return root


@pytest.mark.parametrize("kind", ["png count", "png transposed", "png intensity CT", "png intensity MR", "png rgb",
                                  "not dicom", "truncated dicom", "missing Ground", "mixed series",
                                  "in/out phase geometry", "duplicate position"])
def test_chaos_one_bad_patient(kind, chaos_src, tmp_path, capsys):
    from tests.test_converters_chaos import _corrupt as corrupt

    src = tmp_path / "src"
    shutil.copytree(chaos_src, src)
    modality, culprit, problem = corrupt(kind, src)
    assert _convert(src, tmp_path / "raw", "--modality", modality, converter="chaos") == 1
    _assert_one_failed(tmp_path / "raw" / "Dataset009_T", culprit, problem, _stderr_lines(capsys, "not converted"))


@pytest.mark.parametrize("kind", ["label value not in dataset.json", "image grid differs from its label map",
                                  "truncated label map"])
def test_merge_one_bad_case(kind, tmp_path, capsys):
    from tests.test_converters_merge import _bad, _label_map, write_dataset

    a = write_dataset(tmp_path / "in", "Dataset001_A", {"background": 0, "x": 1}, {"c1": _label_map([1])})
    b = write_dataset(tmp_path / "in", "Dataset002_B", {"background": 0, "y": 1, "z": 2},
                      {"c1": _label_map([1, 2]), "c2": _label_map([2])})
    if kind == "truncated label map":
        label = b / "labelsTr" / "c1.nii.gz"
        label.write_bytes(label.read_bytes()[:-40])
        args, culprit = [a, b], "c1.nii.gz: truncated file"
    else:
        args, culprit = _bad(kind, a, b)
    assert _convert(args, tmp_path / "raw", converter="merge", dataset_id="50") == 1
    assert _assert_one_failed(tmp_path / "raw" / "Dataset050_T", culprit, "",
                              _stderr_lines(capsys, "not converted")) == "B_c1"
    meta = json.loads((tmp_path / "raw" / "Dataset050_T" / "dataset.json").read_text())
    assert meta["organmtl_tasks"]["B"]["cases"] == ["B_c2"]


@pytest.mark.parametrize("problem,culprit,message", [
    ("unknown label value", "b.nrrd", "not named in the mapping"), ("geometry mismatch", "b.nrrd", "differ from"),
    ("non-integer label values", "b.nrrd", "non-integer values"), ("NaN in the image", "b.nrrd", "NaN or Inf"),
    ("image not readable", "b.nrrd", "cannot be read as an image")])
def test_volumes_one_bad_case(problem, culprit, message, tmp_path, capsys):
    import numpy as np

    from tests.test_converters_volumes import _write

    src = tmp_path / "src"
    for case in ("a", "b", "c"):
        _write(src / "images" / f"{case}.nrrd", np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32))
        liver = np.zeros((4, 5, 6), np.uint8)
        liver[1:3, 1:3, 1:4] = 6
        _write(src / "labels" / f"{case}.nrrd", liver)
    mapping = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 6}}
    (src / "mapping.json").write_text(json.dumps(mapping))
    lab = np.zeros((4, 5, 6), np.uint8)
    if problem == "unknown label value":
        lab[0, 0, 0] = 7
        _write(src / "labels" / "b.nrrd", lab)
    elif problem == "geometry mismatch":
        _write(src / "labels" / "b.nrrd", lab, spacing=(1.0, 1.0, 3.0))
    elif problem == "non-integer label values":
        _write(src / "labels" / "b.nrrd", lab.astype(np.float32) + 0.5)
    elif problem == "NaN in the image":
        img = np.zeros((4, 5, 6), np.float32)
        img[1, 2, 3] = np.nan
        _write(src / "images" / "b.nrrd", img)
    else:
        (src / "images" / "b.nrrd").write_text("not an image")
    assert _convert(src, tmp_path / "raw", converter="volumes") == 1
    assert _assert_one_failed(tmp_path / "raw" / "Dataset009_T", culprit, message,
                              _stderr_lines(capsys, "not converted")) == "b"


# ------------------------------------------------------------------ kill -9 during a conversion

def _run(args, **kw):
    exe = Path(sys.executable).parent / "organmtl"
    return subprocess.Popen([str(exe), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def _files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_kill_9_during_conversion_then_rerun_completes(tmp_path):
    """SIGKILL while cases are being written: no target folder, only a hidden temporary one; the
    re-run (same command) removes it and writes the whole dataset, byte-identical to a clean run;
    killed while replacing an old output (between the two renames), the re-run restores it."""
    src = tmp_path / "src"
    write_dicom_rt(src, 8, seed=0)
    args = ["convert", "dicom-rt", src, "--dataset-id", "9", "--name", "T"]
    assert _run([*args, "--out", tmp_path / "clean"]).wait(timeout=300) == 0
    clean = _files(tmp_path / "clean" / DATASET)

    out = tmp_path / "raw"
    proc = _run([*args, "--out", out])
    deadline = time.time() + 120
    while time.time() < deadline:
        tmp = list(out.glob(f".{DATASET}.tmp-*/imagesTr/*")) if out.is_dir() else []
        if tmp:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert tmp, "the conversion ended before the kill"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / DATASET).exists() and list(out.glob(f".{DATASET}.tmp-*"))

    assert _run([*args, "--out", out]).wait(timeout=300) == 0
    assert sorted(p.name for p in out.iterdir()) == [DATASET]           # the stale temporary is gone
    assert _files(out / DATASET) == clean

    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / DATASET).rename(out / f".{DATASET}.old-{dead.pid}")        # killed between the renames
    rerun = _run([*args, "--out", out, "--overwrite"])
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == [DATASET] and _files(out / DATASET) == clean
