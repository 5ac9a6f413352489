"""HMR-Net data (paper §2.4, §3.1, docs/hmrnet.md): contour points <-> polygon round trip on the demo
spine masks, the dataset mapper carrying points through augmentations (flip keeps the canonical
orientation), the paper's augmentation list and the evaluator's 11-point mAP."""
import json

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import transforms as T

from organmtl.detectron_heads import add_organmtl_config
from organmtl.detectron_heads.hmrnet import HMRNetDatasetMapper, add_hmrnet_config
from organmtl.detectron_heads.hmrnet.dataset_mapper import (AUGMENTATIONS, GaussianBlurTransform,
                                                            build_hmrnet_augmentation, transform_contour_points)
from organmtl.detectron_heads.hmrnet.evaluator import eleven_point_map
from organmtl.evaluation.coco_eval import decode_segmentation
from organmtl.evaluation.metrics import dice
from organmtl.geometry import contour_points, rasterize_polygon, signed_area


def _train_json(coco):
    return json.loads((coco / "annotations" / "instances_train.json").read_text())


def test_points_polygon_round_trip_dice_on_demo_masks(spine_coco):
    data = _train_json(spine_coco)
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    scores = []
    for a in data["annotations"]:
        h, w = sizes[a["image_id"]]
        mask = decode_segmentation(a["segmentation"], h, w)
        pts = contour_points(mask, 50)                          # p = 50
        assert signed_area(pts) > 0                            # clockwise on screen
        scores.append(dice(rasterize_polygon(pts, h, w), mask))
    assert len(scores) >= 10
    assert np.mean(scores) >= 0.98 and min(scores) >= 0.95


def _square(x0=10.0, y0=20.0, s=8.0, n=2):
    t = np.arange(n) / n * s
    top = np.stack([x0 + t, np.full(n, y0)], 1)
    right = np.stack([np.full(n, x0 + s), y0 + t], 1)
    bottom = np.stack([x0 + s - t, np.full(n, y0 + s)], 1)
    left = np.stack([np.full(n, x0), y0 + s - t], 1)
    return np.concatenate([top, right, bottom, left])          # clockwise, starts top-left


def test_flip_reverses_order_to_keep_orientation():
    pts = _square()
    flipped = transform_contour_points(pts.ravel(), T.TransformList([T.HFlipTransform(64)]))
    assert signed_area(flipped) > 0                             # still clockwise
    assert np.allclose(flipped[0], [64 - 14.0, 20.0])           # starts at the top centre
    expected = np.stack([64 - pts[:, 0], pts[:, 1]], 1)
    assert {tuple(p) for p in np.round(flipped, 6)} == {tuple(p) for p in np.round(expected, 6)}
    resampled = transform_contour_points(pts.ravel(), T.TransformList([]), num_points=16)
    assert resampled.shape == (16, 2) and np.allclose(resampled[0], [14.0, 20.0])


def _box_normalised(xy):
    lo, hi = xy.min(0), xy.max(0)
    return 2 * (xy - (lo + hi) / 2) / (hi - lo)


@pytest.mark.parametrize("flip", [False, True])
def test_point_order_survives_small_rotations_of_a_flat_topped_organ(flip):
    """The i-th target point must mean the same place on every augmented instance. A vertebra-like
    rectangle (flat top edge) rotated by -5 and +5 degrees: with a "top-most vertex" start the first
    point jumps from the top-left to the top-right corner (normalised points differ by ~1 box half-width
    on average); with the box-centre start they stay within a few hundredths."""
    rect = _square(x0=40.0, y0=56.0, s=16.0, n=16)
    rect = np.stack([40.0 + (rect[:, 0] - 40.0) * 2, rect[:, 1]], 1)     # 32 x 16, like the demo vertebrae
    shapes = []
    for deg in (-5.0, 5.0):
        tl = [T.RotationTransform(128, 128, deg, expand=False)]
        if flip:
            tl.insert(0, T.HFlipTransform(128))
        shapes.append(_box_normalised(transform_contour_points(rect.ravel(), T.TransformList(tl), 50)))
    assert np.abs(shapes[0][0] - shapes[1][0]).max() < 0.05                  # same start
    assert np.abs(shapes[0] - shapes[1]).mean() < 0.1                        # same place for every index


