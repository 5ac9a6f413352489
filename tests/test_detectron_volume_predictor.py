"""organmtl.detectron_heads.volume_predictor (docs/hmrnet.md, "Predicting a volume"): a Detectron2
model trained by train_net.py predicts a volume slice by slice in its training plane, on the
volume's geometry.

The volumes are demo spine slices (organmtl/demo_data/spine.py) stacked into 3D and stored in
non-LPS orientations, converted with ``organmtl convert to-coco``. Checked: every slice the
predictor feeds the model equals the PNG the converter wrote for training (per plane and
intensity rule); labels go back to the voxels they were predicted for; overlaps are resolved by
score; and, with models train_net.py trained for 2 iterations (too short for a Dice bound, so this
is a round trip), the volume prediction is, slice for slice, the model's own prediction of the
converter's PNG, with only train_net's config.yaml (the COCO folder moved away) to say how to slice.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances

from organmtl.cli import main
from organmtl.converters.coco import slices_along, to_lps
from organmtl.demo_data.spine import AX_LABELS, SAG_LABELS, axial_slice, sagittal_slice
from organmtl.detectron_heads.config import record_dataset
from organmtl.detectron_heads.volume_predictor import (_back_to_geometry, label_names, load_config,
                                                       paint_instances, predict_volume, slice_images)
from organmtl.procs import run_in_group

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"mask_rcnn": REPO / "detectron_heads" / "configs" / "tiny" / "mask_rcnn_R_18_FPN_baseline_tiny.yaml",
           "hmrnet": REPO / "detectron_heads" / "hmrnet" / "configs" / "tiny" / "hmrnet_R_18_FPN_tiny.yaml"}


# ---------------------------------------------------------------- data: demo slices stacked into volumes

def _volume(maker, n_slices: int, seed: int, axis: str, stored_as: str) -> tuple[sitk.Image, sitk.Image]:
    """``n_slices`` demo slices placed so that the converter's ``axis`` slice k is the k-th demo
    slice (image and labels), written in the LPS frame and then stored as ``stored_as``."""
    pairs = [maker(np.random.default_rng([seed, i])) for i in range(n_slices)]
    size = pairs[0][0].shape[0]
    shape = {"axial": (n_slices, size, size), "coronal": (size, n_slices, size), "sagittal": (size, size, n_slices)}[axis]
    img, lab = np.zeros(shape, np.int16), np.zeros(shape, np.uint8)
    for (im2d, lab2d), (_, iv), (_, lv) in zip(pairs, slices_along(img, axis), slices_along(lab, axis)):
        iv[...], lv[...] = im2d, lab2d
    out = []
    for arr in (img, lab):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((0.8, 0.7, 2.5) if axis == "axial" else (0.8, 2.5, 0.7) if axis == "coronal" else (2.5, 0.8, 0.7))
        im.SetOrigin((-40.0, 12.5, 100.0))
        out.append(sitk.DICOMOrient(im, stored_as))
    return out[0], out[1]


def _nnunet_dataset(root: Path, volumes: list[tuple[sitk.Image, sitk.Image]], modality: str, labels: dict) -> Path:
    ds = root / "Dataset050_Stack"
    for i, (img, lab) in enumerate(volumes):
        (ds / "imagesTr").mkdir(parents=True, exist_ok=True)
        (ds / "labelsTr").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(ds / "imagesTr" / f"stack_{i:03d}_0000.nii.gz"))
        sitk.WriteImage(lab, str(ds / "labelsTr" / f"stack_{i:03d}.nii.gz"))
    (ds / "dataset.json").write_text(json.dumps({"name": "Stack", "channel_names": {"0": modality}, "labels": labels,
                                                 "numTraining": len(volumes), "file_ending": ".nii.gz"}))
    return ds


def _to_coco(ds: Path, out: Path, axis: str, *extra: str) -> Path:
    assert main(["convert", "to-coco", str(ds), "--out", str(out), "--axis", axis, "--num-folds", "2",
                 "--fold", "0", *extra]) == 0
    return out


# ---------------------------------------------------------------- unit: painting, slicing, geometry

def test_paint_instances_highest_score_wins_and_low_scores_are_dropped():
    """Hand-computed 3 x 6 slice: class 0 (score 0.6) on columns 0-3, class 2 (score 0.9) on
    columns 2-5 wins their overlap, class 1 (score 0.3) under the 0.5 threshold is not painted."""
    inst = Instances((3, 6))
    masks = torch.zeros((3, 3, 6), dtype=torch.bool)
    masks[0, :, 0:4] = True
    masks[1, :, :] = True
    masks[2, 1:, 2:6] = True
    inst.pred_masks, inst.scores = masks, torch.tensor([0.6, 0.3, 0.9])
    inst.pred_classes = torch.tensor([0, 1, 2])
    expected = np.array([[1, 1, 1, 1, 0, 0],
                         [1, 1, 3, 3, 3, 3],
                         [1, 1, 3, 3, 3, 3]], np.uint8)
    assert np.array_equal(paint_instances(inst, 3, 6, 0.5), expected)
    # HMR-Net without RASTER_ON_TEST: the points are rasterised (square x 1..4, y 0..2)
    pts = Instances((3, 6), scores=torch.tensor([0.8]), pred_classes=torch.tensor([1]),
                    pred_points=torch.tensor([[[1.0, 0.0], [4.0, 0.0], [4.0, 2.0], [1.0, 2.0]]]))
    assert np.array_equal(paint_instances(pts, 3, 6, 0.5), np.array([[0, 2, 2, 2, 0, 0]] * 2 + [[0] * 6], np.uint8))


@pytest.mark.parametrize("axis,modality,maker,labels,stored_as,extra", [
    ("sagittal", "MR", sagittal_slice, SAG_LABELS, "RAS", ()),
    ("coronal", "CT", axial_slice, AX_LABELS, "PIR", ()),
    ("axial", "MR", sagittal_slice, SAG_LABELS, "LAI", ("--png16",)),
], ids=["sagittal-percentiles", "coronal-ct-window", "axial-png16"])
def test_predictor_slices_are_the_converters_training_pngs(tmp_path, axis, modality, maker, labels, stored_as, extra):
    """For each plane and intensity rule: the slicing recorded from the COCO json, and every slice
    the predictor makes from the stored (non-LPS) volume equals, pixel for pixel, the PNG the
    converter wrote, as Detectron2's loader reads it."""
    volumes = [_volume(maker, 3, seed, axis, stored_as) for seed in (0, 1)]
    coco = _to_coco(_nnunet_dataset(tmp_path / "raw", volumes, modality, labels), tmp_path / "coco", axis, *extra)
    data = json.loads((coco / "annotations" / "instances_val.json").read_text())
    cfg = load_config(CONFIGS["mask_rcnn"], ["ORGANMTL.DATASET_ROOT", str(coco)])
    expected_intensity = "png16" if extra else ("ct_window" if modality == "CT" else "percentiles")
    assert (cfg.ORGANMTL.SLICES.AXIS, cfg.ORGANMTL.SLICES.INTENSITY) == (axis, expected_intensity)
    assert cfg.ORGANMTL.CLASS_NAMES == [k for k, v in sorted(labels.items(), key=lambda kv: kv[1]) if v]
    made = dict(slice_images(sitk.GetArrayFromImage(to_lps(volumes[0][0])), cfg, "BGR"))
    assert len(made) == 3 and len(data["images"]) == 3                      # volume 0 is fold 0's validation
    for im in data["images"]:
        png = read_image(str(coco / "images" / im["file_name"]), format="BGR")
        assert np.array_equal(made[im["slice_index"]], png), im["file_name"]
    assert len({made[k].tobytes() for k in made}) == 3                     # three different slices


