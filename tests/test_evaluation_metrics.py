"""Metric values against hand-computed cases (2D, 3D, anisotropic spacing, empty masks), and
against MONAI's own public metric functions on random shapes."""
import math

import numpy as np
import pytest

from organmtl.evaluation import metrics as M


def _px(shape, *points):
    m = np.zeros(shape, bool)
    for p in points:
        m[p] = True
    return m


def _square_with_outlier():
    """Reference: 3x3 square (rows/cols 2-4) whose border is its 8 outer pixels. Prediction: the same
    square plus one isolated pixel at (2, 9), 5 columns from the reference border pixel (2, 4)."""
    gt = np.zeros((8, 12), bool)
    gt[2:5, 2:5] = True
    pred = gt.copy()
    pred[2, 9] = True
    return pred, gt


def test_dice_iou_hand_values():
    gt = np.zeros((4, 4, 4), bool)
    gt[0, 0, :3] = True
    gt[0, 1, :3] = True  # 6 voxels
    pred = np.zeros_like(gt)
    pred[0, 0, :3] = True
    pred[1, 3, 3] = True  # 4 voxels, 3 overlap
    assert M.dice(pred, gt) == pytest.approx(2 * 3 / (4 + 6))
    assert M.iou(pred, gt) == pytest.approx(3 / 7)
    assert isinstance(M.dice(pred, gt), float)


def test_empty_mask_conventions():
    empty = np.zeros((5, 5), bool)
    one = _px((5, 5), (2, 2))
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(one, empty) == 0.0 and M.dice(empty, one) == 0.0
    for a, b in [(empty, empty), (one, empty), (empty, one)]:
        assert math.isnan(M.hausdorff_distance(a, b, (1, 1)))
        assert math.isnan(M.hausdorff_distance(a, b, (1, 1), percentile=95))
        assert math.isnan(M.hausdorff_distance_mean_directed(a, b, (1, 1)))
        assert math.isnan(M.average_surface_distance(a, b, (1, 1)))
    assert M.surface_dice(empty, empty, (1, 1), 1.0) == 1.0
    assert M.surface_dice(one, empty, (1, 1), 1.0) == 0.0
    assert M.surface_dice(empty, one, (1, 1), 1.0) == 0.0


def test_hausdorff_single_points_2d_anisotropic():
    gt, pred = _px((8, 8), (2, 2)), _px((8, 8), (2, 5))
    assert M.hausdorff_distance(pred, gt, (1.0, 1.0)) == pytest.approx(3.0)
    # spacing is in array-axis order: rows 2 mm, columns 0.5 mm -> 3 columns = 1.5 mm
    assert M.hausdorff_distance(pred, gt, (2.0, 0.5)) == pytest.approx(1.5)
    pred_rows = _px((8, 8), (5, 2))
    assert M.hausdorff_distance(pred_rows, gt, (2.0, 0.5)) == pytest.approx(6.0)


def test_hausdorff_single_points_3d_anisotropic():
    gt, pred = _px((6, 7, 3), (1, 1, 1)), _px((6, 7, 3), (4, 5, 1))
    assert M.hausdorff_distance(pred, gt, (3.0, 1.0, 1.0)) == pytest.approx(math.sqrt(9 ** 2 + 4 ** 2))
    assert M.average_surface_distance(pred, gt, (3.0, 1.0, 1.0)) == pytest.approx(math.sqrt(97))
    assert M.volume_mm3(pred, (3.0, 1.0, 1.0)) == pytest.approx(3.0)


