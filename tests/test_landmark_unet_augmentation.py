"""Landmark maps under nnU-Net's own training augmentation (thesis §2.3 targets, landmark-input
U-Net §3.6 maps): they move with the image under the spatial transforms (heatmap argmax within one
voxel of the transformed landmark) and are never touched by the intensity transforms."""
import math

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from organmtl.converters.landmark_encoding import gaussian_heatmap, inverse_manhattan_map
from organmtl.nnunet_trainers.landmarks.transforms import (MergeLandmarkChannels, SplitLandmarkChannels,
                                                           protect_landmark_channels)

N_IMAGE = 2


def _pipeline(patch, mirror_axes, dummy_2d=False, protect=True):
    rotation = (-math.pi / 6, math.pi / 6)
    t = nnUNetTrainer.get_training_transforms(patch, rotation, None, mirror_axes, dummy_2d,
                                              use_mask_for_norm=[False] * (N_IMAGE + 1), is_cascaded=False,
                                              foreground_labels=[1], regions=None, ignore_label=None)
    return protect_landmark_channels(t, N_IMAGE) if protect else t


def _case(shape, landmark, heatmap=True):
    g = torch.Generator().manual_seed(0)
    image = torch.rand((N_IMAGE, *shape), generator=g) * 100
    maps = gaussian_heatmap(shape, (1.0,) * len(shape), [landmark], sigma_mm=3.0) if heatmap \
        else inverse_manhattan_map(shape, None, [landmark])
    seg = torch.zeros((1, *shape), dtype=torch.int16)
    seg[(0, *[slice(c - 1, c + 2) for c in landmark])] = 1       # 3^D cube centred on the landmark
    return torch.cat((image, torch.from_numpy(maps)[None]), 0), seg


def test_pipeline_order_split_first_merge_after_mirror():
    steps = _pipeline((32, 32, 32), (0, 1, 2)).transforms
    assert isinstance(steps[0], SplitLandmarkChannels)
    merge = next(i for i, t in enumerate(steps) if isinstance(t, MergeLandmarkChannels))
    mirror = next(i for i, t in enumerate(steps) if isinstance(t, MirrorTransform))
    assert mirror < merge and all(not isinstance(t, MergeLandmarkChannels) for t in steps[:merge])


@pytest.mark.parametrize("dim", [2, 3])
def test_heatmap_argmax_follows_spatial_augmentation(dim):
    shape, patch = (40,) * dim, (32,) * dim
    landmark = (23, 16, 25)[:dim]
    pipeline = _pipeline(patch, tuple(range(dim)))
    spatial = next(t for t in pipeline.transforms if isinstance(t, SpatialTransform))
    spatial.p_rotation, spatial.p_scaling = 1.0, 1.0            # always rotate and scale
    image, seg = _case(shape, landmark)
    moved = 0
    for seed in range(12):
        torch.manual_seed(seed)
        np.random.seed(seed)
        out = pipeline(image=image.clone(), segmentation=seg.clone())
        assert out["image"].shape == (N_IMAGE + 1, *patch) and "regression_target" not in out
        heat = out["image"][N_IMAGE]
        peak = np.array(np.unravel_index(int(heat.argmax()), patch))
        cube = torch.nonzero(out["segmentation"][0] == 1).float()
        assert len(cube), "landmark left the patch"
        centre = cube.mean(0).numpy()                            # the transformed landmark
        assert np.abs(peak - centre).max() <= 1.0, (seed, peak, centre)
        moved += int(np.abs(centre - (np.array(landmark) - 4)).max() > 1)
    assert moved >= 6                                            # the landmark really moved in most draws


@pytest.mark.parametrize("heatmap", [True, False])
def test_landmark_channel_untouched_by_intensity_augmentation(heatmap):
    shape, patch = (20, 20, 20), (16, 16, 16)
    image, seg = _case(shape, (10, 8, 11), heatmap)

    def forced(protect):
        p = _pipeline(patch, None, protect=protect)
        for t in p.transforms:
            if isinstance(t, RandomTransform):
                t.apply_probability = 1.0                        # every intensity transform fires
            if isinstance(t, SpatialTransform):
                t.p_rotation = t.p_scaling = t.p_elastic_deform = 0.0   # pure centre crop
        return p

    torch.manual_seed(1)
    out = forced(True)(image=image.clone(), segmentation=seg.clone())
    crop = image[(slice(None), *[slice(2, 18)] * 3)]
    torch.testing.assert_close(out["image"][N_IMAGE], crop[N_IMAGE], rtol=0, atol=0)
    assert not torch.allclose(out["image"][:N_IMAGE], crop[:N_IMAGE])      # the image channels were augmented
    torch.manual_seed(1)
    stock = forced(False)(image=image.clone(), segmentation=seg.clone())
    assert not torch.allclose(stock["image"][N_IMAGE], crop[N_IMAGE])      # nnU-Net alone would alter the map


def test_pseudo_2d_augmentation_keeps_landmark_channels():
    # anisotropic 3D configurations use nnU-Net's dummy-2D augmentation (Convert3DTo2D ... 2DTo3D)
    shape, patch = (8, 40, 40), (8, 32, 32)
    image, seg = _case(shape, (4, 21, 17))
    pipeline = _pipeline(patch, (1, 2), dummy_2d=True)
    spatial = next(t for t in pipeline.transforms if isinstance(t, SpatialTransform))
    spatial.p_rotation = 1.0
    torch.manual_seed(3)
    out = pipeline(image=image, segmentation=seg)
    heat = out["image"][N_IMAGE]
    peak = np.array(np.unravel_index(int(heat.argmax()), patch))
    centre = torch.nonzero(out["segmentation"][0] == 1).float().mean(0).numpy()
    assert out["image"].shape == (N_IMAGE + 1, *patch) and np.abs(peak - centre).max() <= 1.0
