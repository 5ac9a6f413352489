"""Landmark encodings as extra nnU-Net channels: hand-computed inverse Manhattan maps
(landmark_input_unet §3.6), Gaussian heatmaps in mm with max-merging (landmark_mtl_unet_thesis §2.3),
channels with the image's geometry, dataset.json, nnU-Net's integrity check, incomplete cases, CLI."""
import json
import shutil
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from organmtl.cli import main
from organmtl.converters.common import ConversionError, write_dataset_json, write_json
from organmtl.converters.landmark_encoding import add_landmark_channels, gaussian_heatmap, inverse_manhattan_map
from organmtl.converters.landmarks import landmarks_record
from organmtl.demo_data import write_demo_data
from tests.helpers import rotation, run_cli


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmdemo") / "data"
    write_demo_data(root, seed=0, families=["han_pddca", "abdomen_mr"], n_cases=3)
    return root


def _convert(source, src, out, *extra):
    return main(["convert", source, str(src), "--dataset-id", "9", "--name", "L", "--out", str(out),
                 *map(str, extra)])


def _as_float(rows):
    return np.array([[float(v) for v in row] for row in rows])


# ------------------------------------------------------------------ inverse Manhattan distance map

def test_distance_map_paper_3x3_example_by_hand():
    # landmark_input_unet Figure 5: 3 x 3 grid, landmarks (1,3) and (3,2) in 1-based (row, column).
    # d_12 = 3, so each landmark reads 1 + 1/4 = 5/4 before normalisation.
    m = inverse_manhattan_map((3, 3), None, [(0, 2), (2, 1)])
    expected = [[F(7, 15), F(2, 3), 1],          # (0,0): (1/3 + 1/4) / (5/4) = 7/15
                [F(7, 15), F(2, 3), F(2, 3)],    # (1,1): (1/3 + 1/2) / (5/4) = 2/3
                [F(14, 25), 1, F(2, 3)]]         # (2,0): (1/5 + 1/2) / (5/4) = 14/25
    np.testing.assert_allclose(m, _as_float(expected), rtol=0, atol=1e-7)
    assert m.dtype == np.float32 and m[0, 2] == 1.0 and m[2, 1] == 1.0


def test_distance_map_1d_exact_and_symmetric():
    m = inverse_manhattan_map((5,), None, [[1], [3]])
    # x=0: (1/2 + 1/4) / (1 + 1/3) = 9/16; x=2: (1/2 + 1/2) / (4/3) = 3/4
    np.testing.assert_allclose(m, [9 / 16, 1, 3 / 4, 1, 9 / 16], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(m, m[::-1])
    np.testing.assert_array_equal(m, inverse_manhattan_map((5,), None, [[3], [1]]))   # order-free


def test_distance_map_single_landmark_voxels_and_mm():
    shape = (4, 5, 6)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d = np.abs(z - 1) + np.abs(y - 2) + np.abs(x - 3)
    np.testing.assert_allclose(inverse_manhattan_map(shape, None, [(1, 2, 3)]), 1 / (1 + d), rtol=1e-6)
    d_mm = 2.0 * np.abs(z - 1) + 0.5 * np.abs(y - 2) + 1.0 * np.abs(x - 3)      # spacing (2, 0.5, 1) mm
    np.testing.assert_allclose(inverse_manhattan_map(shape, (2.0, 0.5, 1.0), [(1, 2, 3)]), 1 / (1 + d_mm),
                               rtol=1e-6)


def test_distance_map_3d_mirror_symmetry_and_per_landmark():
    shape = (5, 7, 9)
    m = inverse_manhattan_map(shape, None, [(2, 1, 2), (2, 5, 6)])    # point-symmetric about the centre
    np.testing.assert_allclose(m, m[::-1, ::-1, ::-1], rtol=0, atol=1e-7)
    per = inverse_manhattan_map(shape, None, [(2, 1, 2), (2, 5, 6)], per_landmark=True)
    assert per.shape == (2, *shape) and per[0, 2, 1, 2] == 1.0 and per[1, 2, 5, 6] == 1.0


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(1, 6), st.integers(1, 7), st.integers(1, 8)), st.data())
def test_distance_map_pair_reads_one_at_both_landmarks(shape, data):
    pts = [tuple(data.draw(st.integers(0, n - 1)) for n in shape) for _ in range(2)]
    m = inverse_manhattan_map(shape, None, pts)
    assert m.max() == 1.0 and m.min() > 0
    for p in pts:
        assert m[p] == pytest.approx(1.0, abs=1e-7)


