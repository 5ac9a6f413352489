"""Real-anatomy head-and-neck demo data (organmtl/demo_data/han_atlas.py, docs/han_atlas.md): the
vendored contours, the rendered CT's acceptance before any training (organ volumes match the atlas,
the box-threshold oracle stays <= 0.4 on the optic nerves), the PDDCA layout read by
``organmtl convert pddca`` and the human-reference row of ``organmtl evaluate``."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from organmtl.cli import main
from organmtl.demo_data import han_atlas as H
from organmtl.demo_data import write_demo_data

N_PER_SPLIT = 2        # 2 training + 2 test scans rendered once for the module (a few seconds each)


@pytest.fixture(scope="module")
def atlas_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "demo"
    index = write_demo_data(out, seed=0, families=["han_pddca"], n_cases=N_PER_SPLIT, han_source="atlas")
    return out, index


def _mask(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)


def test_vendored_atlas_small_licensed_and_split_by_patient():
    files = [p for p in H.ATLAS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 15e6
    assert "Attribution 4.0 International" in (H.ATLAS_DIR / "LICENSE-CC-BY-4.0.txt").read_text()
    assert "Nikolov" in (H.ATLAS_DIR / "NOTICE.md").read_text()
    train, test = H.cases("train"), H.cases("test")
    assert (len(train), len(test)) == (23, 7)
    assert not {c.patient for c in train} & {c.patient for c in test}
    assert {c.scan for c in test} >= {"0522c0727a", "0522c0727b"}    # one patient's two scans stay together
    for c in train + test:
        for annotator in (H.GROUND_TRUTH, H.REFERENCE):
            assert (H.ATLAS_DIR / "labels" / f"{c.scan}_{annotator}.nrrd").is_file()


def test_vendored_crop_keeps_the_scan_geometry():
    """The crop keeps spacing/direction and puts the voxels where the source had them: the crop's
    origin is the source crop's origin + its index offset times the spacing."""
    e = H.atlas_index()["scans"]["0522c0017"]
    img = H.read_bits("0522c0017", H.GROUND_TRUTH)
    assert img.GetSpacing() == pytest.approx((0.98, 0.98, 2.5))
    assert img.GetDirection() == pytest.approx(np.eye(3).ravel())
    source_origin = (-135.72999938964844, 259.49000061035156, -1178.0)      # the shared atlas file's header
    offset = np.array(e["crop_index_zyx"][::-1]) * np.array(img.GetSpacing())
    assert img.GetOrigin() == pytest.approx(tuple(np.array(source_origin) + offset), abs=1e-3)


def test_layout_is_pddca_with_reference_and_notice(atlas_root):
    out, index = atlas_root
    ids = index["families"]["han_pddca"]
    assert ids == {"train": ["0522c0017", "0522c0057"], "test": ["0522c0014", "0522c0519"]}
    root = out / "han_pddca"
    assert "CC BY 4.0" in (root / "NOTICE.txt").read_text()
    for split, cases in ids.items():
        for case in cases:
            img = sitk.ReadImage(str(root / split / case / "img.nrrd"))
            assert img.GetPixelID() == sitk.sitkInt16
            assert img.GetSpacing()[:2] == pytest.approx((2.0, 2.0))
            names = {p.stem for p in (root / split / case / "structures").glob("*.nrrd")}
            assert names == set(H.STRUCTURES)                         # no Chiasm: the atlas has none
            assert {p.stem for p in (root / "reference" / case / "structures").glob("*.nrrd")} == names
            assert (root / split / case / "points" / "landmarks.fcsv").is_file()


def test_organ_volumes_match_the_atlas(atlas_root):
    """Rendered label volumes vs the atlas's (atlas.json: the source's native-grid volumes), per organ:
    within the resampling error, |difference| <= a quarter of the organ's border voxels (6-neighbourhood)
    + 4 voxels (0.04 cm3) on the 2 x 2 x 2.5 mm grid: linear resampling from ~1 mm to 2 mm in-plane moves
    a border by under a quarter voxel on average (largest over all 30 scans: 0.12 of the border for
    organs over 1 cm3); the 4 voxels are the discretisation of the tiny lenses and cochleae (largest
    need over the 30 scans: 3.2 voxels, a 15-voxel lens where the atlas has 22; docs/han_atlas.md)."""
    out, index = atlas_root
    vols = H.atlas_index()["scans"]
    cross = np.zeros((3, 3, 3), bool)
    cross[1, 1, :] = cross[1, :, 1] = cross[:, 1, 1] = True
    for split, cases in index["families"]["han_pddca"].items():
        for case in cases:
            for name, atlas_name in H.STRUCTURES.items():
                path = out / "han_pddca" / split / case / "structures" / f"{name}.nrrd"
                voxel_cm3 = np.prod(sitk.ReadImage(str(path)).GetSpacing()) / 1000
                m = _mask(path)
                border = (m & ~ndi.binary_erosion(m, cross)).sum()
                want = vols[case]["volumes_cm3"][H.GROUND_TRUTH][atlas_name]
                assert abs(m.sum() * voxel_cm3 - want) <= (0.25 * border + 4) * voxel_cm3, (case, name, m.sum() * voxel_cm3, want)
                assert (want == 0) == (m.sum() == 0)                    # an absent organ stays absent


