"""2D spine phantoms (HMR-Net's data): sagittal MR-like and axial CT-like slices.

Written in the generic ``volumes`` layout (``images/``, ``labels/``, ``mapping.json``) as
single-slice NIfTI files (z = 1), with 0.8 mm pixels.

- ``spine_sag_mr``: vertebral bodies L1..L5 (one class each) and intervertebral discs (one class,
  several instances per slice), MR-like contrast (discs bright, bodies intermediate).
- ``spine_ax_ct``: one vertebra per slice (body + posterior arch), CT-like contrast.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from organmtl.demo_data.shapes import Grid, rounded_box_2d, write

SIZE = 128
SPACING = 0.8
SAG_LABELS = {"background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "disc": 6}
AX_LABELS = {"background": 0, "vertebra": 1}


def sagittal_slice(rng: np.random.Generator):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = rng.normal(180, 12, (SIZE, SIZE)).astype(np.float32)           # soft tissue
    img[:, : int(SIZE * 0.18)] = rng.normal(60, 8, (SIZE, int(SIZE * 0.18)))  # posterior fat pad edge
    lab = np.zeros((SIZE, SIZE), np.uint8)
    x0 = SIZE / 2 + rng.uniform(-6, 6)
    tilt = rng.uniform(-0.15, 0.15)
    height, disc_h = rng.uniform(15, 18), rng.uniform(5, 7)
    y = 8 + rng.uniform(0, 4)
    for level in range(1, 6):
        cy = y + height / 2
        cx = x0 + tilt * (cy - SIZE / 2)
        body = rounded_box_2d(yy, xx, (cy, cx), (height / 2, rng.uniform(13, 16)), 3.0)
        lab[body] = level
        img[body] = rng.normal(320, 15)
        y += height
        if level < 5:
            dc = y + disc_h / 2
            disc = rounded_box_2d(yy, xx, (dc, x0 + tilt * (dc - SIZE / 2)), (disc_h / 2, 13.0), 2.0)
            disc &= lab == 0
            lab[disc] = SAG_LABELS["disc"]
            img[disc] = rng.normal(450, 15)
            y += disc_h
    canal = (np.abs(xx - (x0 - 24)) < 5) & (lab == 0)
    img[canal] = 520.0                                                      # CSF, bright on T2
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 1000).astype(np.int16), lab


def axial_slice(rng: np.random.Generator):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    img = np.full((SIZE, SIZE), -1000.0, np.float32)
    body = ((yy - SIZE / 2) / 58) ** 2 + ((xx - SIZE / 2) / 62) ** 2 <= 1
    img[body] = 40.0
    cy, cx = SIZE / 2 - 8 + rng.uniform(-4, 4), SIZE / 2 + rng.uniform(-4, 4)
    r = rng.uniform(14, 17)
    vb = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
    arch = (((yy - (cy + r + 6)) ** 2 + (xx - cx) ** 2 <= 10 ** 2)
            & ~((yy - (cy + r + 6)) ** 2 + (xx - cx) ** 2 <= 6 ** 2))
    spinous = rounded_box_2d(yy, xx, (cy + r + 20, cx), (7, 2.5), 2)
    lab = (vb | arch | spinous).astype(np.uint8)
    img[lab > 0] = 450.0
    img[vb & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r - 2.5) ** 2)] = 220.0   # cancellous bone
    img += rng.normal(0, 15, img.shape)
    return np.clip(img, -1024, 3071).astype(np.int16), lab


def _write_family(out: Path, name: str, maker, labels: dict, modality: str, n: int, seed: int, stream: int):
    g = Grid((1, SIZE, SIZE), (SPACING, SPACING, 1.0))
    ids = []
    for i in range(n):
        rng = np.random.default_rng([seed, stream, i])
        img, lab = maker(rng)
        case = f"{name}_{i:03d}"
        write(g.image(img[None]), out / "images" / f"{case}_0000.nii.gz")
        write(g.image(lab[None]), out / "labels" / f"{case}.nii.gz")
        ids.append(case)
    (out / "mapping.json").write_text(json.dumps(
        {"name": name, "channel_names": {"0": modality}, "labels": labels}, indent=2) + "\n")
    return ids


def write_spine(out: Path, n_cases: int, seed: int) -> dict[str, list[str]]:
    return {
        "spine_sag_mr": _write_family(out / "spine_sag_mr", "spine_sag_mr", sagittal_slice, SAG_LABELS,
                                      "MR", n_cases, seed, 2),
        "spine_ax_ct": _write_family(out / "spine_ax_ct", "spine_ax_ct", axial_slice, AX_LABELS,
                                     "CT", n_cases, seed, 3),
    }