def _cfg(**opts):
    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.MODEL.HMRNET.NUM_POINTS = 8
    cfg.MODEL.ROI_HEADS.NAME = "HMRNetROIHeads"      # the mapper adds gt_points only for HMR-Net heads
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


def _record():
    img = np.zeros((64, 64, 3), np.uint8)
    img[20:28, 10:18] = 255
    pts = _square()
    return {"file_name": "x.png", "image": img, "height": 64, "width": 64, "image_id": 0,
            "annotations": [{"bbox": [10, 20, 8, 8], "bbox_mode": 1, "category_id": 0, "iscrowd": 0,
                             "segmentation": [pts.ravel().tolist()], "contour_points": pts.ravel().tolist()}]}


def test_mapper_carries_points_through_a_forced_flip(monkeypatch):
    monkeypatch.setattr("detectron2.data.detection_utils.read_image", lambda *a, **k: _record()["image"])
    mapper = HMRNetDatasetMapper(_cfg(), True)
    mapper.augmentations = T.AugmentationList([T.RandomFlip(prob=1.0)])
    out = mapper(_record())
    pts = out["instances"].gt_points[0].numpy()
    assert pts.shape == (8, 2)
    assert signed_area(pts) > 0 and np.allclose(pts[0], [64 - 14.0, 20.0])      # top centre
    assert torch.allclose(out["instances"].gt_boxes.tensor, torch.tensor([[46.0, 20.0, 54.0, 28.0]]))


def test_paper_augmentation_list_runs_and_keeps_points_with_the_image(monkeypatch):
    monkeypatch.setattr("detectron2.data.detection_utils.read_image", lambda *a, **k: _record()["image"])
    cfg = _cfg(**{"INPUT.HMRNET_AUG.NAMES": str(list(AUGMENTATIONS)), "INPUT.MASK_FORMAT": "bitmask",
                  "INPUT.HMRNET_AUG.CROP": "(1.0, 1.0)", "INPUT.HMRNET_AUG.BLUR_PROB": "1.0"})
    names = [type(a).__name__ for a in build_hmrnet_augmentation(cfg, True)]
    assert names == ["ResizeShortestEdge", "RandomFlip", "RandomRotation", "RandomExtent", "RandomCrop",
                     "RandomGaussianBlur"]
    mapper = HMRNetDatasetMapper(cfg, True)
    for seed in range(3):
        np.random.seed(seed)
        out = mapper(_record())
        inst = out["instances"]
        if len(inst):
            pts = inst.gt_points[0].numpy()
            box = inst.gt_boxes.tensor[0].numpy()
            assert signed_area(pts) > 0
            assert np.allclose(pts.mean(0), [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], atol=3)
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_hmrnet_augmentation(_cfg(**{"INPUT.HMRNET_AUG.NAMES": "['zoom']"}), True)


def test_gaussian_blur_transform_keeps_geometry():
    img = np.zeros((9, 9, 3), np.uint8)
    img[4, 4] = 255
    t = GaussianBlurTransform(1.0)
    out = t.apply_image(img)
    assert out.shape == img.shape and out[4, 4, 0] < 255 and out[4, 5, 0] > 0
    assert np.array_equal(t.apply_coords(np.ones((2, 2))), np.ones((2, 2)))


def test_eleven_point_map_perfect_and_empty(spine_coco):
    from pycocotools.coco import COCO

    gt = COCO(str(spine_coco / "annotations" / "instances_train.json"))
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    assert eleven_point_map(gt, perfect, "bbox")["AP11"] == pytest.approx(100.0)
    assert eleven_point_map(gt, [], "bbox")["AP11"] == 0.0


