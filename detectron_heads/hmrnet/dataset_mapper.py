"""Data side of HMR-Net: a DatasetMapper that carries each instance's contour points (§2.4)
through Detectron2's augmentations, and the paper's augmentation list (§3.1: flip, rotate,
translate, scale, crop, Gaussian blur) built from ``INPUT.HMRNET_AUG``."""
from __future__ import annotations

import copy

import numpy as np
import torch
from pycocotools import mask as mask_util
from scipy import ndimage

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform

from organmtl.geometry import canonical_contour, resample_closed, signed_area

AUGMENTATIONS = ("flip", "rotate", "translate_scale", "crop", "blur")
# An instance whose contour keeps less area than this (px^2) inside the augmented image is dropped.
MIN_VISIBLE_AREA = 1e-3


class GaussianBlurTransform(Transform):
    """Gaussian blur of the image with ``sigma`` pixels (scipy); geometry is unchanged."""

    def __init__(self, sigma: float):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        sig = (self.sigma, self.sigma) + (0,) * (img.ndim - 2)
        out = ndimage.gaussian_filter(img.astype(np.float32), sigma=sig)
        if img.dtype == np.uint8:
            return np.clip(np.round(out), 0, 255).astype(np.uint8)
        return out.astype(img.dtype)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> Transform:
        return NoOpTransform()


class RandomGaussianBlur(T.Augmentation):
    """With probability ``prob`` blur by a sigma drawn uniformly from ``sigma_range`` (§3.1)."""

    def __init__(self, sigma_range=(0.1, 1.0), prob: float = 0.5):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        if self._rand_range() >= self.prob:
            return NoOpTransform()
        return GaussianBlurTransform(float(self._rand_range(*self.sigma_range)))


def build_hmrnet_augmentation(cfg, is_train: bool) -> list:
    """Detectron2's resize (``INPUT.MIN_SIZE_*``) followed, in training, by the augmentations named
    in ``INPUT.HMRNET_AUG.NAMES`` (§3.1), in the order of :data:`AUGMENTATIONS`. An empty list gives
    Detectron2's default (resize + ``INPUT.RANDOM_FLIP``)."""
    a = cfg.INPUT.HMRNET_AUG
    if not is_train or not a.NAMES:
        return utils.build_augmentation(cfg, is_train)
    unknown = [n for n in a.NAMES if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"INPUT.HMRNET_AUG.NAMES: unknown augmentation(s) {unknown}; choose from {AUGMENTATIONS}")
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    names = set(a.NAMES)
    if "flip" in names:
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    if "rotate" in names:
        augs.append(T.RandomRotation([-a.ROTATE_DEG, a.ROTATE_DEG], expand=False))
    if "translate_scale" in names:
        augs.append(T.RandomExtent(scale_range=tuple(a.SCALE), shift_range=(a.SHIFT, a.SHIFT)))
    if "crop" in names:
        augs.append(T.RandomCrop("relative_range", tuple(a.CROP)))
    if "blur" in names:
        augs.append(RandomGaussianBlur(tuple(a.BLUR_SIGMA), a.BLUR_PROB))
    return augs


def clip_to_window(xy: np.ndarray, width: float, height: float) -> np.ndarray:
    """The closed polygon ``xy`` (N, 2) clipped to the image window [0, width] x [0, height]
    (Sutherland-Hodgman, one window edge at a time), so it describes the part the image still
    shows, the part Detectron2 keeps of the instance's mask and box after a crop, rotation or shift
    pushed the rest outside. A polygon the window cuts into several pieces comes back as one
    polygon whose pieces are joined by zero-area runs along the window edge. -> (M, 2), M = 0 when
    nothing is inside."""
    poly = np.asarray(xy, dtype=np.float64)
    for axis, bound, keep_below in ((0, 0.0, False), (0, float(width), True),
                                    (1, 0.0, False), (1, float(height), True)):
        if not len(poly):
            break
        d = poly[:, axis] - bound
        inside = d <= 0 if keep_below else d >= 0
        out = []
        for i in range(len(poly)):
            j = (i + 1) % len(poly)
            if inside[i]:
                out.append(poly[i])
            if inside[i] != inside[j]:                      # the edge i -> j crosses the window edge
                t = d[i] / (d[i] - d[j])
                out.append(poly[i] + t * (poly[j] - poly[i]))
        poly = np.asarray(out).reshape(-1, 2)
    if len(poly):
        keep = np.any(np.abs(poly - np.roll(poly, 1, axis=0)) > 1e-9, axis=1)   # repeated vertices
        poly = poly[keep] if keep.any() else poly[:1]
    return poly