@pytest.mark.parametrize("stored_as", ["LPS", "RAS", "PIR", "SLA"])
def test_labels_go_back_to_the_voxels_they_were_predicted_for(stored_as):
    """Voxel values = their own index: an array taken to LPS and back lands where it came from, on
    the input's exact geometry (also for an oblique direction, which LPS reorientation only permutes)."""
    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6))
    img.SetSpacing((0.5, 1.5, 3.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    c, s = np.cos(0.2), np.sin(0.2)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))              # 11.5 degrees about z
    img = sitk.DICOMOrient(img, stored_as)
    lps = to_lps(img)
    back = _back_to_geometry(sitk.GetArrayFromImage(lps), lps, img)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert (back.GetSize(), back.GetSpacing(), back.GetOrigin(), back.GetDirection()) == \
        (img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def test_config_that_does_not_say_how_to_slice_is_refused():
    with pytest.raises(ValueError, match="ORGANMTL.SLICES.AXIS, ORGANMTL.SLICES.INTENSITY, ORGANMTL.CLASS_NAMES not recorded"):
        load_config(CONFIGS["hmrnet"])
    opts = ["ORGANMTL.SLICES.AXIS", "axial", "ORGANMTL.SLICES.INTENSITY", "ct_window",
            "ORGANMTL.CLASS_NAMES", "['liver']", "MODEL.ROI_HEADS.NUM_CLASSES", "1"]
    assert label_names(CONFIGS["hmrnet"], opts) == {1: "liver"}
    with pytest.raises(ValueError, match="NUM_CLASSES 2"):
        load_config(CONFIGS["hmrnet"], opts[:-1] + ["2"])


def test_record_dataset_reads_folders_written_before_the_record():
    """COCO folders from before ``organmtl_slices``: the plane from the image entries, the rule from
    their windows / offsets."""
    cfg = load_config(CONFIGS["hmrnet"], ["ORGANMTL.SLICES.AXIS", "axial", "ORGANMTL.SLICES.INTENSITY", "png16",
                                          "ORGANMTL.CLASS_NAMES", "['x']", "MODEL.ROI_HEADS.NUM_CLASSES", "1"])
    cats = [{"id": 2, "name": "b"}, {"id": 1, "name": "a"}]
    record_dataset(cfg, {"categories": cats, "images": [{"axis": "coronal", "window": [-160.0, 240.0]}] * 2})
    assert (cfg.ORGANMTL.SLICES.AXIS, cfg.ORGANMTL.SLICES.INTENSITY, cfg.ORGANMTL.CLASS_NAMES) == \
        ("coronal", "ct_window", ["a", "b"])
    record_dataset(cfg, {"categories": cats, "images": [{"axis": "sagittal", "window": [3.0, 700.0]}]})
    assert cfg.ORGANMTL.SLICES.INTENSITY == "percentiles"
    record_dataset(cfg, {"categories": cats, "images": [{"axis": "axial", "intensity_offset": 0.0}]})
    assert cfg.ORGANMTL.SLICES.INTENSITY == "png16"


# ---------------------------------------------------------------- e2e: train_net.py models, round trip

@pytest.fixture(scope="module")
def sagittal_mr(tmp_path_factory):
    """Two stored-as-RAS volumes of 3 demo sagittal MR slices each, as COCO (sagittal, percentiles):
    volume 0 validates, volume 1 trains."""
    root = tmp_path_factory.mktemp("volume_predictor")
    volumes = [_volume(sagittal_slice, 3, seed, "sagittal", "RAS") for seed in (0, 1)]
    coco = _to_coco(_nnunet_dataset(root / "raw", volumes, "MR", SAG_LABELS), root / "coco", "sagittal")
    return root, volumes[0][0], coco


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("model", ["mask_rcnn", "hmrnet"])
def test_train_net_model_predicts_a_volume_as_it_predicts_the_training_pngs(sagittal_mr, model):
    root, volume, coco = sagittal_mr
    out = root / f"run_{model}"
    run_in_group([sys.executable, str(REPO / "detectron_heads" / "train_net.py"), "--config-file", str(CONFIGS[model]),
                  "ORGANMTL.DATASET_ROOT", str(coco), "ORGANMTL.DATASET_NAME", f"stack_{model}", "OUTPUT_DIR", str(out),
                  "SOLVER.MAX_ITER", "2", "TEST.HMRNET.NUM_OVERLAYS", "0", "DATALOADER.NUM_WORKERS", "0"],
                 log_file=root / f"run_{model}.log", timeout=600)
    moved = root / f"coco_moved_{model}"
    shutil.copytree(coco, moved)
    shutil.rmtree(coco)                 # the config alone must say how to slice and what the labels are
    try:
        opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.HMRNET.SCORE_THRESH", "0.0"]
        config, weights = out / "config.yaml", out / "model_final.pth"
        assert label_names(config) == {v: k for k, v in SAG_LABELS.items() if v}
        pred = predict_volume(config, weights, volume, device="cpu", opts=opts)
        assert pred.GetPixelID() == sitk.sitkUInt8
        assert (pred.GetSize(), pred.GetSpacing(), pred.GetOrigin(), pred.GetDirection()) == \
            (volume.GetSize(), volume.GetSpacing(), volume.GetOrigin(), volume.GetDirection())
        cfg = load_config(config, opts)
        cfg.MODEL.WEIGHTS, cfg.MODEL.DEVICE = str(weights), "cpu"
        reference = DefaultPredictor(cfg)
        got = dict(slices_along(sitk.GetArrayFromImage(to_lps(pred)), "sagittal"))
        data = json.loads((moved / "annotations" / "instances_val.json").read_text())
        assert len(data["images"]) == 3
        for im in data["images"]:
            png = read_image(str(moved / "images" / im["file_name"]), format="BGR")
            expected = paint_instances(reference(png)["instances"], *png.shape[:2], 0.0)
            assert np.array_equal(got[im["slice_index"]], expected), im["file_name"]
        painted = sitk.GetArrayFromImage(pred)
        assert len(np.unique(painted)) >= 3                     # not trivially empty: >= 2 structures painted
    finally:
        shutil.copytree(moved, coco)
