"""Generic volumes converter: label remapping, multi-channel cases, bad inputs."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.cli import main


def _convert(src, out, *extra):
    return main(["convert", "volumes", str(src), "--dataset-id", "9", "--name", "V", "--out", str(out), *extra])


def _write(path, arr, spacing=(1.0, 1.0, 2.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def two_channel_src(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        for c in range(2):
            _write(src / "images" / f"{case}_{c:04d}.nrrd", rng.normal(size=(4, 5, 6)).astype(np.float32))
        lab = np.zeros((4, 5, 6), np.uint8)
        lab[1, 1:3, 1:3] = 6
        lab[2, 2:4, 2:5] = 20
        _write(src / "labels" / f"{case}.nrrd", lab)
    (src / "mapping.json").write_text(json.dumps({"channel_names": {"0": "fat", "1": "water"},
                                                  "labels": {"background": 0, "liver": 6, "spleen": 20}}))
    return src


def test_remap_and_channels(two_channel_src, tmp_path):
    assert _convert(two_channel_src, tmp_path / "raw", "--file-ending", ".nrrd") == 0
    ds = tmp_path / "raw" / "Dataset009_V"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2}
    assert meta["channel_names"] == {"0": "fat", "1": "water"}
    assert meta["organmtl_label_remap"]["spleen"] == {"source_value": 20, "nnunet_label": 2}
    src_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(two_channel_src / "labels" / "a.nrrd")))
    out_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "labelsTr" / "a.nrrd")))
    np.testing.assert_array_equal(out_lab == 1, src_lab == 6)
    np.testing.assert_array_equal(out_lab == 2, src_lab == 20)
    for c in range(2):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "imagesTr" / f"a_{c:04d}.nrrd"))),
            sitk.GetArrayFromImage(sitk.ReadImage(str(two_channel_src / "images" / f"a_{c:04d}.nrrd"))))


def _error_lines(capsys):
    return [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in l]


@pytest.mark.parametrize("problem,culprit", [
    ("unknown label value", "b.nrrd"), ("image without label", "labels"), ("label without image", "c.nrrd"),
    ("invalid mapping", "mapping.json"), ("missing channel", "images"), ("geometry mismatch", "b.nrrd"),
    ("duplicate case id", "a.nii.gz"),
])
def test_bad_inputs(problem, culprit, two_channel_src, tmp_path, capsys):
    src = two_channel_src
    if problem == "unknown label value":
        lab = np.zeros((4, 5, 6), np.uint8)
        lab[0, 0, 0] = 7
        _write(src / "labels" / "b.nrrd", lab)
    elif problem == "image without label":
        (src / "labels" / "b.nrrd").unlink()
    elif problem == "label without image":
        shutil.copy(src / "labels" / "a.nrrd", src / "labels" / "c.nrrd")
    elif problem == "invalid mapping":
        (src / "mapping.json").write_text("{not json")
    elif problem == "missing channel":
        (src / "images" / "b_0001.nrrd").unlink()
    elif problem == "geometry mismatch":
        _write(src / "labels" / "b.nrrd", np.zeros((4, 5, 6), np.uint8), spacing=(1.0, 1.0, 3.0))
    elif problem == "duplicate case id":
        _write(src / "labels" / "a.nii.gz", np.zeros((4, 5, 6), np.uint8))
    assert _convert(src, tmp_path / "raw", "--strict") == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and culprit in err[0], err
    assert not (tmp_path / "raw" / "Dataset009_V").exists()


def test_demo_multimodal_tasks_convert(demo_root, tmp_path):
    for i, task in enumerate(["brain_mr", "breast_mr", "cardiac_cta"]):
        assert main(["convert", "volumes", str(demo_root / "multimodal" / task), "--dataset-id", str(20 + i),
                     "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "Dataset020_VOLUMES" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3}


def test_abdomen_demo_family_with_voxel_landmarks(tmp_path):
    """The landmark-input thesis' layout: two MR channels, label map, hip joints as voxel text."""
    from organmtl.demo_data import write_demo_data

    write_demo_data(tmp_path / "demo", families=["abdomen_mr"], n_cases=2)
    src = tmp_path / "demo" / "abdomen_mr"
    assert _convert(src, tmp_path / "raw") == 0
    ds = tmp_path / "raw" / "Dataset009_V"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "fat", "1": "water"} and meta["organmtl_landmarks"] == "landmarks"
    lm = json.loads((ds / "landmarks" / "wb001.json").read_text())
    assert [p["name"] for p in lm["landmarks"]] == ["hip_left", "hip_right"]
    written = [[float(v) for v in line.split()] for line in (src / "landmarks" / "wb001.txt").read_text().splitlines()]
    np.testing.assert_allclose([p["voxel_xyz"] for p in lm["landmarks"]], written, atol=1e-3)
    img = sitk.ReadImage(str(ds / "imagesTr" / "wb001_0000.nii.gz"))
    np.testing.assert_allclose(lm["landmarks"][0]["lps_mm"],
                               img.TransformContinuousIndexToPhysicalPoint(written[0]), atol=1e-3)


def test_landmark_file_without_image_is_refused(two_channel_src, tmp_path, capsys):
    (two_channel_src / "landmarks").mkdir()
    (two_channel_src / "landmarks" / "zz.txt").write_text("1 1 1\n")
    assert _convert(two_channel_src, tmp_path / "raw") == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "zz.txt" in lines[0] and "without image" in lines[0]
    assert not (tmp_path / "raw" / "Dataset009_V").exists()


def test_amos_style_case_ids_are_not_channels(tmp_path):
    """AMOS names one-channel cases ``amos_0001.nii.gz`` (no ``_0000`` sibling) in images and labels:
    the whole name is the case id; a case ``_0000`` beside it, labelled under its whole name, too."""
    src = tmp_path / "amos"
    for i, case in enumerate(("amos_0001", "amos_0004", "amos_0000")):
        _write(src / "images" / f"{case}.nii.gz", np.full((3, 4, 5), i, np.int16))
        lab = np.zeros((3, 4, 5), np.uint8)
        lab[1, 1:3, 1:4] = 1
        _write(src / "labels" / f"{case}.nii.gz", lab)
    (src / "mapping.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                  "labels": {"background": 0, "spleen": 1}}))
    assert _convert(src, tmp_path / "raw") == 0
    ds = tmp_path / "raw" / "Dataset009_V"
    assert sorted(p.name for p in (ds / "imagesTr").iterdir()) == [
        "amos_0000_0000.nii.gz", "amos_0001_0000.nii.gz", "amos_0004_0000.nii.gz"]
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == [
        "amos_0000.nii.gz", "amos_0001.nii.gz", "amos_0004.nii.gz"]
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "imagesTr" / "amos_0004_0000.nii.gz"))).max() == 1


def test_one_channel_suffix_without_label_of_that_name_is_still_a_channel(tmp_path, capsys):
    """``x_0000`` + ``x_0001`` with label ``x`` in a one-channel mapping: two channels, refused."""
    src = tmp_path / "src"
    for c in range(2):
        _write(src / "images" / f"x_{c:04d}.nii.gz", np.zeros((3, 4, 5), np.int16))
    _write(src / "labels" / "x.nii.gz", np.zeros((3, 4, 5), np.uint8))
    (src / "mapping.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    assert _convert(src, tmp_path / "raw") == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "'x' has channels [0, 1]" in err[0], err
