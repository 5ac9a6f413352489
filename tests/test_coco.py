"""to-coco: pycocotools/Detectron2 load it; HMR-Net contour points are canonical and round-trip."""
import json

import numpy as np
import pytest
import SimpleITK as sitk
from pycocotools.coco import COCO
from scipy import ndimage

from organmtl.cli import main
from organmtl.converters.coco import instance_annotation
from organmtl.geometry import canonical_contour, contour_points, rasterize_polygon, signed_area
from tests.helpers import write_spine_coco


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def spine_coco(demo_root, tmp_path_factory):
    """Here with 50 contour points (not the shared fixture's default 100)."""
    return write_spine_coco(demo_root, tmp_path_factory.mktemp("coco") / "spine", "--points", "50")


def test_loads_with_pycocotools_and_detectron2(spine_coco):
    from detectron2.data.datasets import load_coco_json

    for split in ("train", "val"):
        js = spine_coco / "annotations" / f"instances_{split}.json"
        coco = COCO(str(js))
        assert len(coco.getCatIds()) == 6
        records = load_coco_json(str(js), str(spine_coco / "images"), extra_annotation_keys=["contour_points"])
        assert records and all(len(a["contour_points"]) == 100 for r in records for a in r["annotations"])
        assert all((spine_coco / "images" / r["file_name"].split("/")[-1]).is_file() for r in records)


def test_annotations_match_label_maps(spine_coco, demo_root):
    data = json.loads((spine_coco / "annotations" / "instances_train.json").read_text())
    coco = COCO(str(spine_coco / "annotations" / "instances_train.json"))
    im = data["images"][0]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(
        str(demo_root / "spine" / "spine_sag_mr" / "labels" / f"{im['case']}.nii.gz")))[0]
    assert im["pixel_spacing"] == pytest.approx([0.8, 0.8])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[im["id"]]))
    discs = [a for a in anns if a["category_id"] == 6]
    assert len(discs) == 4                                       # one instance per disc component
    comps, _ = ndimage.label(lab == 6)
    for a in anns:
        m = coco.annToMask(a).astype(bool)
        truth = lab == a["category_id"]
        if a["category_id"] == 6:      # the disc component this instance covers
            truth = comps == np.bincount(comps[m]).argmax()
        assert a["area"] == truth.sum()                            # area counts the label's pixels
        assert _dice(m, truth) > 0.9                               # polygon rasterisation: thin rim only


def test_contour_points_round_trip_dice(spine_coco, demo_root):
    """p = 50 evenly spaced points rasterised back to a polygon: Dice >= 0.98 on demo masks."""
    data = json.loads((spine_coco / "annotations" / "instances_train.json").read_text())
    coco = COCO(str(spine_coco / "annotations" / "instances_train.json"))
    dices = []
    for a in data["annotations"]:
        im = coco.imgs[a["image_id"]]
        pts = np.array(a["contour_points"]).reshape(-1, 2)
        dices.append(_dice(rasterize_polygon(pts, im["height"], im["width"]), coco.annToMask(a).astype(bool)))
    assert np.mean(dices) >= 0.98 and min(dices) > 0.93


def test_canonical_start_and_clockwise_orientation():
    mask = np.zeros((20, 20), bool)
    mask[5:15, 3:17] = True
    pts = contour_points(mask, 40)
    assert pts[0, 1] == pytest.approx(pts[:, 1].min())           # starts at the top
    assert pts[0, 0] == pytest.approx((pts[:, 0].min() + pts[:, 0].max()) / 2)   # above the box centre
    assert pts[1, 0] > pts[0, 0]                                 # then moves right: clockwise on screen
    steps = np.linalg.norm(np.diff(np.vstack([pts, pts[:1]]), axis=0), axis=1)
    assert steps.std() / steps.mean() < 0.2                      # evenly spaced
    # same answer whatever the input orientation
    xy = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
    np.testing.assert_allclose(canonical_contour(xy), canonical_contour(xy[::-1]))


def test_component_with_hole_is_written_as_rle():
    mask = np.zeros((12, 12), bool)
    mask[2:10, 2:10] = True
    mask[5:7, 5:7] = False
    ann = instance_annotation(mask, 1, 20)
    assert isinstance(ann["segmentation"], dict) and ann["area"] == 60
    from pycocotools import mask as mask_util

    rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
    np.testing.assert_array_equal(mask_util.decode(rle).astype(bool), mask)


def test_han_volume_to_coco_along_each_axis(demo_root, tmp_path):
    for axis in ("axial", "coronal", "sagittal"):
        out = tmp_path / axis
        assert main(["convert", "pddca", str(demo_root / "han_pddca"), "--to", "coco", "--dataset-id", "31",
                     "--out", str(out), "--axis", axis]) == 0
        data = json.loads((out / "annotations" / "instances_train.json").read_text())
        shapes = {(im["height"], im["width"]) for im in data["images"]}
        assert shapes == {"axial": {(80, 80)}, "coronal": {(32, 80)}, "sagittal": {(32, 80)}}[axis]
        spacing = {tuple(im["pixel_spacing"]) for im in data["images"]}
        assert spacing == {"axial": {(1.0, 1.0)}, "coronal": {(2.5, 1.0)}, "sagittal": {(2.5, 1.0)}}[axis]
        assert {c["name"] for c in data["categories"]} >= {"Chiasm", "OpticNerve_L"}
        assert data["organmtl_small_organs"] == ["Chiasm", "OpticNerve_L", "OpticNerve_R"]   # for `evaluate`


