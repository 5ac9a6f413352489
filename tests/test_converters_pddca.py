"""PDDCA converter: exact geometry and labels, missing structures, landmarks, atomic output,
byte-identical re-runs, nnU-Net's own integrity check, and a corpus of bad inputs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given

from organmtl.cli import main
from organmtl.converters.pddca import LABELS
from tests.helpers import file_examples, geometries, rotation


def _convert(src, out, *extra):
    return main(["convert", "pddca", str(src), "--dataset-id", "7", "--name", "T", "--out", str(out), *extra])


def make_case(root: Path, case: str, shape, spacing, origin, direction, rng, structures=("BrainStem", "Chiasm")):
    img = sitk.GetImageFromArray(rng.integers(-1000, 1000, shape).astype(np.int16))
    for im in [img]:
        im.SetSpacing(spacing), im.SetOrigin(origin), im.SetDirection(direction)
    (root / case / "structures").mkdir(parents=True)
    sitk.WriteImage(img, str(root / case / "img.nrrd"))
    masks = {}
    for k, name in enumerate(structures):
        m = np.zeros(shape, np.uint8)
        z0 = k * shape[0] // len(structures)
        m[z0: z0 + max(1, shape[0] // len(structures)), : shape[1] // 2 + 1, : shape[2] // 2 + 1] = 1
        mi = sitk.GetImageFromArray(m)
        mi.CopyInformation(img)
        sitk.WriteImage(mi, str(root / case / "structures" / f"{name}.nrrd"))
        masks[name] = m.astype(bool)
    return img, masks


geometry = geometries(((2, 9), (2, 9), (2, 9)))


@file_examples(12)
@given(geometry)
def test_geometry_and_labels_round_trip(tmp_path_factory, geom):
    shape, spacing, origin, angles = geom
    direction = tuple(rotation(angles).ravel())
    tmp = tmp_path_factory.mktemp("rt")
    img, masks = make_case(tmp / "src", "c1", shape, spacing, origin, direction, np.random.default_rng(0))
    assert _convert(tmp / "src", tmp / "raw", "--missing", "background", "--file-ending", ".nrrd") == 0
    ds = tmp / "raw" / "Dataset007_T"
    out_img = sitk.ReadImage(str(ds / "imagesTr" / "c1_0000.nrrd"))
    seg = sitk.ReadImage(str(ds / "labelsTr" / "c1.nrrd"))
    for o in (out_img, seg):
        assert o.GetSize() == img.GetSize()
        np.testing.assert_allclose(o.GetSpacing(), img.GetSpacing(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(o.GetOrigin(), img.GetOrigin(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(o.GetDirection(), img.GetDirection(), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out_img), sitk.GetArrayFromImage(img))
    arr = sitk.GetArrayFromImage(seg)
    for name, m in masks.items():
        np.testing.assert_array_equal(arr == LABELS[name], m)


def test_nifti_output_geometry_within_float32(tmp_path):
    direction = tuple(rotation((0.3, -0.2, 1.1)).ravel())
    img, _ = make_case(tmp_path / "src", "c1", (5, 6, 7), (0.7, 0.9, 2.5), (-120.25, 33.5, 10.125), direction,
                       np.random.default_rng(1))
    assert _convert(tmp_path / "src", tmp_path / "raw", "--missing", "background") == 0
    out = sitk.ReadImage(str(tmp_path / "raw" / "Dataset007_T" / "imagesTr" / "c1_0000.nii.gz"))
    np.testing.assert_allclose(out.GetSpacing(), img.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), img.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection(), atol=1e-5)


def test_demo_conversion_missing_policies_and_landmarks(demo_root, tmp_path):
    src = demo_root / "han_pddca"                 # 6 cases; case 3 has no Submandibular_L
    assert _convert(src, tmp_path / "drop") == 0
    ds = tmp_path / "drop" / "Dataset007_T"
    report = json.loads((ds / "conversion_report.json").read_text())
    dropped = [r["case"] for r in report["cases"] if r["action"] == "dropped"]
    assert dropped == ["0522c0003"]
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 5 and meta["organmtl_small_organs"] == ["Chiasm", "OpticNerve_L", "OpticNerve_R"]
    # labels equal the source masks voxel for voxel
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "0522c0000.nii.gz")))
    for name, value in LABELS.items():
        if value:
            m = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "0522c0000" / "structures" / f"{name}.nrrd")))
            np.testing.assert_array_equal(seg == value, m > 0)
    # landmarks: RAS file -> LPS, voxel coordinates consistent with the image geometry
    lm = json.loads((ds / "landmarks" / "0522c0000.json").read_text())
    img = sitk.ReadImage(str(src / "0522c0000" / "img.nrrd"))
    ras = [l for l in (src / "0522c0000" / "points" / "landmarks.fcsv").read_text().splitlines()
           if not l.startswith("#")][0].split(",")
    first = lm["landmarks"][0]
    np.testing.assert_allclose(first["lps_mm"], [-float(ras[1]), -float(ras[2]), float(ras[3])], atol=1e-3)
    np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint(first["voxel_xyz"]), first["lps_mm"],
                               atol=1e-3)

    assert _convert(src, tmp_path / "ign", "--missing", "ignore") == 0
    ds = tmp_path / "ign" / "Dataset007_T"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"]["ignore"] == 10 and meta["numTraining"] == 6
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "0522c0003.nii.gz")))
    assert set(np.unique(seg)) == {1, 2, 3, 4, 5, 6, 7, 9, 10}     # no 0 and no 8 (missing organ)


def test_verify_dataset_integrity_with_nnunet(demo_root, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    assert _convert(demo_root / "han_pddca", tmp_path / "raw") == 0
    verify_dataset_integrity(str(tmp_path / "raw" / "Dataset007_T"), num_processes=1)


def test_rerun_refuses_then_overwrites_with_identical_bytes(demo_root, tmp_path):
    src = demo_root / "han_pddca"
    assert _convert(src, tmp_path / "a") == 0
    assert _convert(src, tmp_path / "a") == 2                      # exists, no --overwrite
    before = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert _convert(src, tmp_path / "a", "--overwrite", "-j", "2") == 0
    after = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert before.keys() == after.keys()
    assert all(before[k] == after[k] for k in before)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["Dataset007_T"]   # no temporary left


# ------------------------------------------------------------------ bad input corpus

def _error_lines(capsys):
    """stderr lines other than tqdm's progress bar: the error itself."""
    return [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in l or "Traceback" in l]


