"""Small-organ ROIs: centres, Gaussian heatmap targets, fixed-size crops and paste-back
(FocusNetv2 paper §3.1.2-3.1.3).

A ROI is given by its start corner (may be negative or reach past the volume: the crop is then
zero-padded) and its size. ``crop_roi`` followed by ``paste_roi`` restores exactly the voxels of
the ROI that lie inside the volume, at any border.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def roi_start(centre: Sequence[int], roi_size: Sequence[int]) -> tuple[int, ...]:
    """Start corner of the ROI of ``roi_size`` centred on voxel ``centre`` (§3.1.3: the ROI is
    centred at the SOL-Net heatmap argmax). Not clipped to the volume."""
    return tuple(int(c) - int(s) // 2 for c, s in zip(centre, roi_size))


def _overlap(start, size, shape):
    """Per axis: (slice in the volume, slice in the ROI) of the part of the ROI inside the volume."""
    vol, roi = [], []
    for s, n, dim in zip(start, size, shape):
        lo, hi = max(s, 0), min(s + n, dim)
        if hi <= lo:
            return None
        vol.append(slice(lo, hi))
        roi.append(slice(lo - s, hi - s))
    return tuple(vol), tuple(roi)


def crop_roi(volume: torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """ROI of ``size`` at ``start`` from ``volume`` (``(C, *spatial)``); zero outside the volume
    (§3.1.3 "ROI-pool a 3D feature volume around it"). Differentiable."""
    spatial = volume.shape[1:]
    ov = _overlap(start, size, spatial)
    if ov is None:
        return volume.new_zeros((volume.shape[0], *size))
    vol_sl, roi_sl = ov
    inner = volume[(slice(None), *vol_sl)]
    pad = []
    for sl_r, n in zip(reversed(roi_sl), reversed(list(size))):
        pad += [sl_r.start, n - sl_r.stop]
    return F.pad(inner, pad) if any(pad) else inner


def paste_roi(target: torch.Tensor, roi: torch.Tensor, start: Sequence[int]) -> torch.Tensor:
    """Copy of ``target`` (``(C, *spatial)``) with the in-volume part of ``roi`` written at
    ``start`` (§3.1.3: SOS-Net masks are overlaid onto the S-Net result)."""
    out = target.clone()
    ov = _overlap(start, roi.shape[1:], target.shape[1:])
    if ov is None:
        return out
    vol_sl, roi_sl = ov
    out[(slice(None), *vol_sl)] = roi[(slice(None), *roi_sl)]
    return out


def mask_centre(mask: torch.Tensor) -> tuple[int, ...] | None:
    """Rounded centre of mass (voxel indices) of a boolean mask; ``None`` when empty. The organ
    centre that SOL-Net learns to find (§3.1.2)."""
    idx = torch.nonzero(mask, as_tuple=False)
    if idx.numel() == 0:
        return None
    return tuple(int(v) for v in idx.float().mean(0).round().long().tolist())


def gaussian_heatmap(shape: Sequence[int], centre: Sequence[float] | None, sigma: float = 5.0,
                     device=None, dtype=torch.float32) -> torch.Tensor:
    """3D Gaussian exp(-|p - c|^2 / (2 sigma^2)) in voxels, peak 1 at ``centre`` (§3.1.2: standard
    deviation 5 voxels); all zeros when ``centre`` is ``None`` (organ absent)."""
    if centre is None:
        return torch.zeros(tuple(shape), device=device, dtype=dtype)
    grids = torch.meshgrid(*[torch.arange(n, device=device, dtype=dtype) for n in shape], indexing="ij")
    d2 = sum((g - float(c)) ** 2 for g, c in zip(grids, centre))
    return torch.exp(-d2 / (2.0 * sigma ** 2))


def heatmap_peak(heatmap: torch.Tensor) -> tuple[tuple[int, ...], float]:
    """Voxel of the highest value of one heatmap (``(*spatial)``) and that value (§3.1.3: "the voxel
    with the highest location probability value as the small-organ center location")."""
    flat = int(torch.argmax(heatmap).item())
    idx = []
    for n in reversed(heatmap.shape):
        idx.append(flat % n)
        flat //= n
    idx = tuple(reversed(idx))
    return idx, float(heatmap[idx].item())