def test_distance_map_many_landmarks_stays_in_unit_range():
    # six landmarks around the centre of a 3 x 3 x 3 grid: the sum peaks at the empty centre
    # (6 * 1/2 = 3) above the landmarks (1 + 4 * 1/3 + 1/3 = 8/3), so the map divides by the maximum
    six = [(0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)]
    m = inverse_manhattan_map((3, 3, 3), None, six)
    assert m.max() == 1.0 and m[1, 1, 1] == 1.0 and m.min() > 0
    for p in six:
        assert m[p] == pytest.approx(8 / 9, abs=1e-7)
    # corner: d = 2 to three landmarks, 4 to the other three -> (3/3 + 3/5) / 3 = 8/15
    assert m[0, 0, 0] == pytest.approx(8 / 15, abs=1e-7)


# ------------------------------------------------------------------ Gaussian heatmap

def test_gaussian_peak_and_sigma_in_mm_anisotropic():
    spacing = (1.25, 0.5, 2.5)                 # (z, y, x) mm: sigma 2.5 mm = 2, 5 and 1 voxels
    h = gaussian_heatmap((9, 15, 7), spacing, [(4, 7, 3)], sigma_mm=2.5)
    assert h[4, 7, 3] == 1.0 and h.max() == 1.0
    for offset in [(2, 0, 0), (-2, 0, 0), (0, 5, 0), (0, -5, 0), (0, 0, 1), (0, 0, -1)]:
        assert h[4 + offset[0], 7 + offset[1], 3 + offset[2]] == pytest.approx(np.exp(-0.5), rel=1e-6)
    z, y, x = np.meshgrid(*[np.arange(n) for n in h.shape], indexing="ij")
    r2 = ((z - 4) * 1.25) ** 2 + ((y - 7) * 0.5) ** 2 + ((x - 3) * 2.5) ** 2
    np.testing.assert_allclose(h, np.exp(-r2 / (2 * 2.5 ** 2)), rtol=1e-5, atol=1e-12)


def test_gaussian_continuous_landmark_and_2d():
    h = gaussian_heatmap((1, 1, 3), (1.0, 1.0, 1.0), [(0, 0, 0.5)], sigma_mm=1.0)
    np.testing.assert_allclose(h[0, 0], np.exp(-0.5 * np.array([0.25, 0.25, 2.25])), rtol=1e-6)
    h2 = gaussian_heatmap((3, 4), (2.0, 1.0), [(1, 2)], sigma_mm=2.0)
    assert h2.shape == (3, 4) and h2[1, 2] == 1.0 and h2[0, 2] == pytest.approx(np.exp(-0.5))


def test_gaussian_max_merge_never_adds_up():
    pts = [(3, 3, 3), (3, 3, 4)]                # one voxel apart, sigma 3 voxels: blobs overlap
    per = gaussian_heatmap((7, 7, 8), (1, 1, 1), pts, sigma_mm=3.0, per_landmark=True)
    merged = gaussian_heatmap((7, 7, 8), (1, 1, 1), pts, sigma_mm=3.0)
    assert per.shape == (2, 7, 7, 8) and per.sum(0).max() > 1.9           # a sum would stack
    np.testing.assert_array_equal(merged, per.max(0))
    assert merged.max() == 1.0 and merged[3, 3, 3] == 1.0 and merged[3, 3, 4] == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="sigma"):
        gaussian_heatmap((3, 3), (1, 1), [(1, 1)], sigma_mm=0)
    with pytest.raises(ValueError, match="no landmarks"):
        inverse_manhattan_map((3, 3), None, [])
    with pytest.raises(ValueError, match="2D grid"):
        inverse_manhattan_map((3, 3), None, [(1, 1, 1)])


# ------------------------------------------------------------------ nnU-Net raw datasets

def _hand_dataset(folder: Path, ending: str) -> sitk.Image:
    """One case on an oblique, anisotropic grid with two landmarks on voxel centres."""
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    img = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 100, (5, 6, 7)).astype(np.int16))
    img.SetSpacing((0.7, 0.93, 2.5)), img.SetOrigin((-120.25, 33.5, 10.125))
    img.SetDirection(tuple(rotation((0.3, 0.0, 1.1)).ravel()))
    sitk.WriteImage(img, str(folder / "imagesTr" / f"c1_0000{ending}"), True)
    lab = sitk.GetImageFromArray(np.zeros((5, 6, 7), np.uint8))
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(folder / "labelsTr" / f"c1{ending}"), True)
    ref = sitk.ReadImage(str(folder / "imagesTr" / f"c1_0000{ending}"))
    points = [(n, np.array(ref.TransformIndexToPhysicalPoint(i))) for n, i in (("a", (1, 2, 3)), ("b", (5, 0, 1)))]
    write_json(folder / "landmarks" / "c1.json", landmarks_record("c1", points, ref))
    write_dataset_json(folder, {"0": "CT"}, {"background": 0}, 1, ending, "hand", "test")
    return ref