def test_canonical_start_is_stable_under_small_rotations_and_idempotent():
    """The start (top crossing above the box centre) moves continuously: a 32 x 16 rectangle rotated by
    -3 and +3 degrees starts near its top-edge middle both times, never at a corner."""
    rect = np.array([[0, 0], [32, 0], [32, 16], [0, 16]], float)
    for deg in (-3.0, 3.0):
        t = np.deg2rad(deg)
        rot = (rect - [16, 8]) @ np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]]) + [16, 8]
        xy = canonical_contour(rot)
        assert signed_area(xy) > 0
        assert abs(xy[0, 0] - 16) < 1e-9 and xy[0, 1] < 2                    # top middle, not a corner
        np.testing.assert_allclose(canonical_contour(xy), xy)                 # idempotent
    line = np.array([[5, 0], [5, 4], [5, 9]], float)                         # no crossing: top-most vertex
    assert canonical_contour(line)[0].tolist() == [5, 0]


def _oriented_dataset(root, name, transform):
    """One-case nnU-Net dataset, asymmetric along every axis and anisotropic, stored as ``transform``
    makes it (same physical image: axes flipped or permuted, direction matrix adjusted)."""
    from organmtl.converters.common import write_dataset_json

    rng = np.random.default_rng(5)
    img = sitk.GetImageFromArray(rng.integers(-200, 300, (9, 12, 15)).astype(np.int16))   # (z, y, x), LPS
    img.SetSpacing((0.8, 1.1, 2.5))
    img.SetOrigin((-40.0, 12.0, -300.0))
    lab = np.zeros((9, 12, 15), np.uint8)
    lab[2:7, 2:5, 3:6] = 1              # patient right, anterior
    lab[4:8, 6:11, 9:14] = 2            # patient left, posterior, superior
    lab[5, 7, 10] = 0
    seg = sitk.GetImageFromArray(lab)
    seg.CopyInformation(img)
    ds = root / name
    for sub in ("imagesTr", "labelsTr"):
        (ds / sub).mkdir(parents=True)
    sitk.WriteImage(transform(img), str(ds / "imagesTr" / "c1_0000.nrrd"))
    sitk.WriteImage(transform(seg), str(ds / "labelsTr" / "c1.nrrd"))
    write_dataset_json(ds, {"0": "CT"}, {"background": 0, "a": 1, "b": 2}, 1, ".nrrd", name, "orientation test")
    return ds


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slices_are_anatomical_whatever_the_voxel_order(axis, tmp_path):
    """A RAS-stored and an axis-permuted copy of an LPS volume give the same COCO slices and spacing."""
    stored = {"lps": lambda im: im,
              "ras": lambda im: sitk.Flip(im, [True, True, False], flipAboutOrigin=False),
              "permuted": lambda im: sitk.PermuteAxes(im, [2, 0, 1])}
    results = {}
    for name, transform in stored.items():
        ds = _oriented_dataset(tmp_path / "raw", f"Dataset00{len(results) + 1}_{name}", transform)
        if name != "lps":
            assert sitk.ReadImage(str(ds / "imagesTr" / "c1_0000.nrrd")).GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)
        out = tmp_path / f"coco_{name}"
        assert main(["convert", "to-coco", str(ds), "--out", str(out), "--axis", axis, "--num-folds", "1"]) == 0
        data = json.loads((out / "annotations" / "instances_val.json").read_text())
        images = {im["id"]: im for im in data["images"]}
        results[name] = (
            sorted((im["file_name"], im["height"], im["width"], tuple(im["pixel_spacing"]), im["slice_index"])
                   for im in data["images"]),
            sorted((images[a["image_id"]]["file_name"], a["category_id"], tuple(a["bbox"]), a["area"],
                    tuple(a["contour_points"])) for a in data["annotations"]),
            {p.name: p.read_bytes() for p in (out / "images").iterdir()})
    assert results["lps"][0] and results["lps"][1]
    assert results["ras"] == results["lps"] and results["permuted"] == results["lps"]
    spacing = {"axial": (1.1, 0.8), "coronal": (2.5, 0.8), "sagittal": (2.5, 1.1)}[axis]
    assert {entry[3] for entry in results["lps"][0]} == {spacing}
    # anatomy: in an axial slice structure a (patient right) lies left of b on screen
    if axis == "axial":
        bbox = {c: b for _, c, b, _, _ in results["lps"][1]}
        assert bbox[1][0] < bbox[2][0]
