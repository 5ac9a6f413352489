"""VISCERAL Anatomy3 converter: RadLex table, exact geometry and labels, modality filter, missing
structures, landmarks dropped and reported, byte-identical re-runs, nnU-Net's integrity check,
COCO export, and a corpus of bad inputs run through the command line."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given

from organmtl.cli import main
from organmtl.converters.visceral import RADLEX
from organmtl.demo_data.visceral import RADLEX as DEMO_RADLEX
from tests.helpers import dataset_json, file_examples, geometries, read_array, rotation, run_cli

STEM = "10000102_1_CT_wb"        # a demo case without landmark problems
CASE = "10000102_1"


def _convert(src, out, *extra):
    return main(["convert", "visceral", str(src), "--dataset-id", "8", "--name", "V", "--out", str(out), *extra])


def _report(ds):
    return {r["case"]: r for r in json.loads((ds / "conversion_report.json").read_text())["cases"]}


@pytest.fixture
def src(demo_root, tmp_path):
    """A writable copy of the demo VISCERAL folder (6 CT cases, 4 structures)."""
    dst = tmp_path / "src"
    shutil.copytree(demo_root / "visceral_ct", dst)
    return dst


# ------------------------------------------------------------------ the RadLex table

def test_radlex_table_has_the_20_anatomy3_structures():
    assert len(RADLEX) == 20 and len(set(RADLEX.values())) == 20
    assert all(k.isdigit() for k in RADLEX)
    expected = {"58": "liver", "86": "spleen", "170": "pancreas", "187": "gallbladder", "237": "urinary_bladder",
                "480": "aorta", "1247": "trachea", "1302": "lung_right", "1326": "lung_left", "2473": "sternum",
                "7578": "thyroid_gland", "29193": "lumbar_vertebra_1", "29662": "kidney_right",
                "29663": "kidney_left", "30324": "adrenal_gland_right", "30325": "adrenal_gland_left",
                "32248": "psoas_major_right", "32249": "psoas_major_left", "40357": "rectus_abdominis_right",
                "40358": "rectus_abdominis_left"}
    assert RADLEX == expected
    assert list(RADLEX) == sorted(RADLEX, key=int)               # label order = ascending RadLex id
    assert all(RADLEX[rid] == name for rid, name in DEMO_RADLEX.items())   # the demo data agrees


# ------------------------------------------------------------------ geometry round trip

def _write_case(root: Path, stem: str, shape, spacing, origin, direction, rng, rids=("58", "86"), ext=".nrrd"):
    img = sitk.GetImageFromArray(rng.integers(-1000, 1000, shape).astype(np.int16))
    img.SetSpacing(spacing), img.SetOrigin(origin), img.SetDirection(direction)
    (root / "Volumes").mkdir(parents=True, exist_ok=True)
    (root / "Segmentations").mkdir(exist_ok=True)
    sitk.WriteImage(img, str(root / "Volumes" / f"{stem}{ext}"))
    for k, rid in enumerate(rids):
        m = np.zeros(shape, np.uint8)
        m[k * shape[0] // len(rids): (k + 1) * shape[0] // len(rids) or 1, : shape[1] // 2 + 1] = 1
        mi = sitk.GetImageFromArray(m)
        mi.CopyInformation(img)
        sitk.WriteImage(mi, str(root / "Segmentations" / f"{stem}_{rid}_1{ext}"))


geometry = geometries(((2, 8), (2, 8), (2, 8)))


@file_examples(8)
@given(geometry)
def test_geometry_and_labels_round_trip(tmp_path_factory, geom):
    shape, spacing, origin, angles = geom
    tmp = tmp_path_factory.mktemp("rt")
    _write_case(tmp / "src", "42_1_CT_wb", shape, spacing, origin, tuple(rotation(angles).ravel()),
                np.random.default_rng(0))
    assert _convert(tmp / "src", tmp / "raw", "--file-ending", ".nrrd") == 0
    ds = tmp / "raw" / "Dataset008_V"
    source = sitk.ReadImage(str(tmp / "src" / "Volumes" / "42_1_CT_wb.nrrd"))   # NRRD keeps geometry in double
    out_img = sitk.ReadImage(str(ds / "imagesTr" / "42_1_0000.nrrd"))
    seg = sitk.ReadImage(str(ds / "labelsTr" / "42_1.nrrd"))
    for o in (out_img, seg):
        assert o.GetSize() == source.GetSize()
        for get in ("GetSpacing", "GetOrigin", "GetDirection"):
            np.testing.assert_allclose(getattr(o, get)(), getattr(source, get)(), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out_img), sitk.GetArrayFromImage(source))
    assert dataset_json(ds)["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    arr = sitk.GetArrayFromImage(seg)
    for value, rid in ((1, "58"), (2, "86")):
        mask = read_array(tmp / "src" / "Segmentations" / f"42_1_CT_wb_{rid}_1.nrrd") > 0
        if rid == "58":
            mask &= read_array(tmp / "src" / "Segmentations" / "42_1_CT_wb_86_1.nrrd") == 0   # spleen wins overlaps
        np.testing.assert_array_equal(arr == value, mask)


# ------------------------------------------------------------------ the demo data

def test_demo_labels_images_and_landmarks(src, tmp_path, capsys):
    assert _convert(src, tmp_path / "raw") == 0
    out = capsys.readouterr().out
    ds = tmp_path / "raw" / "Dataset008_V"
    meta = dataset_json(ds)
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 6
    assert meta["organmtl_visceral"] == {"modality": "CT", "radlex": {"liver": "58", "spleen": "86",
                                                                      "kidney_right": "29662", "kidney_left": "29663"}}
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == [f"1000010{i}_1.nii.gz" for i in range(6)]
    for i in range(6):
        stem, case = f"1000010{i}_1_CT_wb", f"1000010{i}_1"
        seg = read_array(ds / "labelsTr" / f"{case}.nii.gz")
        for value, name in enumerate(meta["labels"]):
            if value:
                rid = meta["organmtl_visceral"]["radlex"][name]
                np.testing.assert_array_equal(seg == value, read_array(src / "Segmentations" / f"{stem}_{rid}_1.nii.gz") > 0)
        np.testing.assert_array_equal(read_array(ds / "imagesTr" / f"{case}_0000.nii.gz"),
                                      read_array(src / "Volumes" / f"{stem}.nii.gz"))
    report = _report(ds)
    for case in report:                       # every third demo case: one point outside, one duplicated
        lm = json.loads((ds / "landmarks" / f"{case}.json").read_text())
        assert [p["name"] for p in lm["landmarks"]] == ["renal_pelvis_right", "renal_pelvis_left"]
        dropped = {(d["name"], d["reason"]) for d in lm["dropped"]}
        if case in ("10000100_1", "10000103_1"):
            assert dropped == {("misplaced_outside", "outside the image"),
                               ("renal_pelvis_right", "duplicate of renal_pelvis_right")}
            assert f"{case}: landmark 'misplaced_outside' dropped (outside the image)" in out
        else:
            assert dropped == set()
        assert report[case]["landmarks_dropped"] == lm["dropped"]
    # voxel coordinates agree with the image geometry
    img = sitk.ReadImage(str(src / "Volumes" / "10000100_1_CT_wb.nii.gz"))
    first = json.loads((ds / "landmarks" / "10000100_1.json").read_text())["landmarks"][0]
    np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint(first["voxel_xyz"]), first["lps_mm"],
                               atol=1e-3)


def test_unknown_radlex_id_is_reported_and_skipped(src, tmp_path, capsys):
    shutil.copy(src / "Segmentations" / f"{STEM}_58_1.nii.gz", src / "Segmentations" / f"{STEM}_99999_1.nii.gz")
    assert _convert(src, tmp_path / "raw") == 0
    assert f"{STEM}_99999_1.nii.gz skipped" in capsys.readouterr().out
    ds = tmp_path / "raw" / "Dataset008_V"
    assert _report(ds)["10000102_1"]["skipped"] == [
        {"file": f"{STEM}_99999_1.nii.gz", "reason": "RadLex id not among the Anatomy3 structures"}]
    assert len(dataset_json(ds)["labels"]) == 5


def test_structures_subset_and_missing_policies(src, tmp_path):
    assert _convert(src, tmp_path / "sub", "--structures", "kidney_left", "liver") == 0
    ds = tmp_path / "sub" / "Dataset008_V"
    assert dataset_json(ds)["labels"] == {"background": 0, "kidney_left": 1, "liver": 2}
    seg = read_array(ds / "labelsTr" / "10000102_1.nii.gz")
    np.testing.assert_array_equal(seg == 1, read_array(src / "Segmentations" / f"{STEM}_29663_1.nii.gz") > 0)
    assert set(np.unique(seg)) == {0, 1, 2}

    (src / "Segmentations" / f"{STEM}_86_1.nii.gz").unlink()          # case 10000102_1 lacks its spleen
    assert _convert(src, tmp_path / "drop") == 0
    report = _report(tmp_path / "drop" / "Dataset008_V")
    assert report["10000102_1"]["action"] == "dropped" and report["10000102_1"]["missing"] == ["spleen"]
    assert dataset_json(tmp_path / "drop" / "Dataset008_V")["numTraining"] == 5

    assert _convert(src, tmp_path / "ign", "--missing", "ignore") == 0
    ds = tmp_path / "ign" / "Dataset008_V"
    assert dataset_json(ds)["labels"]["ignore"] == 5
    assert set(np.unique(read_array(ds / "labelsTr" / "10000102_1.nii.gz"))) == {1, 3, 4, 5}
    assert set(np.unique(read_array(ds / "labelsTr" / "10000101_1.nii.gz"))) == {0, 1, 2, 3, 4}

    assert _convert(src, tmp_path / "bg", "--missing", "background") == 0
    seg = read_array(tmp_path / "bg" / "Dataset008_V" / "labelsTr" / "10000102_1.nii.gz")
    assert set(np.unique(seg)) == {0, 1, 3, 4}


def test_modality_filter(src, tmp_path, capsys):
    """One modality per dataset: a second one is refused unless --modality picks one."""
    shutil.copy(src / "Volumes" / f"{STEM}.nii.gz", src / "Volumes" / "20000001_1_MRT1_wb.nii.gz")
    shutil.copy(src / "Segmentations" / f"{STEM}_58_1.nii.gz", src / "Segmentations" / "20000001_1_MRT1_wb_58_1.nii.gz")
    assert _convert(src, tmp_path / "mixed") == 2
    assert "several modalities (CT, MRT1)" in capsys.readouterr().err
    assert _convert(src, tmp_path / "mr", "--modality", "MRT1") == 0
    ds = tmp_path / "mr" / "Dataset008_V"
    assert dataset_json(ds)["channel_names"] == {"0": "MRT1"} and dataset_json(ds)["labels"] == {"background": 0, "liver": 1}
    assert [p.name for p in (ds / "imagesTr").iterdir()] == ["20000001_1_0000.nii.gz"]
    assert not (ds / "landmarks").exists()
    assert _convert(src, tmp_path / "ct", "--modality", "CT") == 0
    assert dataset_json(tmp_path / "ct" / "Dataset008_V")["numTraining"] == 6
    assert _convert(src, tmp_path / "no", "--modality", "CTce") == 2
    assert "no volume of modality 'CTce' (found: CT, MRT1)" in capsys.readouterr().err


def test_verify_dataset_integrity_with_nnunet(src, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    assert _convert(src, tmp_path / "raw", "--missing", "ignore") == 0
    verify_dataset_integrity(str(tmp_path / "raw" / "Dataset008_V"), num_processes=1)


def test_rerun_refuses_then_overwrites_with_identical_bytes(src, tmp_path):
    assert _convert(src, tmp_path / "a") == 0
    assert _convert(src, tmp_path / "a") == 2
    before = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert _convert(src, tmp_path / "a", "--overwrite", "-j", "2") == 0
    after = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert before.keys() == after.keys() and all(before[k] == after[k] for k in before)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["Dataset008_V"]


def test_to_coco_loads_in_pycocotools(src, tmp_path):
    from pycocotools.coco import COCO

    assert main(["convert", "visceral", str(src), "--dataset-id", "8", "--to", "coco", "--out",
                 str(tmp_path / "coco"), "--num-folds", "3"]) == 0
    for split in ("train", "val"):
        coco = COCO(str(tmp_path / "coco" / "annotations" / f"instances_{split}.json"))
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"liver", "spleen", "kidney_right",
                                                                       "kidney_left"}
        assert coco.getAnnIds() and all(coco.annToMask(a).any() for a in coco.loadAnns(coco.getAnnIds()[:20]))


# ------------------------------------------------------------------ bad input corpus (command line)

def _rewrite(path: Path, fn):
    img = sitk.ReadImage(str(path))
    new = fn(img)
    sitk.WriteImage(new, str(path))


def _with_array(img, arr):
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _corrupt(kind: str, src: Path) -> str:
    """Damage the demo copy one way; returns the file name the error must name."""
    seg = src / "Segmentations"
    liver = seg / f"{STEM}_58_1.nii.gz"
    if kind == "size mismatch":
        _rewrite(liver, lambda m: sitk.GetImageFromArray(sitk.GetArrayFromImage(m)[:-1]))
    elif kind == "geometry mismatch":
        def shift(m):
            m.SetOrigin((1.0, 2.0, 3.0))
            return m
        _rewrite(liver, shift)
    elif kind == "not binary":
        def three_values(m):
            a = sitk.GetArrayFromImage(m)
            a[0, 0, :3] = [2, 3, 4]
            return _with_array(m, a)
        _rewrite(liver, three_values)
    elif kind == "empty mask":
        _rewrite(liver, lambda m: _with_array(m, np.zeros_like(sitk.GetArrayFromImage(m))))
    elif kind == "truncated volume":
        vol = src / "Volumes" / f"{STEM}.nii.gz"
        vol.write_bytes(vol.read_bytes()[:2000])
        return vol.name
    elif kind == "malformed landmarks":
        with open(src / "Landmarks" / f"{STEM}_landmarks_1.fcsv", "a") as f:
            f.write("vtkMRMLMarkupsFiducialNode_9,abc,1,2,0,0,0,1,1,1,0,bad,,\n")
        return f"{STEM}_landmarks_1.fcsv"
    elif kind == "mask name not Anatomy3":
        liver.rename(seg / f"{STEM}_liver.nii.gz")
        return f"{STEM}_liver.nii.gz"
    elif kind == "mask without volume":
        shutil.copy(liver, seg / "99999999_1_CT_wb_58_1.nii.gz")
        return "99999999_1_CT_wb_58_1.nii.gz"
    elif kind == "two masks of one structure":
        shutil.copy(liver, seg / f"{STEM}_58_2.nii.gz")
        return f"{STEM}_58_2.nii.gz"
    return liver.name


BAD = ["size mismatch", "geometry mismatch", "not binary", "empty mask", "truncated volume", "malformed landmarks",
       "mask name not Anatomy3", "mask without volume"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2_nothing_written(kind, src, tmp_path):
    culprit = _corrupt(kind, src)
    res = run_cli("convert", "visceral", src, "--dataset-id", "8", "--name", "V", "--out", tmp_path / "raw",
                  "-j", "2", "--strict")
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.replace("\r", "\n").splitlines() if "error:" in l or "Traceback" in l]
    assert len(lines) == 1 and "organmtl convert: error: " in lines[0] and culprit in lines[0], lines
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


@pytest.mark.parametrize("problem", ["missing folder", "no Volumes folder", "unknown --structures name"])
def test_bad_source_folder(problem, src, tmp_path, capsys):
    extra = []
    if problem == "missing folder":
        src = tmp_path / "nowhere"
    elif problem == "no Volumes folder":
        shutil.rmtree(src / "Volumes")
    else:
        extra = ["--structures", "liver", "heart"]
    assert _convert(src, tmp_path / "raw", *extra) == 2
    err = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in l]
    assert len(err) == 1
    assert not (tmp_path / "raw" / "Dataset008_V").exists()


# ------------------------------------------------------------------ the real files: annotators, lesions, fcsv versions

def test_two_annotators_of_a_structure_lowest_id_or_annotator_option(src, tmp_path):
    """``<stem>_<RadLexID>_<k>``: k is the annotator; the lowest id wins unless --annotator says."""
    liver1 = src / "Segmentations" / f"{STEM}_58_1.nii.gz"
    m = sitk.ReadImage(str(liver1))
    a = sitk.GetArrayFromImage(m)
    other = np.zeros_like(a)
    other[a.shape[0] // 2, 2:5, 2:5] = 1                    # annotator 7's liver: clearly different
    sitk.WriteImage(_with_array(m, other), str(src / "Segmentations" / f"{STEM}_58_7.nii.gz"))
    assert _convert(src, tmp_path / "a") == 0
    ds = tmp_path / "a" / "Dataset008_V"
    liver_label = json.loads((ds / "dataset.json").read_text())["labels"]["liver"]
    seg = read_array(ds / "labelsTr" / f"{CASE}.nii.gz")
    assert (seg == liver_label).sum() > other.sum()
    np.testing.assert_array_equal(seg == liver_label, (a > 0) & (seg == liver_label))
    rec = _report(ds)[CASE]
    assert rec["other_annotations"] == [{"file": f"{STEM}_58_7.nii.gz", "reason": "liver: annotator 1 chosen"}]
    assert _convert(src, tmp_path / "b", "--annotator", "7") == 0
    seg7 = read_array(tmp_path / "b" / "Dataset008_V" / "labelsTr" / f"{CASE}.nii.gz")
    np.testing.assert_array_equal(seg7 == liver_label, other > 0)
    # other cases have only annotator 1: --annotator 7 falls back to it
    assert (read_array(tmp_path / "b" / "Dataset008_V" / "labelsTr" / "10000100_1.nii.gz") == liver_label).sum() > 0


def test_lesion_and_other_fcsv_files_are_skipped(src, tmp_path, capsys):
    (src / "Landmarks" / f"{STEM}_lesions_1.fcsv").write_text("# lesion marks\nnot,a,landmark\n")
    (src / "Landmarks" / "notes.fcsv").write_text("garbage\n")
    rows = [l for l in (src / "Landmarks" / f"{STEM}_landmarks_1.fcsv").read_text().splitlines()
            if l and not l.startswith("#")]
    assert _convert(src, tmp_path / "raw") == 0
    ds = tmp_path / "raw" / "Dataset008_V"
    rec = _report(ds)[CASE]
    assert {"file": f"{STEM}_lesions_1.fcsv", "reason": "not a landmark file"} in rec["skipped"]
    assert "notes.fcsv skipped (not a landmark file)" in capsys.readouterr().out
    lm = json.loads((ds / "landmarks" / f"{CASE}.json").read_text())
    assert len(lm["landmarks"]) + len(lm["dropped"]) == len(rows)           # the landmark file's rows only


@pytest.mark.parametrize("version,system", [(None, "RAS"), ("4.4", "RAS"), ("4.10", "RAS"), ("4.11", "LPS"),
                                            ("5.6", "LPS")])
def test_fcsv_without_coordinate_system_follows_the_slicer_version(version, system, src, tmp_path):
    path = src / "Landmarks" / f"{STEM}_landmarks_1.fcsv"
    lines = path.read_text().splitlines()
    assert lines[1] == "# CoordinateSystem = RAS"                 # the demo file: RAS, stated
    assert _convert(src, tmp_path / "stated") == 0
    case = CASE
    truth = json.loads((tmp_path / "stated" / "Dataset008_V" / "landmarks" / f"{case}.json").read_text())
    rows = [l.split(",") for l in lines[3:]]
    flip = np.array([-1.0, -1.0, 1.0]) if system == "LPS" else np.ones(3)   # rewrite the rows in `system`
    body = [",".join([r[0], *(f"{float(v) * f:.4f}" for v, f in zip(r[1:4], flip)), *r[4:]]) for r in rows]
    header = ([f"# Markups fiducial file version = {version}"] if version else []) + [lines[2]]
    path.write_text("\n".join(header + body) + "\n")
    assert _convert(src, tmp_path / "bare") == 0
    got = json.loads((tmp_path / "bare" / "Dataset008_V" / "landmarks" / f"{case}.json").read_text())
    assert [p["name"] for p in got["landmarks"]] == [p["name"] for p in truth["landmarks"]]
    np.testing.assert_allclose([p["lps_mm"] for p in got["landmarks"]], [p["lps_mm"] for p in truth["landmarks"]],
                               atol=1e-3)
