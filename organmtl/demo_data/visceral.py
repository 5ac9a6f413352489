"""CT phantoms in the VISCERAL Anatomy3 naming, with renal-pelvis landmarks (the thesis' data).

``Volumes/<id>_1_CT_wb.nii.gz``, ``Segmentations/<id>_1_CT_wb_<RadLexID>_1.nii.gz`` (one binary
mask per structure, named by RadLex id) and ``Landmarks/<id>_1_CT_wb_landmarks_1.fcsv``.
As in the real set, some landmark files are imperfect: every third case carries one landmark
outside the image and one duplicated entry, which converters must report and drop.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from organmtl.demo_data.shapes import Grid, write, write_fcsv

RADLEX = {"58": "liver", "86": "spleen", "29662": "kidney_right", "29663": "kidney_left"}
SHAPE_ZYX = (36, 48, 64)
SPACING_XYZ = (3.0, 3.0, 3.5)


def make_case(rng: np.random.Generator, case_index: int):
    g = Grid(SHAPE_ZYX, SPACING_XYZ, (-96.0, -72.0, -60.0) + rng.uniform(-5, 5, 3))
    cx, cy, cz = g.center + rng.normal(0, 2, 3)

    def j():
        return rng.normal(0, 1.5, 3)

    img = np.full(g.shape, -1000.0, np.float32)
    body = g.ellipsoid((cx, cy, cz), (90, 66, 400))
    img[body] = -80.0                                     # fat
    img[g.ellipsoid((cx, cy, cz), (78, 56, 400))] = 45.0  # muscle / soft tissue
    spine = g.ellipsoid((cx, cy + 38, cz), (12, 12, 400))
    img[spine] = 500.0
    masks = {
        "58": g.ellipsoid(np.array([cx - 36, cy - 4, cz + 34]) + j(), (40, 40, 26)),
        "86": g.ellipsoid(np.array([cx + 50, cy + 18, cz + 36]) + j(), (12, 20, 18)),
        "29662": g.ellipsoid(np.array([cx - 34, cy + 28, cz + 2]) + j(), (11, 13, 22)),
        "29663": g.ellipsoid(np.array([cx + 34, cy + 28, cz + 6]) + j(), (11, 13, 22)),
    }
    hu = {"58": 60.0, "86": 50.0, "29662": 160.0, "29663": 160.0}   # contrast-enhanced kidneys
    taken = spine.copy()
    for rid in RADLEX:
        masks[rid] &= body & ~taken
        taken |= masks[rid]
        img[masks[rid]] = hu[rid]
    landmarks = []
    for rid, side in (("29662", "right"), ("29663", "left")):
        zz, yy, xx = np.nonzero(masks[rid])
        centre = np.array(g.origin) + np.array([xx.mean(), yy.mean(), zz.mean()]) * np.array(g.spacing)
        pelvis = centre + np.array([-8.0 if side == "left" else 8.0, -4.0, 0.0])   # medial hilum
        img[g.ellipsoid(pelvis, (4, 4, 6))] = 5.0                                   # urine in the pelvis
        landmarks.append((f"renal_pelvis_{side}", pelvis))
    if case_index % 3 == 0:
        landmarks.append(("misplaced_outside", np.array([cx, cy, cz + 500.0])))
        landmarks.append(landmarks[0])
    img += rng.normal(0, 10, g.shape)
    return np.clip(img, -1024, 3071).astype(np.int16), masks, g, landmarks


def write_visceral(out: Path, n_cases: int, seed: int) -> list[str]:
    ids = []
    for i in range(n_cases):
        img, masks, g, landmarks = make_case(np.random.default_rng([seed, 5, i]), i)
        pid = f"{10000100 + i}"
        stem = f"{pid}_1_CT_wb"
        write(g.image(img), out / "Volumes" / f"{stem}.nii.gz")
        for rid in RADLEX:
            write(g.image(masks[rid], np.uint8), out / "Segmentations" / f"{stem}_{rid}_1.nii.gz")
        write_fcsv(out / "Landmarks" / f"{stem}_landmarks_1.fcsv", landmarks, "RAS")
        ids.append(pid)
    return ids
