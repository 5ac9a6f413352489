"""Head-and-neck CT phantom in the PDDCA 1.4.1 layout.

``<case>/img.nrrd`` (int16 HU), ``<case>/structures/<Name>.nrrd`` (uint8 0/1), and
``<case>/points/landmarks.fcsv`` (Slicer markups, RAS). Spacing ~1 x 1 x 2.5 mm, a skull, large
organs with low soft-tissue contrast and the small ones FocusNetv2 is about (an X-shaped chiasm,
thin optic nerves). As in real PDDCA some cases lack a structure file: cases 3, 11, 19, ... have
no ``Submandibular_L`` and cases 7, 15, ... no ``OpticNerve_R`` (the organ is still in the image).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from organmtl.demo_data.shapes import Grid, write, write_fcsv

STRUCTURES = ("BrainStem", "Chiasm", "Mandible", "OpticNerve_L", "OpticNerve_R",
              "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R")
SMALL_ORGANS = ("Chiasm", "OpticNerve_L", "OpticNerve_R")
SHAPE_ZYX = (32, 80, 80)
SPACING_XYZ = (1.0, 1.0, 2.5)
#: volume sizes (z, y, x voxels at SPACING_XYZ) of ``organmtl demo-data --size``: ``demo`` is cheap for
#: tests and the demo; ``pddca`` is a real PDDCA scan's grid (about 100 x 256 x 256 at 1 x 1 x 2.5 mm),
#: for benchmarks at nnU-Net's default plan of real data. The anatomy is the same in mm; the field of
#: view around it grows.
SIZES = {"demo": SHAPE_ZYX, "pddca": (100, 256, 256)}


def missing_structures(case_index: int) -> set[str]:
    """Structures deliberately left unannotated in case ``case_index`` (mimics real PDDCA gaps)."""
    if case_index % 8 == 3:
        return {"Submandibular_L"}
    if case_index % 8 == 7:
        return {"OpticNerve_R"}
    return set()


def make_case(rng: np.random.Generator, case_index: int, shape_zyx=SHAPE_ZYX):
    """Return (image int16 array, {structure: mask}, grid, [(landmark, point_lps)]) on a ``shape_zyx``
    grid centred (up to +-5 mm) on the head."""
    extent_xyz = [n * s for n, s in zip(reversed(shape_zyx), SPACING_XYZ)]
    origin = tuple(-e / 2 + rng.uniform(-5, 5) for e in extent_xyz)
    g = Grid(tuple(shape_zyx), SPACING_XYZ, origin)
    cx, cy, cz = g.center + rng.normal(0, 1.5, 3)

    def j(sd=1.2):
        return rng.normal(0, sd, 3)

    def s():
        return rng.uniform(0.9, 1.1)

    img = np.full(g.shape, -1000.0, dtype=np.float32)
    head = g.ellipsoid((cx, cy, cz), (36, 38, 60))
    inner = g.ellipsoid((cx, cy, cz), (33, 35, 57))
    img[head] = 40.0                                  # soft tissue / brain
    img[head & ~inner & (g.z > cz - 5)] = 1000.0      # skull vault (upper part only)
    eye_c = {side: np.array([cx + sgn * 14, cy - 27, cz + 12]) for side, sgn in (("L", 1), ("R", -1))}
    for side, c in eye_c.items():
        img[g.ellipsoid(c + np.array([0, 7, 0]), (9, 14, 7))] = -90.0   # orbital fat
        img[g.ellipsoid(c, (6, 6, 6))] = 15.0                           # eye globe

    masks: dict[str, np.ndarray] = {}
    masks["BrainStem"] = g.ellipsoid(np.array([cx, cy + 10, cz + 2]) + j(), (6 * s(), 7 * s(), 18 * s()))
    cross = np.array([cx, cy - 6, cz + 12]) + j(0.8)
    arm = 5.0 * s()
    masks["Chiasm"] = (g.tube([cross + [-arm, -3, 0], cross + [arm, 3, 0]], 1.5)
                       | g.tube([cross + [arm, -3, 0], cross + [-arm, 3, 0]], 1.5))
    for side, sgn in (("L", 1), ("R", -1)):
        start = eye_c[side] + [0, 6, 0]
        masks[f"OpticNerve_{side}"] = g.tube([start, cross + [sgn * arm, -3, 0]], 1.5) & ~masks["Chiasm"]
    mz = cz - 24 + rng.normal(0, 1)
    u = [(cx - 27, cy + 4, mz + 16), (cx - 27, cy + 2, mz), (cx - 22, cy - 22, mz), (cx, cy - 31, mz),
         (cx + 22, cy - 22, mz), (cx + 27, cy + 2, mz), (cx + 27, cy + 4, mz + 16)]
    masks["Mandible"] = g.tube(np.array(u) + j(0.8), 3.5)
    for side, sgn in (("L", 1), ("R", -1)):
        masks[f"Parotid_{side}"] = g.ellipsoid(np.array([cx + sgn * 24, cy + 14, cz - 10]) + j(),
                                               (6 * s(), 9 * s(), 11 * s())) & ~masks["Mandible"]
        masks[f"Submandibular_{side}"] = g.ellipsoid(np.array([cx + sgn * 15, cy - 14, cz - 30]) + j(),
                                                     (5 * s(), 6 * s(), 5 * s())) & ~masks["Mandible"]
    # Soft-tissue contrast of 35-50 HU against 12 HU noise: low, as in CT, yet learnable by a
    # tiny network in a few minutes of CPU training.
    intensity = {"BrainStem": 80.0, "Chiasm": 85.0, "Mandible": 900.0, "OpticNerve_L": 85.0,
                 "OpticNerve_R": 85.0, "Parotid_L": -10.0, "Parotid_R": -10.0,
                 "Submandibular_L": 90.0, "Submandibular_R": 90.0}
    for name in STRUCTURES:
        masks[name] &= head
        img[masks[name]] = intensity[name]
    img += rng.normal(0, 12.0, g.shape).astype(np.float32)
    landmarks = [("chiasm", cross), ("eye_L", eye_c["L"]), ("eye_R", eye_c["R"]),
                 ("brainstem_top", np.array([cx, cy + 10, cz + 20])), ("menton", np.array(u[3]))]
    return np.clip(img, -1024, 3071).astype(np.int16), masks, g, landmarks


def write_han(out: Path, n_cases: int, seed: int, first_index: int = 0, with_missing: bool = True,
              size: str = "demo") -> list[str]:
    """Write ``n_cases`` PDDCA-style cases (ids from ``first_index``) under ``out``; return the ids.
    ``with_missing=False`` writes every structure file (a fully annotated test set); ``size`` is a
    key of :data:`SIZES`."""
    if size not in SIZES:
        raise ValueError(f"unknown head-and-neck phantom size {size!r}; choose from {', '.join(SIZES)}")
    ids = []
    for i in range(first_index, first_index + n_cases):
        rng = np.random.default_rng([seed, 1, i])
        img, masks, g, landmarks = make_case(rng, i, SIZES[size])
        case = f"0522c{i:04d}"
        write(g.image(img), out / case / "img.nrrd")
        for name in STRUCTURES:
            if not (with_missing and name in missing_structures(i)):
                write(g.image(masks[name], np.uint8), out / case / "structures" / f"{name}.nrrd")
        write_fcsv(out / case / "points" / "landmarks.fcsv", landmarks, "RAS")
        ids.append(case)
    return ids
