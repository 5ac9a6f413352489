"""Three small tasks of different modality and anatomy (Moeskops et al.'s setting, in miniature).

Each is written in the generic ``volumes`` layout (``images/``, ``labels/``, ``mapping.json``):

- ``brain_mr``: T1-like brain with CSF (1), grey matter (2) and white matter (3);
- ``breast_mr``: breast MR-like slab with the pectoral muscle (1);
- ``cardiac_cta``: CTA-like heart with thin, bright, tortuous coronary-like vessels (1).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from organmtl.demo_data.shapes import Grid, write

SHAPE_ZYX = (24, 48, 48)


def brain(rng, g: Grid):
    c = g.center + rng.normal(0, 1.5, 3)
    head = g.ellipsoid(c, (22, 22, 20))
    brain_ = g.ellipsoid(c, (19, 19, 17))
    wm = g.ellipsoid(c, (12, 13, 11)) & brain_
    ventricles = g.ellipsoid(c + [0, -2, 1], (3, 6, 4))
    img = np.zeros(g.shape, np.float32)
    lab = np.zeros(g.shape, np.uint8)
    img[head] = 350.0
    img[brain_] = 600.0           # GM
    lab[brain_] = 2
    img[wm] = 800.0               # WM
    lab[wm] = 3
    csf = (head & ~g.ellipsoid(c, (18, 18, 16)) & brain_) | ventricles
    img[csf] = 250.0
    lab[csf] = 1
    return img + rng.normal(0, 25, g.shape), lab


def breast(rng, g: Grid):
    img = np.zeros(g.shape, np.float32)
    lab = np.zeros(g.shape, np.uint8)
    c = g.center
    tissue = g.ellipsoid(c + [0, -18, 0], (22, 30, 30)) & (g.y > c[1] - 22)
    img[tissue] = 450.0
    chest = g.y > c[1] + 6 + 0.15 * (g.x - c[0]) + rng.normal(0, 1)
    muscle = chest & (g.y < c[1] + 14 + 0.15 * (g.x - c[0]))
    img[chest] = 300.0
    img[muscle] = 150.0
    lab[muscle] = 1
    return img + rng.normal(0, 25, g.shape), lab


def cardiac(rng, g: Grid):
    c = g.center + rng.normal(0, 1, 3)
    img = np.full(g.shape, -900.0, np.float32)          # lung
    heart = g.ellipsoid(c, (18, 16, 14))
    img[heart] = 40.0                                   # myocardium
    img[g.ellipsoid(c, (10, 9, 8))] = 300.0             # contrast-filled ventricle
    lab = np.zeros(g.shape, np.uint8)
    for k in range(2):
        phase = rng.uniform(0, 2 * np.pi)
        t = np.linspace(0, np.pi, 8)
        path = np.stack([c[0] + 17 * np.cos(t + phase) * (1 if k else -1),
                         c[1] + 15 * np.sin(t + phase),
                         c[2] - 10 + 20 * t / np.pi], axis=1)
        vessel = g.tube(path, 1.2)
        img[vessel] = 450.0
        lab[vessel] = 1
    return img + rng.normal(0, 20, g.shape), lab


TASKS = {
    "brain_mr": (brain, "T1", (1.0, 1.0, 1.2), {"background": 0, "CSF": 1, "GM": 2, "WM": 3}),
    "breast_mr": (breast, "T1", (1.0, 1.0, 1.5), {"background": 0, "pectoral_muscle": 1}),
    "cardiac_cta": (cardiac, "CT", (0.8, 0.8, 1.0), {"background": 0, "coronary_artery": 1}),
}


def write_multimodal(out: Path, n_cases: int, seed: int) -> dict[str, list[str]]:
    result = {}
    for stream, (task, (maker, modality, spacing, labels)) in enumerate(TASKS.items(), start=10):
        g = Grid(SHAPE_ZYX, spacing)
        ids = []
        for i in range(n_cases):
            img, lab = maker(np.random.default_rng([seed, stream, i]), g)
            case = f"{task}_{i:03d}"
            write(g.image(img, np.int16), out / task / "images" / f"{case}_0000.nii.gz")
            write(g.image(lab), out / task / "labels" / f"{case}.nii.gz")
            ids.append(case)
        (out / task / "mapping.json").write_text(json.dumps(
            {"name": task, "channel_names": {"0": modality}, "labels": labels}, indent=2) + "\n")
        result[task] = ids
    return result