class _FixedCrop(T.Augmentation):
    """Detectron2's crop of the columns ``x0 .. x0 + w`` (all rows): a deterministic RandomCrop."""

    def __init__(self, x0: int, w: int):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        return T.CropTransform(self.x0, 0, self.w, image.shape[0])


def test_crop_that_truncates_an_instance_gives_points_of_the_visible_part(monkeypatch):
    """The 8 x 8 square at x 10..18, y 20..28 cropped at x = 14: the visible part is x 0..4 (crop
    coordinates), y 20..28, a 4 x 8 rectangle of perimeter 24, so 8 points every 3 px clockwise from
    its top centre (2, 20). Mask and box are cropped by Detectron2; the points must be too (issue 26)."""
    monkeypatch.setattr("detectron2.data.detection_utils.read_image", lambda *a, **k: _record()["image"])
    mapper = HMRNetDatasetMapper(_cfg(**{"INPUT.MASK_FORMAT": "bitmask"}), True)
    mapper.use_instance_mask = True
    mapper.augmentations = T.AugmentationList([_FixedCrop(14, 50)])
    inst = mapper(_record())["instances"]
    assert inst.image_size == (64, 50)
    assert torch.allclose(inst.gt_boxes.tensor, torch.tensor([[0.0, 20.0, 4.0, 28.0]]))
    assert inst.gt_masks.tensor[0].sum() == 4 * 8                     # Detectron2 cropped the mask
    expected = [[2, 20], [4, 21], [4, 24], [4, 27], [2, 28], [0, 27], [0, 24], [0, 21]]
    assert np.allclose(inst.gt_points[0].numpy(), expected, atol=1e-6)


def test_crop_that_hides_an_instance_drops_it_with_its_points(monkeypatch):
    monkeypatch.setattr("detectron2.data.detection_utils.read_image", lambda *a, **k: _record()["image"])
    mapper = HMRNetDatasetMapper(_cfg(), True)
    mapper.augmentations = T.AugmentationList([_FixedCrop(30, 34)])   # columns 30..64: the square is gone
    inst = mapper(_record())["instances"]
    assert len(inst) == 0 and tuple(inst.gt_points.shape) == (0, 8, 2)


def test_paper_crop_on_keeps_every_point_target_on_its_cropped_mask(monkeypatch):
    """INPUT.HMRNET_AUG crop on (relative size 0.5-1 of the 64 x 64 slice, at integer offsets): over
    40 random crops, every instance's points lie in the image, span its (cropped) box and enclose
    the area of its (cropped) mask (exactly, up to the corners the 400 resampled points cut: the
    square's corners and the crop are on the pixel grid)."""
    monkeypatch.setattr("detectron2.data.detection_utils.read_image", lambda *a, **k: _record()["image"])
    cfg = _cfg(**{"INPUT.HMRNET_AUG.NAMES": "['crop']", "INPUT.HMRNET_AUG.CROP": "(0.5, 0.5)",
                  "INPUT.MASK_FORMAT": "bitmask", "MODEL.HMRNET.NUM_POINTS": "400"})
    mapper = HMRNetDatasetMapper(cfg, True)
    mapper.use_instance_mask = True
    truncated = 0
    for seed in range(40):
        np.random.seed(seed)
        inst = mapper(_record())["instances"]
        if not len(inst):                      # the window missed the square
            continue
        h, w = inst.image_size
        for pts, mask, box in zip(inst.gt_points.numpy().astype(float), inst.gt_masks.tensor.numpy(),
                                  inst.gt_boxes.tensor.numpy()):
            assert (pts >= -1e-6).all() and (pts[:, 0] <= w + 1e-6).all() and (pts[:, 1] <= h + 1e-6).all()
            assert np.allclose([*pts.min(0), *pts.max(0)], box, atol=0.35)      # point spacing <= 0.32 px
            assert signed_area(pts) == pytest.approx(mask.sum(), abs=0.5)
            truncated += int(mask.sum() < 64)
    assert truncated >= 3                      # the crops did cut the square
