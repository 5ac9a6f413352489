"""New patients' CT series without contours: finding them (loose files of several patients, a
DICOMDIR media folder or file, JPEG 2000 lossless slices), reading them exactly (HU values and
geometry equal to the demo phantom's own), ``organmtl convert dicom-ct`` (a bad series costs only
itself, exit 1; the case -> series map that ``organmtl export`` reads), and the bad-input lines
of ``organmtl predict`` / ``convert dicom-ct`` (exit 2, one line naming the file, nothing
written). The model side of ``organmtl predict`` runs in tests/e2e/test_predict_e2e.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from organmtl.cli import main
from organmtl.converters.dicom_ct import find_series, load_series
from organmtl.demo_data.dicom_rt import make_case, write_dicom_rt

SEED = 0


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Demo DICOM-RT phantoms rt000-rt003 (CT + RTSTRUCT each; rt003 feet first)."""
    root = tmp_path_factory.mktemp("dicom_ct") / "src"
    write_dicom_rt(root, 4, seed=SEED)
    return root


def _by_position(folder: Path) -> list[Path]:
    """The slice files in order along the slice normal (row x column cosines)."""
    def along(p):
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
        normal = np.cross(*np.reshape(np.asarray(ds.ImageOrientationPatient, float), (2, 3)))
        return float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal))
    return sorted((p for p in folder.iterdir() if p.name != "notes.dcm"), key=along)


def _check_exact(series, case_index: int) -> None:
    """The volume read equals the phantom's HU array and grid (slice k along the normal)."""
    case = make_case(case_index, SEED)
    assert np.array_equal(sitk.GetArrayFromImage(series.image), case.hu)
    assert np.allclose(series.image.GetOrigin(), case.geometry.position(0), atol=1e-4)
    assert np.allclose(series.image.GetDirection(), case.geometry.direction)
    assert np.allclose(series.image.GetSpacing(), case.geometry.spacing_xyz)


def test_loose_files_of_several_patients(demo):
    found = find_series(demo)
    assert [(s.case, len(s.slices)) for s in found.series] == [("rt000", 16), ("rt001", 16), ("rt002", 16), ("rt003", 16)]
    assert sorted(p.parent.parent.name for p, _ in found.skipped) == ["rt000", "rt001", "rt002", "rt003"]
    assert all("RTSTRUCT" in reason for _, reason in found.skipped) and not found.unreadable
    for index in (0, 3):                               # head first; feet first (direction not the identity)
        series = load_series(found.series[index])
        _check_exact(series, index)
        record = series.source_record()
        ct = pydicom.dcmread(str(series.paths[0]), stop_before_pixels=True)
        assert record["series_instance_uid"] == ct.SeriesInstanceUID
        assert record["frame_of_reference_uid"] == ct.FrameOfReferenceUID
        assert Path(record["ct_series_folder"]) == (demo / f"rt00{index}" / "CT").resolve()
        assert [Path(record["ct_series_folder"]) / f for f in record["ct_files"]] == \
            [p.resolve() for p in _by_position(demo / f"rt00{index}" / "CT")]


def test_two_series_of_one_patient_get_their_series_numbers(demo, tmp_path):
    shutil.copytree(demo / "rt001" / "CT", tmp_path / "a")
    for p in (tmp_path / "a").iterdir():               # a second series of the same patient
        ds = pydicom.dcmread(str(p))
        ds.SeriesInstanceUID, ds.SeriesNumber = ds.SeriesInstanceUID + ".2", 7
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.save_as(str(tmp_path / "a" / f"b_{p.name}"), enforce_file_format=True)
        p.unlink()
    shutil.copytree(demo / "rt001" / "CT", tmp_path / "b")
    assert [s.case for s in find_series(tmp_path).series] == ["rt001_s1", "rt001_s7"]


def test_dicomdir_folder_and_file(demo, tmp_path):
    """A media folder written by pydicom's FileSet (PT*/ST*/SE*/IM* names, no suffix): the folder
    and its DICOMDIR give the same series; the DICOMDIR is not a series."""
    from pydicom.fileset import FileSet

    fs = FileSet()
    for case in ("rt000", "rt003"):
        for p in sorted((demo / case / "CT").iterdir()):
            ds = pydicom.dcmread(str(p))
            ds.StudyDate, ds.StudyTime = "20260101", "120000"     # required by the STUDY record
            fs.add(ds)
    fs.write(str(tmp_path / "media"))
    by_folder = find_series(tmp_path / "media")
    by_file = find_series(tmp_path / "media" / "DICOMDIR")
    for found in (by_folder, by_file):
        assert [(s.case, len(s.slices)) for s in found.series] == [("rt000", 16), ("rt003", 16)]
        assert all(p.parent.name.startswith("SE") for s in found.series for p, _ in s.slices)
    assert [reason for _, reason in by_folder.skipped] == ["DICOMDIR (media directory)"]
    assert by_file.skipped == []
    _check_exact(load_series(by_file.series[1]), 3)


