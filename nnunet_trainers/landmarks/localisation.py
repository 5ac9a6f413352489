"""Landmark positions from heatmaps and their error in mm (thesis §2.6: the heatmap RMSE of Eq. 3
"is not a true accuracy measurement"; SPEC §3 asks for the true distance, argmax vs ground truth).

A per-landmark channel holds one landmark: its position is the channel's argmax. A merged channel
(voxel-wise max of all blobs) holds several: the reference positions are its local maxima, and each
predicted position is the predicted argmax within the reference peak's Voronoi cell (the voxels
nearer, in mm, to that peak than to any other).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from organmtl.evaluation.metrics import landmark_errors_mm

# a landmark counts as inside a patch when its target heatmap reaches this value there (peak 1)
IN_PATCH_THRESHOLD = 0.9


def argmax_index(volume: torch.Tensor) -> np.ndarray:
    """Voxel index (array axis order) of the maximum of a 2D/3D tensor."""
    flat = int(torch.argmax(volume).item())
    return np.array(np.unravel_index(flat, tuple(volume.shape)), dtype=float)


def local_peaks(volume: torch.Tensor, threshold: float, max_peaks: int | None = None,
                min_separation_vox: float = 2.0) -> list[np.ndarray]:
    """Local maxima >= ``threshold`` (3^D neighbourhood), strongest first, dropping peaks closer than
    ``min_separation_vox`` voxels to a stronger one (plateaus of tied voxels give one peak)."""
    v = volume.float()[None, None]
    pool = F.max_pool3d if volume.ndim == 3 else F.max_pool2d
    is_max = (v == pool(v, 3, stride=1, padding=1)) & (v >= threshold)
    idx = torch.nonzero(is_max[0, 0]).cpu().numpy().astype(float)
    values = volume.float()[tuple(torch.as_tensor(idx.T, dtype=torch.long))].cpu().numpy() if len(idx) else []
    kept: list[np.ndarray] = []
    for i in np.argsort(-np.asarray(values), kind="stable"):
        if all(np.linalg.norm(idx[i] - k) >= min_separation_vox for k in kept):
            kept.append(idx[i])
            if max_peaks is not None and len(kept) == max_peaks:
                break
    return kept


def voronoi_argmax(pred: torch.Tensor, peaks: list[np.ndarray], spacing) -> list[np.ndarray]:
    """For each reference peak, the argmax of ``pred`` over the voxels nearest (in mm) to that peak."""
    if len(peaks) == 1:
        return [argmax_index(pred)]
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in pred.shape], indexing="ij")
    dist = torch.stack([sum(((g - float(p[a])) * float(spacing[a])) ** 2 for a, g in enumerate(grids)) for p in peaks])
    owner = dist.argmin(0)
    out = []
    for k in range(len(peaks)):
        masked = torch.where(owner == k, pred.float().cpu(), torch.tensor(-torch.inf))
        out.append(argmax_index(masked))
    return out


def patch_landmark_errors(pred: torch.Tensor, target: torch.Tensor, spacing, merged: bool,
                          threshold: float = IN_PATCH_THRESHOLD) -> np.ndarray:
    """Errors (mm) of every landmark inside a batch of patches.

    ``pred``/``target``: (B, C, *spatial) heatmaps; ``spacing``: the configuration's voxel spacing
    (one value per spatial axis). Per-landmark channels: argmax vs argmax where the target reaches
    ``threshold``; merged channels: see the module docstring.
    """
    errors = []
    spacing = np.asarray(spacing, dtype=float)
    for b in range(target.shape[0]):
        for c in range(target.shape[1]):
            t, p = target[b, c].detach().cpu(), pred[b, c].detach().cpu()
            if merged:
                truth = local_peaks(t, threshold)
            else:
                truth = [argmax_index(t)] if float(t.max()) >= threshold else []
            if not truth:
                continue
            found = voronoi_argmax(p, truth, spacing)
            errors.extend(landmark_errors_mm(np.stack(found) * spacing, np.stack(truth) * spacing))
    return np.asarray(errors, dtype=float)