@pytest.mark.parametrize("ending", [".nrrd", ".nii.gz"])
def test_channels_keep_the_image_geometry_and_values(tmp_path, ending):
    ref = _hand_dataset(tmp_path, ending)
    result = add_landmark_channels(tmp_path, "heatmap", sigma_mm=1.5, per_landmark=True)
    assert result == {"channels": {"1": "a", "2": "b"}, "dropped": [], "partial": []}
    for k, index_xyz in ((1, (1, 2, 3)), (2, (5, 0, 1))):
        ch = sitk.ReadImage(str(tmp_path / "imagesTr" / f"c1_000{k}{ending}"))
        assert ch.GetSize() == ref.GetSize() and ch.GetPixelID() == sitk.sitkFloat32
        assert ch.GetSpacing() == ref.GetSpacing() and ch.GetOrigin() == ref.GetOrigin()
        if ending == ".nrrd":
            assert ch.GetDirection() == ref.GetDirection()
        else:                                     # NIfTI re-derives the direction from float32 storage
            np.testing.assert_allclose(ch.GetDirection(), ref.GetDirection(), rtol=0, atol=1e-7)
        arr = sitk.GetArrayFromImage(ch)
        zyx = index_xyz[::-1]
        expected = gaussian_heatmap(arr.shape, ref.GetSpacing()[::-1], [zyx], 1.5)
        np.testing.assert_allclose(arr, expected, rtol=1e-6)
        assert arr[zyx] == pytest.approx(1.0, abs=1e-6)
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "noNorm", "2": "noNorm"}
    assert meta["organmtl_landmark_channels"]["sigma_mm"] == 1.5


def test_channel_name_maps_to_nnunet_no_normalisation():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import NoNormalization
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme

    from organmtl.converters.landmark_encoding import NO_NORMALIZATION
    assert get_normalization_scheme(NO_NORMALIZATION) is NoNormalization


def test_pddca_distance_channel_values_and_nnunet_integrity(demo, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    assert _convert("pddca", demo / "han_pddca", tmp_path, "--landmark-channels", "distance") == 0
    ds = tmp_path / "Dataset009_L"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "noNorm"} and meta["numTraining"] == 3
    assert meta["organmtl_landmark_channels"]["landmarks"] == ["chiasm", "eye_L", "eye_R", "brainstem_top",
                                                               "menton"]
    for case in ("0522c0000", "0522c0002"):
        lm = json.loads((ds / "landmarks" / f"{case}.json").read_text())
        ch = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "imagesTr" / f"{case}_0001.nii.gz")))
        expected = inverse_manhattan_map(ch.shape, None, [l["voxel_xyz"][::-1] for l in lm["landmarks"]])
        np.testing.assert_allclose(ch, expected, rtol=1e-6)
        assert ch.max() == 1.0 and ch.min() > 0
    verify_dataset_integrity(str(ds), num_processes=1)


def test_volumes_two_channel_abdomen_text_landmarks(demo, tmp_path):
    assert _convert("volumes", demo / "abdomen_mr", tmp_path, "--landmark-channels", "heatmap",
                    "--one-channel-per-landmark", "--landmark-sigma-mm", "8") == 0
    ds = tmp_path / "Dataset009_L"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "fat", "1": "water", "2": "noNorm", "3": "noNorm"}
    assert meta["organmtl_landmark_channels"]["channels"] == {"2": "hip_left", "3": "hip_right"}
    hips = [[float(v) for v in line.split()] for line in (demo / "abdomen_mr" / "landmarks" / "wb001.txt")
            .read_text().splitlines()]
    for k, xyz in zip((2, 3), hips):              # integer voxel coordinates: the voxel reads 1
        ch = sitk.GetArrayFromImage(sitk.ReadImage(str(ds / "imagesTr" / f"wb001_000{k}.nii.gz")))
        assert ch[tuple(int(v) for v in xyz[::-1])] == pytest.approx(1.0, abs=1e-6)


def _misplace_landmark(case_dir: Path):
    """Move the first landmark (chiasm) of a PDDCA demo case far outside the image."""
    lines = (case_dir / "points" / "landmarks.fcsv").read_text().splitlines()
    i = next(n for n, l in enumerate(lines) if not l.startswith("#"))
    fields = lines[i].split(",")
    fields[3] = str(float(fields[3]) + 900.0)
    lines[i] = ",".join(fields)
    (case_dir / "points" / "landmarks.fcsv").write_text("\n".join(lines) + "\n")


