"""Keep landmark-map channels aligned with the image under nnU-Net's spatial augmentation and out
of its intensity augmentation (thesis §2.3 targets; landmark-input U-Net §3.6 maps).

batchgeneratorsv2 transforms know a ``regression_target`` entry: the spatial transforms
(``SpatialTransform``, ``MirrorTransform``, the pseudo-2D conversions) resample it with the image's
own grid (linear interpolation), while ``ImageOnlyTransform`` subclasses (noise, blur, brightness,
contrast, gamma, low-resolution simulation) leave it alone. :func:`protect_landmark_channels`
therefore wraps nnU-Net's own pipeline: :class:`SplitLandmarkChannels` moves the map channels from
``image`` to ``regression_target`` first, and :class:`MergeLandmarkChannels` appends them to the image
again just before the first transform that does not carry a regression target (e.g. nnU-Net's
``MaskImageTransform``), so the data loader, which collects only ``image`` and ``segmentation``,
delivers them as the last channels of ``batch['data']``.
"""
from __future__ import annotations

import torch
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

# transforms that move a regression target with the image (spatial) or never touch it (image only)
_CARRIES_REGRESSION_TARGET = (SpatialTransform, MirrorTransform, Convert3DTo2DTransform, Convert2DTo3DTransform,
                              ImageOnlyTransform)


class SplitLandmarkChannels(BasicTransform):
    """Move image channels ``n_image:`` (the landmark maps) to ``regression_target``."""

    def __init__(self, n_image: int):
        super().__init__()
        self.n_image = n_image

    def apply(self, data_dict, **params):
        image = data_dict["image"]
        data_dict["regression_target"] = image[self.n_image:]
        data_dict["image"] = image[: self.n_image]
        return data_dict


class MergeLandmarkChannels(BasicTransform):
    """Append ``regression_target`` (the landmark maps) to the image channels again."""

    def apply(self, data_dict, **params):
        maps = data_dict.pop("regression_target")
        data_dict["image"] = torch.cat((data_dict["image"], maps.to(data_dict["image"].dtype)), 0)
        return data_dict


def _carries_regression_target(t: BasicTransform) -> bool:
    if isinstance(t, RandomTransform):
        return _carries_regression_target(t.transform)
    return isinstance(t, _CARRIES_REGRESSION_TARGET)


def protect_landmark_channels(transforms: ComposeTransforms, n_image: int) -> ComposeTransforms:
    """nnU-Net's training pipeline with the landmark channels split off before it and merged back
    before the first transform that would drop a ``regression_target``."""
    steps = list(transforms.transforms)
    merge_at = next((i for i, t in enumerate(steps) if not _carries_regression_target(t)), len(steps))
    steps = [SplitLandmarkChannels(n_image), *steps[:merge_at], MergeLandmarkChannels(), *steps[merge_at:]]
    return ComposeTransforms(steps)
