"""2D spine phantoms (HMR-Net's data): sagittal MR-like and axial CT-like slices.

Written in the generic ``volumes`` layout (``images/``, ``labels/``, ``mapping.json``) as
single-slice NIfTI files (z = 1), with 0.8 mm pixels.

- ``spine_sag_mr``: vertebral bodies L1..L5 (one class each) and intervertebral discs (one class,
  several instances per slice), MR-like contrast (discs bright, bodies intermediate).
- ``spine_ax_ct``: one vertebra per slice (body + posterior arch), CT-like contrast.

Opt-in artefact cases (:func:`write_spine_benchmark`, the convergence benchmark's HMR-Net data; the
demo data are unchanged): :data:`ARTEFACTS` adds to a sagittal slice, after the clean image is made,
one of the degradations of real spine MR/CT that leave the anatomy (the label) as it is:

- ``metal``: an implant-like signal void (a dark disc of 3-5 px radius inside a vertebral body, as
  around a pedicle screw) with a bright rim and bright/dark streaks radiating from it across the
  slice (CT beam hardening; MR susceptibility distortion), amplitude +-150.
- ``low_contrast``: one to three adjacent vertebral bodies lose most of their contrast to soft tissue
  (body 200-230 against tissue 180, as osteoporotic or oedematous marrow on T2) and their edges are
  blurred (Gaussian, sigma 1.5 px: partial volume), so the boundary is ambiguous.
- ``occlusion``: a band 8-14 px wide crossing the spine at a random angle is replaced by low noisy
  signal (a saturation band / signal drop-out), hiding part of one or two bodies and a disc.
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


ARTEFACTS = ("metal", "low_contrast", "occlusion")


def add_artefact(img: np.ndarray, lab: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``img`` (a sagittal slice of :func:`sagittal_slice`) with artefact ``kind`` of :data:`ARTEFACTS`
    (module docstring); the label ``lab`` is not changed (the anatomy is still there)."""
    if kind not in ARTEFACTS:
        raise ValueError(f"unknown artefact {kind!r}; choose from {ARTEFACTS}")
    from scipy import ndimage

    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = img.astype(np.float32)
    levels = [v for v in range(1, 6) if (lab == v).any()]
    if kind == "metal":
        cy, cx = (np.argwhere(lab == rng.choice(levels)).mean(axis=0) + rng.uniform(-3, 3, 2))
        r = rng.uniform(3, 5)
        d = np.hypot(yy - cy, xx - cx)
        angle = np.arctan2(yy - cy, xx - cx)
        streaks = np.zeros_like(out)
        for a in rng.uniform(-np.pi, np.pi, int(rng.integers(3, 6))):
            sign = rng.choice([-1.0, 1.0])
            width = rng.uniform(0.03, 0.08)
            streaks += sign * 150.0 * np.exp(-((np.angle(np.exp(1j * (angle - a)))) / width) ** 2) * np.exp(-d / 60)
        out += streaks
        out[(d >= r) & (d < r + 1.5)] = 800.0
        out[d < r] = rng.normal(20, 5, int((d < r).sum()))
    elif kind == "low_contrast":
        first = int(rng.integers(0, len(levels)))
        chosen = levels[first:first + int(rng.integers(1, 4))]
        region = np.isin(lab, chosen)
        out[region] = rng.normal(rng.uniform(200, 230), 20, int(region.sum()))
        near = ndimage.binary_dilation(region, iterations=3)
        blurred = ndimage.gaussian_filter(out, 1.5)
        out[near] = blurred[near]
    else:
        cy, cx = np.argwhere(lab > 0).mean(axis=0) + rng.uniform(-15, 15, 2)
        theta = rng.uniform(-np.pi / 3, np.pi / 3)
        dist = np.abs((yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta))
        band = dist < rng.uniform(4, 7)
        out[band] = rng.normal(40, 15, int(band.sum()))
    return np.clip(out, 0, 1000).astype(np.int16)


def write_spine_benchmark(out: Path, counts: dict[str, int], seed: int,
                          artefact_every: int = 2) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Sagittal spine slices for a matched comparison, one ``volumes`` folder ``out`` (mapping.json as
    ``spine_sag_mr``) holding every split of ``counts`` (e.g. ``{"train": 80, "select": 20, "score":
    60}``) as cases ``<split>_<i>``, each drawn from its own seeded stream (disjoint by construction).
    Every ``artefact_every``-th case of each split (i = 1, 3, ... for 2) gets one artefact of
    :data:`ARTEFACTS` in turn. -> (cases by split, artefact tags by case; untagged cases are absent)."""
    g = Grid((1, SIZE, SIZE), (SPACING, SPACING, 1.0))
    splits, tags = {}, {}
    for stream, (split, n) in enumerate(counts.items()):
        splits[split] = []
        for i in range(n):
            rng = np.random.default_rng([seed, 10 + stream, i])
            img, lab = sagittal_slice(rng)
            case = f"{split}_{i:03d}"
            if artefact_every and i % artefact_every == artefact_every - 1:
                kind = ARTEFACTS[(i // artefact_every) % len(ARTEFACTS)]
                img = add_artefact(img, lab, kind, rng)
                tags[case] = [kind]
            write(g.image(img[None]), out / "images" / f"{case}_0000.nii.gz")
            write(g.image(lab[None]), out / "labels" / f"{case}.nii.gz")
            splits[split].append(case)
    (out / "mapping.json").write_text(json.dumps(
        {"name": "spine_sag_mr", "channel_names": {"0": "MR"}, "labels": SAG_LABELS}, indent=2) + "\n")
    return splits, tags


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