def test_incomplete_case_refused_or_dropped(demo, tmp_path, capsys):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    src = tmp_path / "src"
    shutil.copytree(demo / "han_pddca", src)
    _misplace_landmark(src / "0522c0001")
    per = ("--landmark-channels", "heatmap", "--one-channel-per-landmark")   # a channel would be missing
    assert _convert("pddca", src, tmp_path / "raw", *per) == 2
    err = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if "error:" in l]
    assert len(err) == 1 and "0522c0001" in err[0] and "'chiasm' (outside the image)" in err[0], err
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())

    assert _convert("pddca", src, tmp_path / "raw", *per, "--landmark-incomplete", "drop") == 0
    ds = tmp_path / "raw" / "Dataset009_L"
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 2
    assert not list(ds.rglob("0522c0001*"))
    report = json.loads((ds / "conversion_report.json").read_text())
    assert [r["action"] for r in report["cases"]][1].startswith("dropped: lacks landmark(s) 'chiasm'")
    verify_dataset_integrity(str(ds), num_processes=1)


def test_no_landmarks_at_all_is_an_error(tmp_path):
    _hand_dataset(tmp_path, ".nrrd")
    (tmp_path / "landmarks" / "c1.json").unlink()
    with pytest.raises(ConversionError, match="no case has landmarks"):
        add_landmark_channels(tmp_path, "distance")


def test_test_split_gets_channels(demo, tmp_path):
    test_src = tmp_path / "test_src"
    from organmtl.demo_data.han import write_han
    write_han(test_src, 2, seed=1, first_index=20)
    assert _convert("pddca", demo / "han_pddca", tmp_path, "--test", test_src, "--landmark-channels",
                    "distance", "--file-ending", ".nrrd") == 0
    ds = tmp_path / "Dataset009_L"
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == [
        "0522c0020_0000.nrrd", "0522c0020_0001.nrrd", "0522c0021_0000.nrrd", "0522c0021_0001.nrrd"]


def test_cli_end_to_end_byte_identical(demo, tmp_path):
    runs = []
    for out, jobs in (("a", "1"), ("b", "2")):
        r = run_cli("convert", "pddca", demo / "han_pddca", "--dataset-id", "9", "--name", "L",
                    "--out", tmp_path / out, "-j", jobs, "--landmark-channels", "distance")
        assert r.returncode == 0, r.stderr
        ds = tmp_path / out / "Dataset009_L"
        runs.append({p.relative_to(ds): p.read_bytes() for p in ds.rglob("*") if p.is_file()})
    assert runs[0].keys() == runs[1].keys() and all(runs[0][k] == runs[1][k] for k in runs[0])
    assert Path("imagesTr/0522c0000_0001.nii.gz") in runs[0]
    help_text = run_cli("convert", "pddca", "--help").stdout
    assert "--landmark-channels {none,distance,heatmap}" in help_text and "--landmark-sigma-mm" in help_text


def test_merged_heatmap_of_a_case_missing_a_landmark_has_one_blob_fewer(demo, tmp_path, capsys):
    """The landmark papers' rule: a missing landmark is reported and dropped, the case kept."""
    src = tmp_path / "src"
    shutil.copytree(demo / "han_pddca", src)
    _misplace_landmark(src / "0522c0001")
    assert _convert("pddca", src, tmp_path / "raw", "--landmark-channels", "heatmap") == 0
    ds = tmp_path / "raw" / "Dataset009_L"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["organmtl_landmark_channels"]["landmarks"][0] == "chiasm"
    lm = json.loads((ds / "landmarks" / "0522c0001.json").read_text())
    assert [l["name"] for l in lm["landmarks"]] == ["eye_L", "eye_R", "brainstem_top", "menton"]
    ch = sitk.ReadImage(str(ds / "imagesTr" / "0522c0001_0001.nii.gz"))
    arr = sitk.GetArrayFromImage(ch)
    spacing_zyx = sitk.ReadImage(str(ds / "imagesTr" / "0522c0001_0000.nii.gz")).GetSpacing()[::-1]
    expected = gaussian_heatmap(arr.shape, spacing_zyx, [l["voxel_xyz"][::-1] for l in lm["landmarks"]], 5.0)
    np.testing.assert_allclose(arr, expected, rtol=1e-5, atol=1e-6)
    full = json.loads((ds / "landmarks" / "0522c0000.json").read_text())
    assert len(full["landmarks"]) == 5 == len(lm["landmarks"]) + 1
    record = next(r for r in json.loads((ds / "conversion_report.json").read_text())["cases"]
                  if r["case"] == "0522c0001")
    assert record["action"] == "kept" and record["landmark_channel_missing"] == ["chiasm"]
    out = capsys.readouterr().out
    assert "0522c0001: landmark channel without chiasm" in out