def test_box_threshold_oracle_on_optic_nerves_at_most_04(atlas_root):
    """Issue 25's learning-free oracle (0.60 on the old phantom) must not segment the nerves of the
    rendered scans: mean Dice over the cases' optic nerves <= 0.4."""
    out, index = atlas_root
    scores = []
    for split, cases in index["families"]["han_pddca"].items():
        for case in cases:
            d = out / "han_pddca" / split / case
            img = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "img.nrrd"))).astype(np.float32)
            for side in ("L", "R"):
                scores.append(H.box_threshold_oracle(img, _mask(d / "structures" / f"OpticNerve_{side}.nrrd")))
    assert len(scores) == 4 * N_PER_SPLIT
    assert np.mean(scores) <= 0.4, scores


def test_box_threshold_oracle_hand_computed():
    """The oracle on a toy: organ values 1..10 in a 1x1x10 row, a box of 1 slice / 1 voxel margin."""
    img = np.zeros((1, 3, 12), np.float32)
    mask = np.zeros_like(img, bool)
    mask[0, 1, 1:11] = True
    img[0, 1, 1:11] = np.arange(1, 11)
    img[0, 0, :] = 5.0                      # inside the grown box and inside [p5, p95]: false positives
    # p5 = 1.45, p95 = 9.55 -> keeps organ values 2..9 (8 voxels) + 12 voxels of row 0 -> 2*8 / (20 + 10)
    assert H.box_threshold_oracle(img, mask, grow_slices=0, grow_inplane=1) == pytest.approx(16 / 30)


def test_rendered_ct_numbers(atlas_root):
    """The rendered image carries the table's tissues: air outside the head, bone in the mandible,
    fat-or-soft-tissue in the parotids, the brainstem near its 32 HU."""
    out, _ = atlas_root
    d = out / "han_pddca" / "train" / "0522c0017"
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(d / "img.nrrd"))).astype(np.float32)
    assert np.median(img[:, :2, :2]) < -900
    assert np.median(img[_mask(d / "structures" / "Mandible.nrrd")]) > 400
    assert -60 < np.median(img[_mask(d / "structures" / "Parotid_L.nrrd")]) < 40
    assert 10 < np.median(img[_mask(d / "structures" / "BrainStem.nrrd")]) < 50


def test_convert_pddca_and_evaluate_human_reference(atlas_root, tmp_path, monkeypatch, capsys):
    """The written layout converts with the stock ``organmtl convert pddca`` (no Chiasm: --structures),
    and ``organmtl evaluate --reference-labels`` scores the second annotator against the converted
    ground truth: perfect predictions (GT copied) give Dice 1, the reference the atlas's own agreement."""
    out, index = atlas_root
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    root = out / "han_pddca"
    assert main(["convert", "pddca", str(root / "train"), "--test", str(root / "test"), "-d", "598",
                 "--name", "HaNAtlasTest", "--structures", *H.STRUCTURES]) == 0
    ds = tmp_path / "raw" / "Dataset598_HaNAtlasTest"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["organmtl_small_organs"] == list(H.SMALL_ORGANS)
    pred = tmp_path / "pred"
    shutil.copytree(ds / "labelsTs", pred)
    shutil.copy(ds / "dataset.json", pred / "dataset.json")
    assert main(["evaluate", str(pred), str(ds / "labelsTs"), "--reference-labels", str(root / "reference"),
                 "-o", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "**human reference**" in printed and "human reference Dice" in printed
    summary = json.loads(next((tmp_path / "eval").glob("*summary.json")).read_text())
    hr = summary["human_reference"]
    assert summary["segmentation"]["mean"]["dice"] == pytest.approx(1.0)
    assert hr["n_cases"] == len(index["families"]["han_pddca"]["test"]) and hr["missing"] == []
    # the second annotator is not the first: nerves agree about as well as in the atlas (0.5-1)
    nerve = hr["per_structure"]["OpticNerve_L"]["dice"]["mean"]
    assert 0.5 < nerve < 1.0
    assert hr["mean"]["dice"] < 1.0
    # the other accepted layout: label maps like GT (here GT itself, so the "reference" agrees fully)
    assert main(["evaluate", str(pred), str(ds / "labelsTs"), "--reference-labels", str(ds / "labelsTs"),
                 "-o", str(tmp_path / "eval2")]) == 0
    again = json.loads(next((tmp_path / "eval2").glob("*summary.json")).read_text())["human_reference"]
    assert again["layout"] == "label maps" and again["mean"]["dice"] == pytest.approx(1.0)


def test_cli_atlas_refuses_the_phantom_size(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path / "d"), "--families", "han_pddca", "--han-source", "atlas",
                 "--size", "pddca"]) == 2
    assert "--size applies to the phantom" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_box_threshold_oracle_reproduces_the_issue_on_the_phantom():
    """The same oracle on the old phantom's optic nerves (10 cases, seed 0) gives the 0.60 issue 25
    measured: the implementation is the issue's, and the phantom is the easy data it describes."""
    from organmtl.demo_data.han import make_case

    scores = []
    for i in range(10):
        img, masks, _, _ = make_case(np.random.default_rng([0, 1, i]), i)
        scores += [H.box_threshold_oracle(img.astype(np.float32), masks[f"OpticNerve_{s}"]) for s in "LR"]
    assert np.mean(scores) == pytest.approx(0.60, abs=0.01)