def transform_contour_points(points, transforms: T.TransformList, num_points: int = 0,
                             image_size: tuple[int, int] | None = None) -> np.ndarray | None:
    """Apply ``transforms`` to flat ``[x0, y0, ...]`` contour points and restore the canonical order
    of organmtl's COCO files (:func:`organmtl.geometry.canonical_contour`: clockwise on screen, start
    at the top crossing of the vertical line through the box centre): a horizontal flip reverses the
    orientation, which is undone here, and rotations move the start, which is re-found. With
    ``image_size`` (h, w) of the transformed image the contour is first clipped to it
    (:func:`clip_to_window`): an instance that a crop, rotation or shift truncated gets the contour of
    its visible part, as its mask and box do, and ``None`` is returned when no area of it is left.
    The contour is then resampled from its start to ``num_points`` evenly spaced points (> 0) or to
    as many as it had. -> (p, 2) or None."""
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    xy = transforms.apply_coords(xy.copy())
    if image_size is not None:
        xy = clip_to_window(xy, image_size[1], image_size[0])
        if len(xy) < 3 or abs(signed_area(xy)) < MIN_VISIBLE_AREA:
            return None
    return resample_closed(canonical_contour(xy), num_points or n)


def _has_shape_head(cfg) -> bool:
    from detectron2.modeling import ROI_HEADS_REGISTRY

    from organmtl.detectron_heads.hmrnet.roi_heads import HMRNetROIHeads

    return issubclass(ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME), HMRNetROIHeads)


class HMRNetDatasetMapper(DatasetMapper):
    """Detectron2's DatasetMapper plus ``instances.gt_points`` (R, p, 2): each annotation's
    ``contour_points`` transformed with the image and clipped to it (:func:`transform_contour_points`;
    an instance with no area left in the image is dropped). Augmentations
    come from :func:`build_hmrnet_augmentation`; boxes are recomputed from the polygons after a
    rotation (Detectron2 would otherwise enlarge them)."""

    @configurable
    def __init__(self, is_train: bool = True, *, num_points: int = 0, **kwargs):
        super().__init__(is_train, **kwargs)
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = build_hmrnet_augmentation(cfg, is_train)
        shape_on = "HMRNET" in cfg.MODEL and cfg.MODEL.HMRNET.SHAPE_ON and _has_shape_head(cfg)
        ret["num_points"] = cfg.MODEL.HMRNET.NUM_POINTS if shape_on else 0
        if is_train and "rotate" in getattr(cfg.INPUT, "HMRNET_AUG", {"NAMES": []})["NAMES"]:
            ret["use_instance_mask"] = True
            ret["recompute_boxes"] = True
        return ret

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        annos, points = [], []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0):
                continue
            obj = copy.copy(obj)
            if self.num_points:
                if "contour_points" not in obj:
                    raise ValueError(f"{dataset_dict.get('file_name')}: annotation without contour_points "
                                     "(write the COCO folder with 'organmtl convert ... --to coco')")
                pts = transform_contour_points(obj["contour_points"], transforms, self.num_points, image_shape)
                if pts is None:                     # augmented out of the image: no shape to learn
                    continue
                points.append(pts)
            if not self.use_instance_mask:
                obj.pop("segmentation", None)
            elif self.instance_mask_format == "bitmask" and isinstance(obj.get("segmentation"), list):
                # as RLE, so Detectron2 transforms it as an image (no shapely polygon clipping)
                h, w = dataset_dict["height"], dataset_dict["width"]
                obj["segmentation"] = mask_util.merge(mask_util.frPyObjects(obj["segmentation"], h, w))
            if not self.use_keypoint:
                obj.pop("keypoints", None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape,
                                                              keypoint_hflip_indices=self.keypoint_hflip_indices))
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=self.instance_mask_format)
        if self.num_points:
            instances.gt_points = torch.as_tensor(np.stack(points) if points else
                                                  np.zeros((0, self.num_points, 2)), dtype=torch.float32)
        if self.recompute_boxes:
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