def test_both_direction_variants_percentiles_asd_surface_dice():
    pred, gt = _square_with_outlier()
    sp = (1.0, 1.0)
    # P->G: 8 border pixels at 0 and the outlier at 5; G->P: all 8 at 0.
    assert M.directed_hausdorff_distance(pred, gt, sp) == pytest.approx(5.0)
    assert M.directed_hausdorff_distance(gt, pred, sp) == pytest.approx(0.0)
    assert M.hausdorff_distance(pred, gt, sp) == pytest.approx(5.0)             # max of directed
    assert M.hausdorff_distance_mean_directed(pred, gt, sp, 100) == pytest.approx(2.5)  # mean of directed
    # 95th percentile of [0]*8 + [5] with linear interpolation: position 0.95 * 8 = 7.6 -> 0.6 * 5
    assert M.hausdorff_distance(pred, gt, sp, percentile=95) == pytest.approx(3.0)
    assert M.hausdorff_distance_mean_directed(pred, gt, sp, 95) == pytest.approx(1.5)
    assert M.average_surface_distance(pred, gt, sp) == pytest.approx(5 / 17)
    assert M.average_surface_distance(pred, gt, sp, symmetric=False) == pytest.approx(5 / 9)
    assert M.surface_dice(pred, gt, sp, tolerance_mm=2.0) == pytest.approx(16 / 17)
    assert M.surface_dice(pred, gt, sp, tolerance_mm=5.0) == pytest.approx(1.0)
    # anisotropic: columns 0.5 mm -> the outlier is 2.5 mm away
    assert M.hausdorff_distance(pred, gt, (2.0, 0.5)) == pytest.approx(2.5)
    assert M.surface_dice(pred, gt, (2.0, 0.5), tolerance_mm=2.5) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")   # MONAI's own use of a deprecated argument
@pytest.mark.parametrize("shape,spacing", [((24, 20), (0.7, 2.5)), ((10, 16, 14), (3.0, 0.8, 1.1))])
def test_agrees_with_monai_public_metrics(shape, spacing):
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(0)
    gt = binary_dilation(rng.random(shape) > 0.97, iterations=2)
    gt[(0,) * len(shape)] = True       # a mask touching the image border
    pred = binary_dilation(rng.random(shape) > 0.97, iterations=2)
    t = lambda m: torch.from_numpy(m[None, None].astype(np.float32))  # noqa: E731
    for pct in (None, 95):
        ref = compute_hausdorff_distance(t(pred), t(gt), include_background=True, percentile=pct, spacing=spacing)
        assert M.hausdorff_distance(pred, gt, spacing, percentile=pct or 100) == pytest.approx(float(ref), rel=1e-5)
    ref = compute_average_surface_distance(t(pred), t(gt), include_background=True, symmetric=True, spacing=spacing)
    assert M.average_surface_distance(pred, gt, spacing) == pytest.approx(float(ref), rel=1e-5)
    ref = compute_surface_dice(t(pred), t(gt), [2.0], include_background=True, spacing=spacing)
    assert M.surface_dice(pred, gt, spacing, 2.0) == pytest.approx(float(ref), rel=1e-5)


def test_landmarks_and_identification_rates():
    err = M.landmark_errors_mm([[0, 0, 0], [1, 1, 1], [np.nan, 0, 0]], [[3, 4, 0], [1, 1, 1], [0, 0, 0]])
    assert err[0] == pytest.approx(5.0) and err[1] == 0.0 and math.isnan(err[2])
    rates = M.identification_rates([1.0, 3.0, 4.5, 6.0, math.nan])
    assert rates == {"3mm": pytest.approx(2 / 5), "4mm": pytest.approx(2 / 5), "5mm": pytest.approx(3 / 5)}
    assert M.identification_rates([2.0], thresholds=(2.5,)) == {"2.5mm": 1.0}


def test_summary_counts_undefined_separately():
    s = M.summarize([1.0, math.nan, 3.0])
    assert s["n"] == 2 and s["n_undefined"] == 1 and s["mean"] == pytest.approx(2.0)
    assert M.summarize([math.nan])["mean"] is None


def test_volume_and_correlation():
    assert M.volume_mm3(np.ones((2, 3), bool), (0.5, 2.0)) == pytest.approx(6.0)
    assert M.pearson_r([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert math.isnan(M.pearson_r([1], [2]))


def test_bad_input_messages():
    with pytest.raises(ValueError, match="shape"):
        M.dice(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="spacing"):
        M.hausdorff_distance(np.ones((3, 3)), np.ones((3, 3)), (1.0, 1.0, 1.0))
