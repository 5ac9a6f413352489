"""The paste floor: the SOL-Net peak a case needs before its small organ is pasted, calibrated on
validation (docs/focusnetv2.md "Inference: one paste per case").

The paper pastes at the voxel of the highest location probability and sets no threshold (§3.1.3); every
case it is shown holds every small organ. A case (or a window) without the organ still has a highest
voxel, and SOS-Net then labels whatever tissue lies there. The floor says how high SOL-Net's peak must be
for it to be the organ: on each validation patch the trainer measures, per small organ,

- ``on``: the map's maximum near the organ (within a quarter of the ROI of its ground-truth centre), when the
  patch holds the organ;
- ``off``: the map's maximum where a ROI centred there would miss the organ's centre (farther than half the
  ROI from it), or over the whole patch when the organ is absent;

and the floor is the midpoint between the lowest ``on`` and the highest ``off`` when every ``on`` lies above
every ``off``; when they overlap SOL-Net does not tell the organ from the rest, and the floor is +inf (the
organ is not pasted, S-Net's segmentation stays). Calibrated at the end of every validation epoch from
that epoch's patches (after SOL-Net has trained), stored in the network's ``heat_floor`` buffer, so every
checkpoint carries the floor of its own weights.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from organmtl.nnunet_trainers.focusnet.roi import mask_centre

#: statistics per organ: lowest ``on``, highest ``off``, number of ``on`` and ``off`` measurements
EMPTY = (math.inf, -math.inf, 0.0, 0.0)


def _box(centre, half, shape):
    return tuple(slice(max(int(c) - int(h), 0), min(int(c) + int(h) + 1, int(n))) for c, h, n in zip(centre, half, shape))


def floor_statistics(heat: torch.Tensor, target: torch.Tensor, labels: Sequence[int], roi: Sequence[int]) -> torch.Tensor:
    """``(n_small, 4)`` float64: per organ ``[lowest on, highest off, n on, n off]`` over the samples of one
    batch (``heat`` ``(B, n_small, *spatial)``, ``target`` ``(B, 1, *spatial)`` label maps)."""
    out = torch.tensor([EMPTY] * len(labels), dtype=torch.float64)
    near = [max(1, r // 4) for r in roi]
    far = [max(1, r // 2) for r in roi]
    for b in range(heat.shape[0]):
        for k, lab in enumerate(labels):
            h = heat[b, k].float()
            c = mask_centre(target[b, 0] == lab)
            if c is not None:
                out[k, 0] = min(float(out[k, 0]), float(h[_box(c, near, h.shape)].max()))
                out[k, 2] += 1
                outside = torch.ones_like(h, dtype=torch.bool)
                outside[_box(c, far, h.shape)] = False
                if not outside.any():
                    continue
                off = float(h[outside].max())
            else:
                off = float(h.max())
            out[k, 1] = max(float(out[k, 1]), off)
            out[k, 3] += 1
    return out


def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Statistics of two sets of patches together."""
    return torch.stack([torch.minimum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1]), a[:, 2] + b[:, 2],
                        a[:, 3] + b[:, 3]], 1)


def calibrated_floors(stats: torch.Tensor, current: Sequence[float]) -> tuple[list[float], list[str]]:
    """New floors from :func:`floor_statistics` (``current`` kept where a kind of measurement is missing) and
    one note per organ for the training log."""
    floors, notes = [], []
    for k, (on, off, n_on, n_off) in enumerate(stats.tolist()):
        if n_on == 0 or n_off == 0:
            floors.append(float(current[k]))
            notes.append(f"kept {current[k]:.3f} ({int(n_on)} patches with the organ, {int(n_off)} without a ROI's "
                         f"reach of it: nothing to calibrate on)")
        elif on > off:
            floors.append((on + off) / 2)
            notes.append(f"{floors[-1]:.3f} (peak at the organ >= {on:.3f} in {int(n_on)} patches, elsewhere "
                         f"<= {off:.3f} in {int(n_off)})")
        else:
            floors.append(math.inf)
            notes.append(f"not pasted: SOL-Net does not separate the organ (peak at it down to {on:.3f} in "
                         f"{int(n_on)} patches, elsewhere up to {off:.3f} in {int(n_off)})")
    return floors, notes
