"""Merging nnU-Net raw datasets into one multi-task dataset (Moeskops et al. §3.2): the union label
space with one shared background, voxel-for-voxel remapping, task table, remapping file, carried
test cases / landmarks / ignore label, nnU-Net's integrity check, re-runs, and bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from organmtl.cli import main
from tests.helpers import dataset_json, read_array, run_cli

TASKS = ("brain_mr", "breast_mr", "cardiac_cta")


def _merge(out, *sources_and_options):
    return main(["convert", "merge", *map(str, sources_and_options), "--dataset-id", "50", "--name", "MT",
                 "--out", str(out)])


def _write(path: Path, arr, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)


def write_dataset(root: Path, folder: str, labels: dict, label_maps: dict, ending=".nii.gz", channels=("CT",),
                  test_maps=None, test_without_label=()):
    """A small nnU-Net raw dataset written directly: one random image per channel and case."""
    ds = root / folder
    rng = np.random.default_rng(len(folder))
    for split, maps in (("Tr", label_maps), ("Ts", test_maps or {})):
        for case, lab in maps.items():
            for c in range(len(channels)):
                _write(ds / f"images{split}" / f"{case}_{c:04d}{ending}", rng.normal(size=lab.shape).astype(np.float32))
            _write(ds / f"labels{split}" / f"{case}{ending}", lab.astype(np.uint8))
    for case in test_without_label:
        for c in range(len(channels)):
            _write(ds / "imagesTs" / f"{case}_{c:04d}{ending}", rng.normal(size=(4, 5, 6)).astype(np.float32))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(channels)}, "labels": labels,
        "numTraining": len(label_maps), "file_ending": ending}))
    return ds


def _label_map(values, shape=(4, 5, 6)):
    lab = np.zeros(shape, np.uint8)
    for k, v in enumerate(values):
        lab[k % shape[0], k:, : 2 + k] = v
    return lab


# ------------------------------------------------------------------ the real use case: three demo tasks

@pytest.fixture(scope="module")
def multimodal_raw(demo_root, tmp_path_factory) -> Path:
    """The multimodal demo family, each task converted with the ``volumes`` converter."""
    raw = tmp_path_factory.mktemp("mm") / "raw"
    for i, task in enumerate(TASKS, start=11):
        assert main(["convert", "volumes", str(demo_root / "multimodal" / task), "--dataset-id", str(i),
                     "--name", task, "--out", str(raw)]) == 0
    return raw


def _sources(raw):
    return [raw / f"Dataset{i:03d}_{t}" for i, t in enumerate(TASKS, start=11)]


def test_multimodal_tasks_merge_voxel_for_voxel(multimodal_raw, tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    sources = _sources(multimodal_raw)
    assert _merge(tmp_path / "raw", *sources) == 0
    ds = tmp_path / "raw" / "Dataset050_MT"
    meta = dataset_json(ds)
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "pectoral_muscle": 4, "coronary_artery": 5}
    assert meta["channel_names"] == {"0": "mixed_T1_CT"}          # T1 and CT: per-image z-score in nnU-Net
    assert meta["numTraining"] == 18
    expected = {"brain_mr": {0: 0, 1: 1, 2: 2, 3: 3}, "breast_mr": {0: 0, 1: 4}, "cardiac_cta": {0: 0, 1: 5}}
    remapping = json.loads((ds / "label_remapping.json").read_text())
    assert remapping == {t: {str(k): v for k, v in table.items()} for t, table in expected.items()}
    tasks = meta["organmtl_tasks"]
    assert list(tasks) == list(TASKS)
    for task, src in zip(TASKS, sources):
        entry = tasks[task]
        assert entry["source"] == str(src) and entry["label_values"] == sorted(set(expected[task].values()) - {0})
        assert entry["labels"] == [n for n, v in meta["labels"].items() if v in entry["label_values"]]
        assert entry["cases"] == [f"{task}_{task}_{i:03d}" for i in range(6)] and entry["test_cases"] == []
        lut = np.zeros(256, np.uint8)
        for old, new in expected[task].items():
            lut[old] = new
        for i in range(6):
            case = f"{task}_{i:03d}"
            src_lab = read_array(src / "labelsTr" / f"{case}.nii.gz")
            merged = read_array(ds / "labelsTr" / f"{task}_{case}.nii.gz")
            np.testing.assert_array_equal(merged, lut[src_lab])
            np.testing.assert_array_equal(merged == 0, src_lab == 0)             # one shared background
            assert (ds / "imagesTr" / f"{task}_{case}_0000.nii.gz").read_bytes() == \
                (src / "imagesTr" / f"{case}_0000.nii.gz").read_bytes()
            a, b = (sitk.ReadImage(str(p)) for p in (src / "labelsTr" / f"{case}.nii.gz",
                                                      ds / "labelsTr" / f"{task}_{case}.nii.gz"))
            for get in ("GetSpacing", "GetOrigin", "GetDirection"):
                assert getattr(a, get)() == getattr(b, get)()
    report = json.loads((ds / "conversion_report.json").read_text())
    assert report["source"] == [str(s) for s in sources]
    assert {(r["task"], r["source_case"], r["case"]) for r in report["cases"]} == {
        (t, f"{t}_{i:03d}", f"{t}_{t}_{i:03d}") for t in TASKS for i in range(6)}
    verify_dataset_integrity(str(ds), num_processes=1)


def test_rerun_gives_identical_bytes(multimodal_raw, tmp_path):
    sources = _sources(multimodal_raw)[1:]
    assert _merge(tmp_path / "a", *sources) == 0
    assert _merge(tmp_path / "a", *sources) == 2                    # exists, no --overwrite
    before = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert _merge(tmp_path / "a", *sources, "--overwrite", "-j", "2") == 0
    after = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert before.keys() == after.keys() and all(before[k] == after[k] for k in before)
    assert dataset_json(tmp_path / "a" / "Dataset050_MT")["labels"] == {"background": 0, "pectoral_muscle": 1,
                                                                 "coronary_artery": 2}


# ------------------------------------------------------------------ label names used twice

@pytest.fixture
def liver_twice(tmp_path):
    a = write_dataset(tmp_path / "in", "Dataset001_A", {"background": 0, "liver": 1, "spleen": 2},
                      {"c1": _label_map([1, 2]), "c2": _label_map([2, 1])})
    b = write_dataset(tmp_path / "in", "Dataset002_B", {"background": 0, "kidney": 1, "liver": 2},
                      {"c1": _label_map([1, 2])})
    return a, b


def test_same_name_prefixed_by_task(liver_twice, tmp_path):
    a, b = liver_twice
    assert _merge(tmp_path / "raw", a, b) == 0
    ds = tmp_path / "raw" / "Dataset050_MT"
    meta = dataset_json(ds)
    assert meta["labels"] == {"background": 0, "A_liver": 1, "spleen": 2, "kidney": 3, "B_liver": 4}
    assert json.loads((ds / "label_remapping.json").read_text()) == {"A": {"0": 0, "1": 1, "2": 2},
                                                                     "B": {"0": 0, "1": 3, "2": 4}}
    assert meta["organmtl_tasks"]["B"]["labels"] == ["kidney", "B_liver"]
    np.testing.assert_array_equal(read_array(ds / "labelsTr" / "B_c1.nii.gz"),
                                  np.array([0, 3, 4], np.uint8)[read_array(b / "labelsTr" / "c1.nii.gz")])
    np.testing.assert_array_equal(read_array(ds / "labelsTr" / "A_c2.nii.gz"), read_array(a / "labelsTr" / "c2.nii.gz"))


def test_shared_labels_merge_same_names(liver_twice, tmp_path):
    a, b = liver_twice
    assert _merge(tmp_path / "raw", a, b, "--shared-labels") == 0
    ds = tmp_path / "raw" / "Dataset050_MT"
    assert dataset_json(ds)["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}
    assert json.loads((ds / "label_remapping.json").read_text())["B"] == {"0": 0, "1": 3, "2": 1}
    np.testing.assert_array_equal(read_array(ds / "labelsTr" / "B_c1.nii.gz"),
                                  np.array([0, 3, 1], np.uint8)[read_array(b / "labelsTr" / "c1.nii.gz")])


# ------------------------------------------------------------------ converted sources: ignore label, landmarks

def test_pddca_with_ignore_and_visceral_with_landmarks(demo_root, tmp_path):
    raw = tmp_path / "raw"
    assert main(["convert", "pddca", str(demo_root / "han_pddca"), "--dataset-id", "1", "--name", "HaN",
                 "--missing", "ignore", "--out", str(raw)]) == 0
    assert main(["convert", "visceral", str(demo_root / "visceral_ct"), "--dataset-id", "2", "--name", "Abd",
                 "--out", str(raw)]) == 0
    han, abd = raw / "Dataset001_HaN", raw / "Dataset002_Abd"
    assert _merge(raw, han, abd) == 0
    ds = raw / "Dataset050_MT"
    meta = dataset_json(ds)
    han_labels = [n for n in dataset_json(han)["labels"] if n not in ("background", "ignore")]
    assert list(meta["labels"]) == ["background", *han_labels, "liver", "spleen", "kidney_right", "kidney_left",
                                    "ignore"]
    assert meta["labels"]["ignore"] == 14 and meta["channel_names"] == {"0": "CT"}
    remap = json.loads((ds / "label_remapping.json").read_text())
    assert remap["HaN"]["10"] == 14 and remap["Abd"] == {"0": 0, "1": 10, "2": 11, "3": 12, "4": 13}
    src = read_array(han / "labelsTr" / "0522c0003.nii.gz")                     # lacks a structure: ignore label
    merged = read_array(ds / "labelsTr" / "HaN_0522c0003.nii.gz")
    np.testing.assert_array_equal(merged == 14, src == 10)
    np.testing.assert_array_equal(merged[src < 10], src[src < 10])
    assert meta["organmtl_small_organs"] == ["Chiasm", "OpticNerve_L", "OpticNerve_R"]
    assert meta["organmtl_landmarks"] == "landmarks"
    lm = json.loads((ds / "landmarks" / "Abd_10000100_1.json").read_text())
    assert lm["case"] == "Abd_10000100_1"
    assert lm["landmarks"] == json.loads((abd / "landmarks" / "10000100_1.json").read_text())["landmarks"]
    assert (ds / "landmarks" / "HaN_0522c0000.json").is_file()
    assert meta["organmtl_tasks"]["Abd"]["organmtl_extra"]["organmtl_visceral"]["modality"] == "CT"


# ------------------------------------------------------------------ file endings, test cases

def test_other_file_ending_is_converted_and_test_cases_carried(tmp_path):
    a = write_dataset(tmp_path / "in", "Dataset001_A", {"background": 0, "x": 1}, {"c1": _label_map([1])},
                      ending=".nrrd", channels=("T2", "ADC"), test_maps={"t1": _label_map([1])},
                      test_without_label=("t2",))
    b = write_dataset(tmp_path / "in", "Dataset002_B", {"background": 0, "y": 1, "z": 2}, {"c1": _label_map([2, 1])},
                      channels=("T2", "DWI"))
    assert _merge(tmp_path / "raw", a, b) == 0
    ds = tmp_path / "raw" / "Dataset050_MT"
    meta = dataset_json(ds)
    assert meta["channel_names"] == {"0": "T2", "1": "mixed_ADC_DWI"} and meta["file_ending"] == ".nii.gz"
    for c in range(2):
        src = sitk.ReadImage(str(a / "imagesTr" / f"c1_{c:04d}.nrrd"))
        out = sitk.ReadImage(str(ds / "imagesTr" / f"A_c1_{c:04d}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(src))
        np.testing.assert_allclose(out.GetSpacing(), src.GetSpacing(), atol=1e-6)
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == ["A_t1_0000.nii.gz", "A_t1_0001.nii.gz",
                                                                  "A_t2_0000.nii.gz", "A_t2_0001.nii.gz"]
    assert [p.name for p in (ds / "labelsTs").iterdir()] == ["A_t1.nii.gz"]
    np.testing.assert_array_equal(read_array(ds / "labelsTs" / "A_t1.nii.gz"), read_array(a / "labelsTs" / "t1.nrrd"))
    np.testing.assert_array_equal(read_array(ds / "labelsTr" / "B_c1.nii.gz"),
                                  np.array([0, 2, 3], np.uint8)[read_array(b / "labelsTr" / "c1.nii.gz")])
    assert meta["organmtl_tasks"]["A"]["test_cases"] == ["A_t1", "A_t2"] and meta["numTraining"] == 2


# ------------------------------------------------------------------ bad inputs (command line)

def _bad(kind: str, a: Path, b: Path) -> tuple[list, str]:
    """Damage the two-dataset input one way; returns the merge arguments and what the error must name."""
    meta = json.loads((b / "dataset.json").read_text())
    if kind == "no dataset.json":
        (b / "dataset.json").unlink()
        return [a, b], "Dataset002_B"
    if kind == "label value not in dataset.json":
        _write(b / "labelsTr" / "c1.nii.gz", _label_map([1, 7]))
        return [a, b], "c1.nii.gz"
    if kind == "different number of channels":
        meta["channel_names"] = {"0": "CT", "1": "PET"}
    elif kind == "region-based labels":
        meta["labels"] = {"background": 0, "y": 1, "z": [1, 2]}
    elif kind == "no background":
        meta["labels"] = {"y": 1, "z": 2}
    elif kind == "same task twice":
        return [a, a], "Dataset001_A"
    elif kind == "numTraining wrong":
        meta["numTraining"] = 3
    elif kind == "--test given":
        return [a, b, "--test", a], "--test"
    elif kind == "image grid differs from its label map":
        _write(b / "labelsTr" / "c1.nii.gz", _label_map([1, 2]), spacing=(2.0, 2.0, 2.0))
        return [a, b], "c1_0000.nii.gz"
    (b / "dataset.json").write_text(json.dumps(meta))
    return [a, b], "dataset.json"


BAD = ["no dataset.json", "label value not in dataset.json", "different number of channels", "region-based labels",
       "no background", "same task twice", "numTraining wrong", "--test given",
       "image grid differs from its label map"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2_nothing_written(kind, tmp_path):
    a = write_dataset(tmp_path / "in", "Dataset001_A", {"background": 0, "x": 1}, {"c1": _label_map([1])})
    b = write_dataset(tmp_path / "in", "Dataset002_B", {"background": 0, "y": 1, "z": 2}, {"c1": _label_map([1, 2])})
    args, culprit = _bad(kind, a, b)
    res = run_cli("convert", "merge", *args, "--dataset-id", "50", "--name", "MT", "--out", tmp_path / "raw",
                  "--strict")
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.replace("\r", "\n").splitlines() if "error:" in l or "Traceback" in l]
    assert len(lines) == 1 and "organmtl convert: error: " in lines[0] and culprit in lines[0], lines
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())
