"""Shared evaluation metrics: overlap (Dice, IoU), surface distances in millimetres (Hausdorff,
HD95, average surface distance, surface Dice), volumes, landmark errors and identification rates.

numpy arrays in, Python floats out. Conventions (documented in docs/evaluation.md):

* ``spacing`` is given in the order of the array axes (for a SimpleITK array ``(z, y, x)`` that is
  ``image.GetSpacing()[::-1]``); 2D and 3D masks, any anisotropy.
* Overlap: both masks empty -> Dice = IoU = 1.0 (the structure is correctly absent).
* Distances (Hausdorff, ASD): undefined (``nan``) when one or both masks are empty. Such cases are
  never averaged in: :func:`summarize` counts them separately (``n_undefined``).
* Surface Dice: both empty -> 1.0, exactly one empty -> 0.0.

Counting of TP/FP/FN is nnU-Net's own (``nnunetv2.evaluation.evaluate_predictions``); mask borders
and border-to-border distances are MONAI's (``monai.metrics.utils.get_edge_surface_distance``:
border = mask XOR its binary erosion, exact Euclidean distances scaled by the spacing). Nothing here
writes its own distance transform.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "SurfaceDistances", "surface_distances", "dice", "iou", "hausdorff_distance",
    "directed_hausdorff_distance", "hausdorff_distance_mean_directed", "average_surface_distance",
    "surface_dice", "volume_mm3", "pearson_r", "landmark_errors_mm", "identification_rates",
    "summarize",
]


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    if pred.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got {pred.ndim}D with shape {pred.shape}")
    return pred, gt


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in (spacing if np.ndim(spacing) else [spacing] * ndim))
    if len(sp) != ndim:
        raise ValueError(f"spacing {tuple(sp)} has {len(sp)} values for a {ndim}D mask (give one per array axis)")
    if any(not (s > 0) for s in sp):
        raise ValueError(f"spacing {sp} must be positive")
    return sp


def _counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = compute_tp_fp_fn_tn(gt, pred)
    return int(tp), int(fp), int(fn)


def dice(pred, gt) -> float:
    """Dice similarity coefficient 2|P∩G| / (|P|+|G|) of two boolean masks; both empty -> 1.0.

    TP/FP/FN are counted by nnU-Net's ``compute_tp_fp_fn_tn`` (nnU-Net reports ``nan`` for the
    both-empty case; we report 1.0, see module docstring)."""
    tp, fp, fn = _counts(*_pair(pred, gt))
    return 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2 * tp + fp + fn)


def iou(pred, gt) -> float:
    """Intersection over union (Jaccard) |P∩G| / |P∪G|; both empty -> 1.0."""
    tp, fp, fn = _counts(*_pair(pred, gt))
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


@dataclass(frozen=True)
class SurfaceDistances:
    """Distances in mm from every border voxel of one mask to the nearest border voxel of the other.

    Computed once per (case, structure) and reduced to every distance metric, so the evaluation does
    not recompute borders per metric."""

    pred_to_gt: np.ndarray
    gt_to_pred: np.ndarray

    def directed(self, percentile: float = 100.0, reverse: bool = False) -> float:
        """Directed Hausdorff distance (``percentile`` of the one-way distances; 100 = maximum),
        prediction -> reference, or reference -> prediction with ``reverse``."""
        d = self.gt_to_pred if reverse else self.pred_to_gt
        return float(np.percentile(d, percentile)) if d.size else math.nan

    def hausdorff(self, percentile: float = 100.0) -> float:
        """"Max of directed": max(directed P->G, directed G->P), each at ``percentile``. This is the
        usual HD / HD95 (MONAI's ``compute_hausdorff_distance`` with ``directed=False``)."""
        return max(self.directed(percentile), self.directed(percentile, reverse=True))

    def hausdorff_mean_directed(self, percentile: float = 95.0) -> float:
        """"Mean of directed": (directed P->G + directed G->P) / 2, each at ``percentile``; the
        95HD of FocusNetv2 (Gao et al., 2021, Sec. 4.2 evaluation metrics)."""
        return 0.5 * (self.directed(percentile) + self.directed(percentile, reverse=True))

    def average(self, symmetric: bool = True) -> float:
        """Average surface distance. Symmetric (default): mean over the border voxels of both masks
        (MONAI's ``compute_average_surface_distance(symmetric=True)``); otherwise mean P->G."""
        d = np.concatenate([self.pred_to_gt, self.gt_to_pred]) if symmetric else self.pred_to_gt
        return float(d.mean()) if d.size else math.nan

    def surface_dice(self, tolerance_mm: float) -> float:
        """Normalised surface Dice at ``tolerance_mm`` (Nikolov et al., 2021): border voxels of
        either mask within the tolerance of the other border, over all border voxels."""
        n = self.pred_to_gt.size + self.gt_to_pred.size
        if n == 0:
            return math.nan
        ok = int((self.pred_to_gt <= tolerance_mm).sum()) + int((self.gt_to_pred <= tolerance_mm).sum())
        return ok / n


def surface_distances(pred, gt, spacing) -> SurfaceDistances | None:
    """Border-to-border distances (mm) of two masks by MONAI's ``get_edge_surface_distance``
    (exact Euclidean, anisotropic ``spacing`` in array-axis order); ``None`` when a mask is empty."""
    pred, gt = _pair(pred, gt)
    sp = _spacing(spacing, pred.ndim)
    if not pred.any() or not gt.any():
        return None
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    # MONAI crops to the union's bounding box itself; doing that first in numpy (same 1-voxel
    # margin) is much faster on large volumes and leaves the borders and distances unchanged.
    box = _union_box(pred, gt)
    pred, gt = pred[box], gt[box]
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        _, dists, _ = get_edge_surface_distance(torch.from_numpy(pred), torch.from_numpy(gt), spacing=sp,
                                                symmetric=True, warn_empty=False)
    p2g, g2p = (np.asarray(d.detach().cpu().numpy(), dtype=np.float64).ravel() for d in dists)
    return SurfaceDistances(p2g, g2p)


def _union_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    return tuple(box)


def hausdorff_distance(pred, gt, spacing, percentile: float = 100.0) -> float:
    """Hausdorff distance in mm, "max of directed" variant: max of the two directed ``percentile``
    distances (percentile=95 gives the usual HD95). ``nan`` when one or both masks are empty."""
    sd = surface_distances(pred, gt, spacing)
    return math.nan if sd is None else sd.hausdorff(percentile)


def directed_hausdorff_distance(pred, gt, spacing, percentile: float = 100.0) -> float:
    """Directed Hausdorff distance prediction -> reference in mm (``percentile`` of the distances from
    prediction border voxels to the reference border). ``nan`` when a mask is empty."""
    sd = surface_distances(pred, gt, spacing)
    return math.nan if sd is None else sd.directed(percentile)


def hausdorff_distance_mean_directed(pred, gt, spacing, percentile: float = 95.0) -> float:
    """Hausdorff distance in mm, "mean of directed" variant: mean of the two directed ``percentile``
    distances, as FocusNetv2 (Gao et al., 2021) reports its 95HD. ``nan`` when a mask is empty."""
    sd = surface_distances(pred, gt, spacing)
    return math.nan if sd is None else sd.hausdorff_mean_directed(percentile)


def average_surface_distance(pred, gt, spacing, symmetric: bool = True) -> float:
    """Average (symmetric) surface distance in mm; ``nan`` when one or both masks are empty."""
    sd = surface_distances(pred, gt, spacing)
    return math.nan if sd is None else sd.average(symmetric)


def surface_dice(pred, gt, spacing, tolerance_mm: float) -> float:
    """Normalised surface Dice at ``tolerance_mm``; both empty -> 1.0, exactly one empty -> 0.0."""
    p, g = _pair(pred, gt)
    sd = surface_distances(p, g, spacing)
    if sd is None:
        return 1.0 if not p.any() and not g.any() else 0.0
    return sd.surface_dice(tolerance_mm)


def volume_mm3(mask, spacing) -> float:
    """Volume (3D, mm^3) or area (2D, mm^2) of a mask: voxel count x voxel size."""
    m = np.asarray(mask).astype(bool, copy=False)
    return float(m.sum()) * float(np.prod(_spacing(spacing, m.ndim)))


def pearson_r(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (scipy) of paired values, e.g. predicted vs reference volumes across
    cases; ``nan`` with fewer than 2 finite pairs or a constant input."""
    from scipy.stats import pearsonr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(pearsonr(x, y)[0])


def landmark_errors_mm(pred_mm, gt_mm) -> np.ndarray:
    """Euclidean error (mm) per landmark between predicted and reference physical positions, arrays
    of shape (N, D); a landmark missing (nan) in either gives a nan error (not identified)."""
    p, g = np.asarray(pred_mm, dtype=float), np.asarray(gt_mm, dtype=float)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"landmark arrays must both be (N, D); got {p.shape} and {g.shape}")
    return np.linalg.norm(p - g, axis=1)


def identification_rates(errors_mm: Iterable[float], thresholds=(3, 4, 5)) -> dict:
    """Fraction of landmarks whose error is <= each threshold (mm), keyed ``"3mm"``, ``"4mm"``...
    Missing landmarks (nan error) count as not identified; no landmarks -> nan rates."""
    e = np.asarray(list(errors_mm), dtype=float)
    out = {}
    for t in thresholds:
        ok = np.isfinite(e) & (e <= t)
        out[f"{float(t):g}mm"] = float(ok.sum() / e.size) if e.size else math.nan
    return out


def summarize(values: Iterable[float]) -> dict:
    """Mean/std/median/min/max over the defined (finite) values; undefined ones (nan, e.g. HD of an
    empty mask) are counted in ``n_undefined`` and never averaged in."""
    v = np.asarray([float(x) for x in values], dtype=float)
    ok = v[np.isfinite(v)]
    stats = {"n": int(ok.size), "n_undefined": int(v.size - ok.size)}
    if ok.size:
        stats.update(mean=float(ok.mean()), std=float(ok.std()), median=float(np.median(ok)),
                     min=float(ok.min()), max=float(ok.max()))
    else:
        stats.update(mean=None, std=None, median=None, min=None, max=None)
    return stats
