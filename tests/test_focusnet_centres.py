"""SOL-Net centres of a whole volume (organmtl.nnunet_trainers.focusnet.centres): heatmaps aggregated
over nnU-Net's sliding windows, and the mapping of a preprocessed voxel back to millimetres."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from organmtl.nnunet_trainers.focusnet.centres import (centres_record, preprocessed_to_world,
                                                       sliding_window_heatmaps, write_centres)


class _ImageAsHeatmap(torch.nn.Module):
    """Stands in for FocusNet: the 'heatmap' of every window is the window's image itself."""

    small_labels = [7]

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def segment(self, window):
        return None, window

    def sol(self, feats):
        return feats


@pytest.mark.parametrize("shape", [(12, 30, 27), (5, 9, 9)])           # larger and smaller than the patch
def test_sliding_window_heatmaps_cover_the_volume(shape):
    vol = torch.rand(1, *shape) * 0.5
    peak = tuple(s - 2 for s in shape)
    vol[(0, *peak)] = 1.0
    heat = sliding_window_heatmaps(_ImageAsHeatmap(), vol, (8, 16, 16))
    assert heat.shape == (1, *shape)
    torch.testing.assert_close(heat, vol, atol=1e-5, rtol=1e-5)       # identical windows average to the image
    rec = centres_record(heat, ["Chiasm"], [7], {"shape_after_cropping_and_before_resampling": shape,
                                                 "bbox_used_for_cropping": [[0, s] for s in shape],
                                                 "spacing": [1.0, 1.0, 1.0]},
                         SimpleNamespace(transpose_backward=[0, 1, 2]))
    assert rec["Chiasm"]["voxel_preprocessed"] == list(peak) and rec["Chiasm"]["label"] == 7


def test_preprocessed_voxel_to_world_mm(tmp_path):
    props = {"shape_after_cropping_and_before_resampling": [10, 20, 20],
             "bbox_used_for_cropping": [[2, 12], [3, 23], [4, 24]], "spacing": [2.5, 1.0, 1.0],
             "sitk_stuff": {"spacing": (1.0, 1.0, 2.5), "origin": (10.0, 20.0, 30.0),
                            "direction": (1, 0, 0, 0, 1, 0, 0, 0, 1)}}
    plans = SimpleNamespace(transpose_backward=[0, 1, 2])
    # no resampling: voxel (1, 1, 1) -> image index (z, y, x) = (3, 4, 5)
    np.testing.assert_allclose(preprocessed_to_world((1, 1, 1), props, plans, (10, 20, 20)), [15.0, 24.0, 37.5])
    # resampled to twice the size: voxel centres map back through (v + 0.5) / 2 - 0.5
    np.testing.assert_allclose(preprocessed_to_world((3, 1, 1), props, plans, (20, 40, 40)),
                               [10 + 4.25, 20 + 3.25, 30 + 3.25 * 2.5])
    # a flipped x axis in the direction matrix
    props["sitk_stuff"]["direction"] = (-1, 0, 0, 0, 1, 0, 0, 0, 1)
    np.testing.assert_allclose(preprocessed_to_world((1, 1, 1), props, plans, (10, 20, 20)), [5.0, 24.0, 37.5])
    out = write_centres(tmp_path / "case_centres.json", {"Chiasm": {"world_mm": [1.0, 2.0, 3.0]}})
    assert json.loads(out.read_text())["centres"]["Chiasm"]["world_mm"] == [1.0, 2.0, 3.0]