def test_jpeg2000_lossless_series_reads_exactly(demo, tmp_path):
    """The feet-first phantom's slices re-encoded as JPEG 2000 lossless (OpenJPEG through
    imagecodecs, encapsulated by pydicom) read back to the same HU values and grid."""
    import imagecodecs
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    out = tmp_path / "j2k"
    out.mkdir()
    for p in (demo / "rt003" / "CT").iterdir():
        ds = pydicom.dcmread(str(p))
        code = imagecodecs.jpeg2k_encode(ds.pixel_array, codecformat="J2K", reversible=True,
                                         bitspersample=int(ds.BitsStored))
        ds.PixelData = encapsulate([code])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.save_as(str(out / p.name), enforce_file_format=True)
    one = pydicom.dcmread(str(next(out.iterdir())))
    assert one.file_meta.TransferSyntaxUID == JPEG2000Lossless and one.PixelData[:2] != b"\0\0"
    series = load_series(find_series(out).series[0])
    _check_exact(series, 3)
    assert series.source_record()["transfer_syntax"] == JPEG2000Lossless


def test_convert_dicom_ct_bad_series_costs_only_itself(demo, tmp_path):
    """rt001 lacks a middle slice, one slice of rt002 has its pixel data cut short, a text file
    named .dcm lies beside rt000: exit 1, imagesTs holds rt000 and rt003 (as read), the report
    maps each case to its series and lists both failures (naming the file) and the unreadable
    file; organmtl export reads the map."""
    from organmtl.converters.export_dicom import case_sources

    src = tmp_path / "src"
    shutil.copytree(demo, src, ignore=shutil.ignore_patterns("RTSTRUCT"))
    _by_position(src / "rt001" / "CT")[7].unlink()
    cut = _by_position(src / "rt002" / "CT")[4]
    cut.write_bytes(cut.read_bytes()[:-3000])
    (src / "rt000" / "CT" / "notes.dcm").write_text("not DICOM")
    out = tmp_path / "new"
    assert main(["convert", "dicom-ct", str(src), "--out", str(out)]) == 1
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == ["rt000_0000.nii.gz", "rt003_0000.nii.gz"]
    for index in (0, 3):
        image = sitk.ReadImage(str(out / "imagesTs" / f"rt00{index}_0000.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(image), make_case(index, SEED).hu)
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["converter"] == "dicom-ct" and report["status"] == "partial"
    assert report["counts"] == {"cases": 4, "converted": 2, "dropped": 0, "failed": 2}
    failed = {f["case"]: f["error"] for f in report["failed"]}
    assert set(failed) == {"rt001", "rt002"} and "missing slice" in failed["rt001"]
    assert failed["rt002"] == f"{cut}: CT pixel data cannot be read"
    assert [Path(u["file"]).name for u in report["unreadable_files"]] == ["notes.dcm"]
    sources = case_sources(out / "conversion_report.json")
    assert set(sources) == {"rt000", "rt003"}
    for case, (folder, series_uid, sops) in sources.items():
        slices = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in _by_position(src / case / "CT")]
        assert folder == (src / case / "CT").resolve()
        assert series_uid == slices[0].SeriesInstanceUID and sops == [s.SOPInstanceUID for s in slices]


def _bad_predict(tmp: Path, demo: Path, what: str):
    """(arguments, phrase, named path) of one bad ``organmtl predict`` call."""
    model = ["-d", "452", "-c", "3d_tiny", "-tr", "nnUNetTrainerOMTLBaseline_Tiny"]
    if what == "input missing":
        return [tmp / "nowhere", tmp / "out", *model], "not found", tmp / "nowhere"
    if what == "no CT":
        (tmp / "docs").mkdir()
        (tmp / "docs" / "notes.txt").write_text("no DICOM here")
        return [tmp / "docs", tmp / "out", *model], "no CT image files", tmp / "docs"
    if what == "image with rtstruct":
        image = sitk.Image([4, 4, 4], sitk.sitkInt16)
        sitk.WriteImage(image, str(tmp / "ct.nii.gz"))
        return [tmp / "ct.nii.gz", tmp / "out", *model, "--format", "rtstruct"], "--format nifti", tmp / "ct.nii.gz"
    if what == "no model":
        return [demo, tmp / "out", "-d", "452"], "-c, -tr missing", demo
    if what == "both backends":
        (tmp / "cfg.yaml").write_text("MODEL: {}\n")
        return [demo, tmp / "out", *model, "--detectron-config", tmp / "cfg.yaml", "--weights", tmp / "w.pth"], \
            "give one or the other", tmp / "cfg.yaml"
    if what == "model folder missing":
        (tmp / "res" / "Dataset452_RT").mkdir(parents=True)
        folder = tmp / "res" / "Dataset452_RT" / "nnUNetTrainerOMTLBaseline_Tiny__nnUNetPlans__3d_tiny"
        return [demo, tmp / "out", *model], "model folder not found", folder
    if what == "unknown dataset":
        (tmp / "res").mkdir()
        return [demo, tmp / "out", *model], "no trained dataset(s) with id 452", tmp / "res"
    raise AssertionError(what)


BAD = ("input missing", "no CT", "image with rtstruct", "no model", "both backends", "model folder missing",
       "unknown dataset")


@pytest.mark.parametrize("what", BAD)
def test_predict_bad_input_one_line(demo, tmp_path, capsys, monkeypatch, what):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    args, phrase, named = _bad_predict(tmp_path, demo, what)
    code = main(["predict", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and phrase in err and str(named) in err, err
    assert not (tmp_path / "out").exists()


def test_convert_dicom_ct_bad_input_one_line(demo, tmp_path, capsys):
    code = main(["convert", "dicom-ct", str(demo / "rt000" / "RTSTRUCT" / "RS.dcm"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not a folder or a DICOMDIR" in err
    assert str(demo / "rt000" / "RTSTRUCT" / "RS.dcm") in err and not (tmp_path / "o").exists()