def _corrupt(kind: str, case: Path):
    s = case / "structures"
    if kind == "size mismatch":
        m = sitk.ReadImage(str(s / "Chiasm.nrrd"))
        sitk.WriteImage(sitk.GetImageFromArray(sitk.GetArrayFromImage(m)[:-1]), str(s / "Chiasm.nrrd"))
    elif kind == "geometry mismatch":
        m = sitk.ReadImage(str(s / "Chiasm.nrrd"))
        m.SetOrigin((1.0, 2.0, 3.0))
        sitk.WriteImage(m, str(s / "Chiasm.nrrd"))
    elif kind == "not binary":
        m = sitk.ReadImage(str(s / "Chiasm.nrrd"))
        a = sitk.GetArrayFromImage(m)
        a[0, 0, :3] = [2, 3, 4]
        n = sitk.GetImageFromArray(a)
        n.CopyInformation(m)
        sitk.WriteImage(n, str(s / "Chiasm.nrrd"))
    elif kind == "empty mask":
        m = sitk.ReadImage(str(s / "Chiasm.nrrd"))
        n = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(m)))
        n.CopyInformation(m)
        sitk.WriteImage(n, str(s / "Chiasm.nrrd"))
    elif kind == "truncated image":
        data = (case / "img.nrrd").read_bytes()
        (case / "img.nrrd").write_bytes(data[: len(data) // 2])
    elif kind == "not an image":
        (case / "img.nrrd").write_text("hello")
    elif kind == "NaN intensities":
        img = sitk.ReadImage(str(case / "img.nrrd"))
        a = sitk.GetArrayFromImage(img).astype(np.float32)
        a[0, 0, 0] = np.nan
        n = sitk.GetImageFromArray(a)
        n.CopyInformation(img)
        sitk.WriteImage(n, str(case / "img.nrrd"))
    elif kind == "malformed landmarks":
        with open(case / "points" / "landmarks.fcsv", "a") as f:
            f.write("vtkMRMLMarkupsFiducialNode_9,abc,1,2,0,0,0,1,1,1,0,bad,,\n")
    return {"size mismatch": "Chiasm.nrrd", "geometry mismatch": "Chiasm.nrrd", "not binary": "Chiasm.nrrd",
            "empty mask": "Chiasm.nrrd", "truncated image": "img.nrrd", "not an image": "img.nrrd",
            "NaN intensities": "img.nrrd", "malformed landmarks": "landmarks.fcsv"}[kind]


BAD = ["size mismatch", "geometry mismatch", "not binary", "empty mask", "truncated image", "not an image",
       "NaN intensities", "malformed landmarks"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2_nothing_written(kind, demo_root, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(demo_root / "han_pddca", src)
    culprit = _corrupt(kind, src / "0522c0002")
    assert _convert(src, tmp_path / "raw", "-j", "2", "--strict") == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and culprit in err[0] and "0522c0002" in err[0], err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


@pytest.mark.parametrize("problem", ["missing folder", "no cases", "id used by another dataset"])
def test_bad_source_folder(problem, tmp_path, demo_root, capsys):
    src = tmp_path / "src"
    if problem == "no cases":
        src.mkdir()
    if problem == "id used by another dataset":
        src = demo_root / "han_pddca"
        (tmp_path / "raw" / "Dataset007_Other").mkdir(parents=True)
    assert _convert(src, tmp_path / "raw") == 2
    assert len(_error_lines(capsys)) == 1
    assert not (tmp_path / "raw" / "Dataset007_T").exists()


def _split_into_parts(flat: Path, root: Path) -> list[str]:
    """The real PDDCA download: ``PDDCA-1.4.1_part1/<case>``, ``_part2``, ``_part3``."""
    cases = sorted(p.name for p in flat.iterdir() if p.is_dir())
    for i, case in enumerate(cases):
        shutil.copytree(flat / case, root / f"PDDCA-1.4.1_part{1 + i % 3}" / case)
    return cases


def test_root_with_part_folders_and_case_insensitive_structure_names(demo_root, tmp_path):
    root = tmp_path / "PDDCA"
    cases = _split_into_parts(demo_root / "han_pddca", root)
    s = root / "PDDCA-1.4.1_part2" / cases[1] / "structures"
    (s / "BrainStem.nrrd").rename(s / "brainstem.nrrd")
    (s / "Parotid_L.nrrd").rename(s / "PAROTID_L.NRRD")
    assert _convert(root, tmp_path / "parts") == 0
    assert _convert(demo_root / "han_pddca", tmp_path / "flat") == 0
    parts, flat = tmp_path / "parts" / "Dataset007_T", tmp_path / "flat" / "Dataset007_T"
    assert sorted(p.name for p in (parts / "labelsTr").iterdir()) == sorted(p.name for p in (flat / "labelsTr").iterdir())
    for case in cases:
        if (flat / "labelsTr" / f"{case}.nii.gz").exists():
            np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(parts / "labelsTr" / f"{case}.nii.gz"))),
                                          sitk.GetArrayFromImage(sitk.ReadImage(str(flat / "labelsTr" / f"{case}.nii.gz"))))
    record = next(r for r in json.loads((parts / "conversion_report.json").read_text())["cases"] if r["case"] == cases[1])
    assert "BrainStem" in record["present"] and "Parotid_L" in record["present"] and not record["missing"]


def test_part_folders_sharing_a_case_id_are_refused(demo_root, tmp_path, capsys):
    root = tmp_path / "PDDCA"
    cases = _split_into_parts(demo_root / "han_pddca", root)
    shutil.copytree(root / "PDDCA-1.4.1_part1" / cases[0], root / "PDDCA-1.4.1_part3" / cases[0])
    assert _convert(root, tmp_path / "raw") == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and f"PDDCA-1.4.1_part3/{cases[0]}" in err[0] and "also in" in err[0], err


def test_structure_names_differing_only_in_case_fail_that_case(demo_root, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(demo_root / "han_pddca", src)
    shutil.copy(src / "0522c0002" / "structures" / "Chiasm.nrrd", src / "0522c0002" / "structures" / "chiasm.nrrd")
    assert _convert(src, tmp_path / "raw") == 1
    lines = [l for l in capsys.readouterr().err.splitlines() if "not converted" in l]
    assert len(lines) == 1 and "0522c0002" in lines[0] and "names differ only in case" in lines[0], lines
    assert not (tmp_path / "raw" / "Dataset007_T" / "labelsTr" / "0522c0002.nii.gz").exists()
