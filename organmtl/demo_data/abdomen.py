"""Abdominal / whole-body MR-like phantoms with two channels (fat, water).

The landmark-input thesis' data (landmark-input U-Net thesis, §3; docs/landmark_unets.md): two MR channels, organ
masks and the two hip-joint centres as a text file of three voxel coordinates (x y z, one landmark
per line). Written in the generic ``volumes`` layout so ``organmtl convert volumes`` reads it::

    images/<case>_0000.nii.gz (fat)  images/<case>_0001.nii.gz (water)
    labels/<case>.nii.gz             landmarks/<case>.txt (hip_left, hip_right)
    mapping.json                     (channel names, label values, landmark names)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from organmtl.demo_data.shapes import Grid, write

HIP_LANDMARKS = ("hip_left", "hip_right")
ORGANS = ("liver", "kidney_left", "kidney_right", "spleen", "bladder", "pancreas")
SHAPE_ZYX = (40, 48, 64)
SPACING_XYZ = (3.5, 3.5, 4.0)
WATER = {"liver": 300, "kidney_left": 380, "kidney_right": 380, "spleen": 350, "bladder": 650,
         "pancreas": 270}


def make_case(rng: np.random.Generator):
    g = Grid(SHAPE_ZYX, SPACING_XYZ, (-110.0, -84.0, -80.0) + rng.uniform(-5, 5, 3))
    cx, cy, cz = g.center + rng.normal(0, 2, 3)

    def s():
        return rng.uniform(0.9, 1.1)

    def j():
        return rng.normal(0, 2.0, 3)

    body = g.ellipsoid((cx, cy, cz), (100, 76, 400))
    visceral = g.ellipsoid((cx, cy, cz), (88, 64, 400))
    fat = np.zeros(g.shape, np.float32)
    water = np.zeros(g.shape, np.float32)
    fat[body] = 600.0                    # subcutaneous fat: bright in fat, dark in water
    water[body] = 40.0
    fat[visceral] = 150.0                # muscle/visceral mixture
    water[visceral] = 200.0
    masks = {
        "liver": g.ellipsoid(np.array([cx - 40, cy - 5, cz + 45]) + j(), (45 * s(), 45 * s(), 30 * s())),
        "spleen": g.ellipsoid(np.array([cx + 58, cy + 20, cz + 50]) + j(), (14 * s(), 24 * s(), 20 * s())),
        "kidney_left": g.ellipsoid(np.array([cx + 36, cy + 32, cz + 15]) + j(), (12 * s(), 14 * s(), 24 * s())),
        "kidney_right": g.ellipsoid(np.array([cx - 36, cy + 32, cz + 10]) + j(), (12 * s(), 14 * s(), 24 * s())),
        "pancreas": g.tube(np.array([[cx - 12, cy + 8, cz + 22], [cx + 40, cy + 16, cz + 30]]) + j(), 6.5),
        "bladder": g.ellipsoid(np.array([cx, cy - 18, cz - 52]) + j(), (24 * s(), 18 * s(), 16 * s())),
    }
    taken = np.zeros(g.shape, bool)
    for organ in ORGANS:
        masks[organ] &= visceral & ~taken
        taken |= masks[organ]
        water[masks[organ]] = WATER[organ]
        fat[masks[organ]] = 40.0
    hips = []
    for sgn in (1, -1):                  # left hip (+x in LPS), then right
        c = np.array([cx + sgn * 48, cy + 5, cz - 66]) + rng.normal(0, 1.5, 3)
        head = g.ellipsoid(c, (12, 12, 12))
        fat[head], water[head] = 350.0, 90.0       # femoral head: fatty marrow
        hips.append(g.to_voxel(c))
    fat += rng.normal(0, 20, g.shape)
    water += rng.normal(0, 20, g.shape)
    return np.clip(fat, 0, None), np.clip(water, 0, None), masks, g, hips


def write_abdomen(out: Path, n_cases: int, seed: int) -> list[str]:
    ids = []
    for i in range(n_cases):
        fat, water, masks, g, hips = make_case(np.random.default_rng([seed, 4, i]))
        case = f"wb{i:03d}"
        write(g.image(fat, np.int16), out / "images" / f"{case}_0000.nii.gz")
        write(g.image(water, np.int16), out / "images" / f"{case}_0001.nii.gz")
        labels = np.zeros(g.shape, np.uint8)
        for value, organ in enumerate(ORGANS, start=1):
            labels[masks[organ]] = value
        write(g.image(labels, np.uint8), out / "labels" / f"{case}.nii.gz")
        (out / "landmarks").mkdir(parents=True, exist_ok=True)
        (out / "landmarks" / f"{case}.txt").write_text(
            "".join(f"{int(round(v[0]))} {int(round(v[1]))} {int(round(v[2]))}\n" for v in hips))
        ids.append(case)
    (out / "mapping.json").write_text(json.dumps({
        "channel_names": {"0": "fat", "1": "water"},
        "labels": {"background": 0, **{organ: v for v, organ in enumerate(ORGANS, start=1)}},
        "landmark_names": list(HIP_LANDMARKS)}, indent=2) + "\n")
    return ids
