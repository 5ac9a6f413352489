"""Head-and-neck CT rendered from real expert contours, in the PDDCA 1.4.1 layout (docs/han_atlas.md).

The label maps are real: the organs-at-risk contours of 30 head-and-neck planning scans (Nikolov et
al. 2018, TCIA Head-Neck Cetuximab / TCGA-HNSC, CC BY 4.0), vendored in :data:`ATLAS_DIR` (cropped to
the head, both annotators). The image is rendered from them (:func:`render_case`): published CT
numbers per tissue, synthetic skull, vertebrae, orbit, sinuses, airway and body outline where the
atlas has no contour, partial volume (rendered on a grid twice as fine in-plane, then averaged),
in-plane blur and slice profile, correlated noise and per-case variation.

``write_han_atlas(out)`` writes::

    train/<case>/img.nrrd, structures/<Name>.nrrd, points/landmarks.fcsv   the source's "test" scans
    test/<case>/...                                                         the source's "validation" scans
    reference/<case>/structures/<Name>.nrrd    the second annotator (radiographer), on the same grid
    NOTICE.txt                                 attribution and licence of the contours

Ground truth: the radiation oncologist's contours; human reference: the radiographer's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from organmtl.demo_data.shapes import write, write_fcsv

ATLAS_DIR = Path(__file__).with_name("atlas")
GROUND_TRUTH = "oncologist"
REFERENCE = "radiographer"
#: PDDCA structure name -> atlas structure name. PDDCA's Chiasm has no contour in the atlas and is
#: not written; lenses and cochleae are further small organs.
STRUCTURES = {"BrainStem": "Brainstem", "Mandible": "Mandible",
              "OpticNerve_L": "Optic-Nerve-Lt", "OpticNerve_R": "Optic-Nerve-Rt",
              "Parotid_L": "Parotid-Lt", "Parotid_R": "Parotid-Rt",
              "Submandibular_L": "Submandibular-Lt", "Submandibular_R": "Submandibular-Rt",
              "Lens_L": "Lens-Lt", "Lens_R": "Lens-Rt", "Cochlea_L": "Cochlea-Lt", "Cochlea_R": "Cochlea-Rt"}
SMALL_ORGANS = ("OpticNerve_L", "OpticNerve_R", "Lens_L", "Lens_R", "Cochlea_L", "Cochlea_R")
#: output grid: in-plane spacing in mm (slices keep the scan's own 2.5 mm); rendering is done on a
#: grid FINE times finer in-plane and averaged down (partial volume)
SPACING_XY = 2.0
FINE = 2
#: the source's split, by patient: scans 0522c0727a/b are one patient (both in "validation")
SPLITS = {"train": "test", "test": "validation"}

# CT numbers (HU) of the tissues, docs/han_atlas.md for the sources: (mean, per-case SD of the mean)
HU = {
    "air": (-1000.0, 0.0), "fat": (-100.0, 8.0), "muscle": (50.0, 4.0), "skin": (30.0, 4.0),
    "csf": (8.0, 3.0), "grey_matter": (40.0, 3.0), "white_matter": (28.0, 3.0), "brainstem": (32.0, 3.0),
    "spinal_cord": (35.0, 3.0), "vitreous": (12.0, 3.0), "lens": (115.0, 10.0), "optic_nerve": (35.0, 4.0),
    "lacrimal": (45.0, 5.0), "parotid": (-5.0, 15.0), "submandibular": (50.0, 10.0),
    "cortical_bone": (1500.0, 150.0), "cancellous_bone": (300.0, 50.0), "diploe": (700.0, 80.0),
    "petrous_bone": (1600.0, 150.0), "cochlear_fluid": (20.0, 5.0), "disc": (80.0, 8.0),
    "sinus_mucosa": (40.0, 5.0), "tooth": (2000.0, 200.0),
}


@dataclass
class Case:
    """One scan of the atlas: ``scan`` (file stem), ``split`` (train/test), ``patient``."""
    scan: str
    split: str
    patient: str


def atlas_index(atlas_dir: Path = ATLAS_DIR) -> dict:
    return json.loads((Path(atlas_dir) / "atlas.json").read_text())


def cases(split: str | None = None, atlas_dir: Path = ATLAS_DIR) -> list[Case]:
    """The atlas scans (sorted), of one split (``train``/``test``) or all."""
    out = []
    for scan, e in sorted(atlas_index(atlas_dir)["scans"].items()):
        if split is None or e["split"] == split:
            out.append(Case(scan, e["split"], e["patient"]))
    return out


def read_bits(scan: str, annotator: str, atlas_dir: Path = ATLAS_DIR) -> sitk.Image:
    path = Path(atlas_dir) / "labels" / f"{scan}_{annotator}.nrrd"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: atlas label file not found")
    return sitk.ReadImage(str(path))


# ------------------------------------------------------------------ grids and resampling

def _grid(origin, spacing, size_xyz) -> sitk.Image:
    img = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def output_grid(bits: sitk.Image, pad_mm: float = 16.0) -> sitk.Image:
    """The case's output grid: the vendored crop grown by ``pad_mm`` in-plane (room for the body
    outline), ``SPACING_XY`` in-plane, the scan's own slices."""
    sp = bits.GetSpacing()
    size = bits.GetSize()
    lo = np.array(bits.GetOrigin()[:2]) - sp[0] / 2 - pad_mm                # voxel edge, mm
    extent = np.array(size[:2]) * np.array(sp[:2]) + 2 * pad_mm
    n = np.ceil(extent / SPACING_XY).astype(int)
    origin = (lo[0] + SPACING_XY / 2, lo[1] + SPACING_XY / 2, bits.GetOrigin()[2])
    return _grid(origin, (SPACING_XY, SPACING_XY, sp[2]), (n[0], n[1], size[2]))


def fine_grid(out: sitk.Image) -> sitk.Image:
    """The render grid: ``FINE`` x ``FINE`` sub-voxels in-plane per output voxel, same slices."""
    s = SPACING_XY / FINE
    o = out.GetOrigin()
    origin = (o[0] - SPACING_XY / 2 + s / 2, o[1] - SPACING_XY / 2 + s / 2, o[2])
    size = out.GetSize()
    return _grid(origin, (s, s, out.GetSpacing()[2]), (size[0] * FINE, size[1] * FINE, size[2]))


def structure_on(bits: sitk.Image, bit: int, grid: sitk.Image, arr: np.ndarray | None = None) -> np.ndarray:
    """Fraction (0..1) of structure ``bit`` on ``grid``: its 0/1 mask linearly resampled (only
    within the structure's bounding box, for speed)."""
    arr = sitk.GetArrayViewFromImage(bits) if arr is None else arr
    out = np.zeros(grid.GetSize()[::-1], np.float32)
    m = ((arr >> np.uint32(bit)) & np.uint32(1)).astype(np.float32)
    idx = np.argwhere(m > 0)
    if not len(idx):
        return out
    lo = np.maximum(idx.min(0) - 2, 0)
    hi = np.minimum(idx.max(0) + 3, m.shape)
    sub = sitk.GetImageFromArray(m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    sub.SetSpacing(bits.GetSpacing())
    sub.SetDirection(bits.GetDirection())
    sub.SetOrigin(bits.TransformIndexToPhysicalPoint([int(v) for v in lo[::-1]]))
    # the sub-box in the target grid's index (x, y, z)
    corners = [bits.TransformIndexToPhysicalPoint([int(v) for v in c[::-1]]) for c in (lo, hi - 1)]
    a = np.array([grid.TransformPhysicalPointToContinuousIndex(c) for c in corners])
    g0 = np.maximum(np.floor(a.min(0)).astype(int) - 1, 0)
    g1 = np.minimum(np.ceil(a.max(0)).astype(int) + 2, np.array(grid.GetSize()))
    if np.any(g1 <= g0):
        return out
    target = _grid(grid.TransformIndexToPhysicalPoint([int(v) for v in g0]), grid.GetSpacing(), g1 - g0)
    target.SetDirection(grid.GetDirection())
    res = sitk.Resample(sub, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    out[g0[2]:g1[2], g0[1]:g1[1], g0[0]:g1[0]] = sitk.GetArrayFromImage(res)
    return out


def block_mean(a: np.ndarray, f: int = FINE) -> np.ndarray:
    z, y, x = a.shape
    return a.reshape(z, y // f, f, x // f, f).mean(axis=(2, 4))


def masks_on_fine(bits: sitk.Image, names, fine: sitk.Image, bit_of: dict) -> dict[str, np.ndarray]:
    """``{atlas name: boolean mask on the fine grid}`` (nearest-neighbour resampling of the packed bits)."""
    res = sitk.Resample(bits, fine, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32)
    arr = sitk.GetArrayFromImage(res)
    return {n: ((arr >> np.uint32(bit_of[n])) & np.uint32(1)).astype(bool) for n in names}


def labels_on_output(bits: sitk.Image, names, out: sitk.Image, bit_of: dict) -> dict[str, np.ndarray]:
    """Output-grid masks: each structure's 0/1 mask linearly resampled, thresholded at 0.5."""
    arr = sitk.GetArrayFromImage(bits)
    return {n: structure_on(bits, bit_of[n], out, arr) >= 0.5 for n in names}


# ------------------------------------------------------------------ synthetic anatomy helpers

def _ball(r_vox_zyx) -> np.ndarray:
    rz, ry, rx = (max(float(r), 1e-3) for r in r_vox_zyx)
    z, y, x = np.ogrid[-int(rz):int(rz) + 1, -int(ry):int(ry) + 1, -int(rx):int(rx) + 1]
    return (z / rz) ** 2 + (y / ry) ** 2 + (x / rx) ** 2 <= 1.0


def _box(mask: np.ndarray, margin_vox) -> tuple[slice, ...] | None:
    idx = np.argwhere(mask)
    if not len(idx):
        return None
    lo = np.maximum(idx.min(0) - np.asarray(margin_vox, int), 0)
    hi = np.minimum(idx.max(0) + 1 + np.asarray(margin_vox, int), mask.shape)
    return tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))


def _distance_outside(mask: np.ndarray, sampling, max_mm: float = 20.0) -> np.ndarray:
    """Distance in mm from each voxel outside ``mask`` to it (0 inside; inf beyond ``max_mm`` of its box)."""
    out = np.full(mask.shape, np.inf, np.float32)
    box = _box(mask, [int(np.ceil(max_mm / s)) + 1 for s in sampling])
    if box is not None:
        out[box] = ndi.distance_transform_edt(~mask[box], sampling=sampling)
    return out


def _distance_inside(mask: np.ndarray, sampling) -> np.ndarray:
    out = np.zeros(mask.shape, np.float32)
    box = _box(mask, (1, 1, 1))
    if box is not None:
        out[box] = ndi.distance_transform_edt(mask[box], sampling=sampling)
    return out


def _centroid(mask: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(mask)
    return idx.mean(0) if len(idx) else None


def _smooth_field(rng, shape, sigma_vox, lowres: int = 4) -> np.ndarray:
    """Zero-mean, unit-SD smooth random field (Gaussian-filtered white noise, built coarse then zoomed)."""
    small = [max(2, s // lowres) for s in shape]
    f = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), [max(s / lowres, 0.5) for s in sigma_vox])
    f = ndi.zoom(f, [a / b for a, b in zip(shape, small)], order=1)[: shape[0], : shape[1], : shape[2]]
    f = np.pad(f, [(0, a - b) for a, b in zip(shape, f.shape)], mode="edge")
    return (f - f.mean()) / (f.std() + 1e-6)


def _segment_distance(shape, sp, a, b, reach_mm: float) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray]:
    """Within the box around segment a-b (voxel zyx) grown by ``reach_mm``: (box, distance in mm to
    the segment, position t along it, 0 at a and 1 at b)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    r = np.array([reach_mm / s for s in sp])
    lo = np.maximum(np.floor(np.minimum(a, b) - r).astype(int), 0)
    hi = np.minimum(np.ceil(np.maximum(a, b) + r).astype(int) + 1, shape)
    box = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))
    zz, yy, xx = np.meshgrid(*[np.arange(x, y, dtype=np.float32) * s for x, y, s in zip(lo, hi, sp)], indexing="ij")
    a = a * sp
    ab = b * sp - a
    t = ((zz - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (xx - a[2]) * ab[2]) / max(float(ab @ ab), 1e-6)
    tc = np.clip(t, 0, 1)
    d = np.sqrt((zz - a[0] - tc * ab[0]) ** 2 + (yy - a[1] - tc * ab[1]) ** 2 + (xx - a[2] - tc * ab[2]) ** 2)
    return box, d, t


def _convex_hull_slices(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    out = np.zeros_like(mask)
    for k in range(mask.shape[0]):
        if mask[k].sum() > 3:
            out[k] = convex_hull_image(mask[k])
    return out


# ------------------------------------------------------------------ the renderer

def tissue_values(rng: np.random.Generator) -> dict[str, float]:
    """This case's CT number of every tissue: the table's mean plus a per-case deviation."""
    return {t: float(m + rng.normal(0, s)) for t, (m, s) in HU.items()}


def _coarse_any(mask: np.ndarray, f: int = FINE) -> np.ndarray:
    z, y, x = mask.shape
    return mask.reshape(z, y // f, f, x // f, f).any(axis=(2, 4))


def _fine(coarse: np.ndarray, f: int = FINE) -> np.ndarray:
    return np.repeat(np.repeat(coarse, f, axis=1), f, axis=2)


def _ellipse(shape2, cy, cx, ry, rx) -> np.ndarray:
    yy, xx = np.ogrid[: shape2[0], : shape2[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _ellipsoid(shape, c, r) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = np.maximum(np.floor(np.asarray(c) - r).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(c) + r).astype(int) + 1, shape)
    box = tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))
    g = np.ogrid[tuple(slice(int(x), int(y)) for x, y in zip(lo, hi))]
    return box, sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, c, r)) <= 1.0


def render_fine(m: dict[str, np.ndarray], sp_zyx, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The noise-free, unblurred HU map on the fine grid from the atlas masks ``m`` (atlas names).
    Returns (image, info): info holds the synthetic structures' masks (for figures and tests)."""
    hu = tissue_values(rng)
    shape = next(iter(m.values())).shape
    sp = np.asarray(sp_zyx, dtype=np.float32)
    zero = np.zeros(shape, bool)
    get = lambda n: m.get(n, zero)  # noqa: E731
    img = np.full(shape, hu["air"], np.float32)
    info = {}
    lr = ("Lt", "Rt")
    brain, canal, mandible, bs = get("Brain"), get("Spinal-Canal"), get("Mandible"), get("Brainstem")
    orbit = {s: get(f"Orbit-{s}") for s in lr}
    nerve = {s: get(f"Optic-Nerve-{s}") for s in lr}
    organs = np.zeros(shape, bool)
    for v in m.values():
        organs |= v
    c_orb = {s: _centroid(orbit[s]) for s in lr}
    have_orbits = all(c is not None for c in c_orb.values())
    mid_x = (c_orb["Lt"][2] + c_orb["Rt"][2]) / 2 if have_orbits else shape[2] / 2
    z_orbit = (c_orb["Lt"][0] + c_orb["Rt"][0]) / 2 if have_orbits else shape[0] * 0.7
    z_canal = np.nonzero(canal.any((1, 2)))[0]
    canal_c = {int(k): _centroid(canal[k]) for k in z_canal}

    # --- vertebrae around the spinal canal: body ellipse in front, posterior arch around it, discs ~16 mm apart
    vert = np.zeros(shape, bool)
    disc = np.zeros(shape, bool)
    if len(z_canal):
        box = _box(canal, (0, int(8 / sp[1]) + 1, int(8 / sp[2]) + 1))
        ring = np.zeros(shape, bool)
        ring[box] = ndi.distance_transform_edt(~canal[box], sampling=(1e6, sp[1], sp[2])) <= 6.0
        ring &= ~canal
        phase = rng.uniform(0, 16)
        for k, (cy, cx) in canal_c.items():
            e = _ellipse(shape[1:], cy - 21.0 / sp[1], cx, 8.5 / sp[1], 11.0 / sp[2])
            if (k * sp[0] + phase) % 16.0 < 4.0:
                disc[k] = e
            else:
                vert[k] = e
            yy = np.arange(shape[1])[:, None]
            vert[k] |= ring[k] & (yy > cy - 8.0 / sp[1])
        vert &= ~canal

    # --- body outline (coarse grid): per slice, the convex hull of the contours, the vertebrae and a
    # posterior neck, grown by the soft tissue covering them; the cranium: brain + skull + scalp
    core = organs | vert | disc
    for k, (cy, cx) in canal_c.items():
        core[k] |= _ellipse(shape[1:], cy + 45.0 / sp[1], cx, 12.0 / sp[1], 40.0 / sp[2])
    # the midface (maxilla, teeth, lips) between the orbits and the chin, as far forward as the globes
    if have_orbits:
        mand = np.argwhere(mandible)
        z_low = int(mand[:, 0].min()) if len(mand) else 0
        y_front = min(c_orb["Lt"][1], c_orb["Rt"][1])
        for k in range(z_low, int(z_orbit)):
            core[k] |= _ellipse(shape[1:], y_front + 6.0 / sp[1], mid_x, 10.0 / sp[1], 24.0 / sp[2])
    cc = _coarse_any(core)
    csp = (sp[0], sp[1] * FINE, sp[2] * FINE)
    hull = _convex_hull_slices(cc)
    grow = rng.uniform(9.0, 14.0)
    skull_t = rng.uniform(5.0, 8.0)
    body_c = ndi.distance_transform_edt(~hull, sampling=(1e6, csp[1], csp[2])) <= grow
    cb = _coarse_any(brain)
    if cb.any():
        body_c |= ndi.distance_transform_edt(~cb, sampling=csp) <= 1.5 + skull_t + 6.0
    body_c = ndi.binary_closing(body_c, np.ones((1, 3, 3), bool), border_value=0) | body_c
    # the face and neck taper below the cranium (temporalis, masseters, cheeks) instead of stepping in
    for k in range(shape[0] - 2, -1, -1):
        body_c[k] |= ndi.binary_erosion(body_c[k + 1], iterations=1)
    d_skin = _fine(ndi.distance_transform_edt(body_c, sampling=(1e6, csp[1], csp[2])))
    body = d_skin > 0
    fat_t = rng.uniform(3.0, 8.0)
    tex = _smooth_field(rng, shape, (2.0, 6.0 / sp[1], 6.0 / sp[2]))
    img[body] = hu["muscle"]
    img[body & (tex > 0.6)] = hu["fat"]                          # fat planes between the muscles
    img[body & (d_skin <= fat_t + 1.5)] = hu["fat"]              # subcutaneous fat (d_skin in mm)
    img[body & (d_skin <= 1.5)] = hu["skin"]
    info["body"] = body

    # --- skull: a shell around the brain (inner table, diploe, outer table), a CSF layer inside it;
    # basal cisterns (CSF) around the intracranial optic nerves and the brainstem
    d_brain = _distance_outside(brain, sp, 1.5 + skull_t + 1.0)
    inner = d_brain <= 1.5 + skull_t
    if brain.any():
        skull = (d_brain > 1.5) & inner
        tables = skull & ((d_brain <= 1.5 + 1.8) | (d_brain > 1.5 + skull_t - 1.8))
        img[skull] = hu["diploe"]
        img[tables] = hu["cortical_bone"]
        img[(d_brain > 0) & (d_brain <= 1.5)] = hu["csf"]
        info["skull"] = skull
        # brain: cortex (grey matter, ~3 mm), white matter inside, two lateral ventricles
        box = _box(brain, (1, 1, 1))
        core_wm = np.zeros(shape, bool)
        core_wm[box] = ndi.uniform_filter(brain[box].astype(np.float32), (3, int(6 / sp[1]) | 1, int(6 / sp[2]) | 1)) > 0.999
        img[brain] = hu["grey_matter"]
        img[core_wm] = hu["white_matter"]
        bc = _centroid(brain)
        z_top = np.nonzero(brain.any((1, 2)))[0].max()
        for sgn in (-1, 1):
            vb, vent = _ellipsoid(shape, (max(bc[0], z_top - 40.0 / sp[0]), bc[1] + 5.0 / sp[1], bc[2] + sgn * 8.0 / sp[2]),
                                  (12.0 / sp[0], 25.0 / sp[1], 4.0 / sp[2]))
            img[vb][vent & core_wm[vb]] = hu["csf"]

    # --- paranasal sinuses, nasal cavity and pharynx: air lined by mucosa, thin bony walls, septa
    air = np.zeros(shape, bool)
    if have_orbits:
        yo = min(c_orb["Lt"][1], c_orb["Rt"][1])
        sep = abs(c_orb["Lt"][2] - c_orb["Rt"][2]) * sp[2]
        half = max(sep / 2 - 17.0, 4.0)
        for c, r in [((z_orbit, yo + 14.0 / sp[1], mid_x), (10.0, 18.0, half)),                  # ethmoid cells
                     ((z_orbit - 30.0 / sp[0], yo + 18.0 / sp[1], mid_x), (18.0, 28.0, 8.0))]:     # nasal cavity
            eb, e = _ellipsoid(shape, c, np.array(r) / sp)
            air[eb] |= e
        for s in lr:                                                                              # maxillary
            eb, e = _ellipsoid(shape, (z_orbit - 27.0 / sp[0], yo + 22.0 / sp[1], c_orb[s][2]), np.array((15.0, 16.0, 12.0)) / sp)
            air[eb] |= e
        for k in range(shape[0]):                                                                 # pharynx
            if k > z_orbit - 22.0 / sp[0] or not len(z_canal):
                continue
            kc = int(min(max(k, z_canal.min()), z_canal.max()))
            if kc in canal_c:
                cy, cx = canal_c[kc]
                air[k] |= _ellipse(shape[1:], cy - 40.0 / sp[1], cx, 6.0 / sp[1], 12.0 / sp[2])
        # the sinuses hollow the skull base out, leaving a 1.5 mm plate under the brain's CSF layer
        plate = d_brain <= 3.0
        air &= body & ~organs & ~plate & ~vert
        if air.any():
            wall = (_distance_outside(air, sp, 2.0) <= 1.2) & ~air & body & ~organs & ~plate
            mucosa = air & ~ndi.binary_erosion(air, np.ones((1, 3, 3), bool), iterations=2)
            img[wall] = hu["cortical_bone"] * 0.6
            img[air] = hu["air"]
            img[mucosa | (air & (tex > 1.3))] = hu["sinus_mucosa"]
    info["air"] = air

    # --- orbits: bony walls, the orbital fat cone around the nerve, four recti muscles, globe, lens
    cones = np.zeros(shape, bool)
    for s in lr:
        if c_orb[s] is None or not nerve[s].any():
            continue
        n_idx = np.argwhere(nerve[s])
        dist = np.linalg.norm((n_idx - c_orb[s]) * sp, axis=1)
        # the apex: the nerve's point 38 mm behind the globe's centre (or its farthest point)
        apex = n_idx[np.argmin(np.abs(dist - min(38.0, dist.max())))].astype(np.float32)
        box, d_ax, t = _segment_distance(shape, sp, c_orb[s], apex, 20.0)
        radius = 17.0 - 13.5 * np.clip(t, 0, 1)                     # 17 mm at the globe, 3.5 mm at the apex
        cone = (d_ax <= radius) & (t >= 0) & (t <= 1.0)
        wall = (d_ax > radius) & (d_ax <= radius + 1.8) & (t >= 0.15) & (t <= 1.0) & ~brain[box]
        img[box][wall] = hu["cortical_bone"] * 0.7
        img[box][cone] = hu["fat"]
        cones[box] |= cone
        axis = (apex - c_orb[s]) * sp
        axis /= np.linalg.norm(axis) + 1e-6
        u1 = np.cross(axis, [1.0, 0, 0])
        u1 /= np.linalg.norm(u1) + 1e-6
        u2 = np.cross(axis, u1)
        for u in (u1, -u1, u2, -u2):                              # recti: globe -> annulus at the apex
            mb, dm, tm = _segment_distance(shape, sp, c_orb[s] + u * 10.0 / sp, apex + u * 3.0 / sp, 3.0)
            img[mb][(dm <= 2.0) & (tm >= 0) & (tm <= 1)] = hu["muscle"]
    info["orbital_fat"] = cones
    for s in lr:
        img[orbit[s]] = hu["vitreous"]
        img[get(f"Lacrimal-{s}")] = hu["lacrimal"]
        img[get(f"Lens-{s}")] = hu["lens"]
    # basal cisterns: CSF around the optic nerves behind the orbits and around the brainstem
    for n in [nerve[s] for s in lr] + [bs]:
        if n.any():
            img[(_distance_outside(n, sp, 3.0) <= 2.5) & ~cones & (inner | brain) & ~n] = hu["csf"]
    for s in lr:
        img[nerve[s]] = hu["optic_nerve"]

    # --- petrous bone around each cochlea, the cochlea's fluid inside
    for s in lr:
        c = get(f"Cochlea-{s}")
        if c.any():
            petrous = _distance_outside(c, sp, 10.0) <= rng.uniform(6.0, 9.0)
            img[petrous & ~brain & ~bs] = hu["petrous_bone"]
            img[c] = hu["cochlear_fluid"]

    # --- spine, cord, brainstem
    img[vert] = hu["cancellous_bone"]
    img[vert & ~ndi.binary_erosion(vert, np.ones((1, 3, 3), bool))] = hu["cortical_bone"] * 0.7
    img[disc & ~canal] = hu["disc"]
    img[canal] = hu["csf"]
    img[get("Spinal-Cord")] = hu["spinal_cord"]
    img[bs] = hu["brainstem"]

    # --- glands: parotid (fatty, textured), submandibular
    for s in lr:
        p = get(f"Parotid-{s}")
        img[p] = hu["parotid"] + 15.0 * tex[p]
        img[get(f"Submandibular-{s}")] = hu["submandibular"]

    # --- mandible: cortical shell over marrow
    if mandible.any():
        box = _box(mandible, (1, 1, 1))
        marrow = np.zeros(shape, bool)
        marrow[box] = ndi.binary_erosion(mandible[box], np.ones((1, 3, 3), bool), iterations=max(1, int(round(2.0 / sp[1]))))
        img[mandible] = hu["cortical_bone"]
        img[marrow] = hu["cancellous_bone"]
    return img, info


def render_case(scan: str, seed: int = 0, atlas_dir: Path = ATLAS_DIR) -> dict:
    """Render one scan: returns ``{"image": sitk int16, "labels": {PDDCA name: sitk uint8},
    "reference": {...}, "landmarks": [(name, LPS point)]}`` on the output grid (:func:`output_grid`)."""
    rng = np.random.default_rng([seed, 25, int.from_bytes(scan.encode(), "little") % (2 ** 32)])
    bit_of = atlas_index(atlas_dir)["bits"]
    bits = read_bits(scan, GROUND_TRUTH, atlas_dir)
    out = output_grid(bits)
    fine = fine_grid(out)
    sp_fine = tuple(reversed(fine.GetSpacing()))
    names = [n for n in bit_of if not n.startswith("Lung")]
    fm = masks_on_fine(bits, names, fine, bit_of)
    img, _ = render_fine(fm, sp_fine, rng)
    # blur: the in-plane point-spread function and the slice sensitivity profile (Gaussians)
    fwhm_xy = rng.uniform(1.1, 1.7)
    fwhm_z = sp_fine[0] * rng.uniform(1.0, 1.3)
    sig = (fwhm_z / 2.355 / sp_fine[0], fwhm_xy / 2.355 / sp_fine[1], fwhm_xy / 2.355 / sp_fine[2])
    img = ndi.gaussian_filter(img, sig, mode="nearest")
    img = block_mean(img)                                               # partial volume
    # correlated noise: white noise through a reconstruction-kernel-like low-pass, per-case SD
    noise = ndi.gaussian_filter(rng.standard_normal(img.shape).astype(np.float32), (0.35, 0.8, 0.8))
    img += noise / noise.std() * rng.uniform(10.0, 18.0)
    img += rng.normal(0, 3.0)                                           # calibration offset
    image = sitk.GetImageFromArray(np.clip(np.rint(img), -1024, 3071).astype(np.int16))
    image.CopyInformation(out)

    def to_images(masks):
        return {p: _mask_image(masks[a], out) for p, a in STRUCTURES.items()}

    gt = labels_on_output(bits, list(STRUCTURES.values()), out, bit_of)
    ref = labels_on_output(read_bits(scan, REFERENCE, atlas_dir), list(STRUCTURES.values()), out, bit_of)
    return {"image": image, "labels": to_images(gt), "reference": to_images(ref),
            "landmarks": _landmarks(fm, fine)}


def _mask_image(mask: np.ndarray, grid: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(grid)
    return img


def _landmarks(fm: dict[str, np.ndarray], fine: sitk.Image) -> list:
    """Eye centres, the brainstem's top and the menton (lowest mandible point near the midline), LPS mm."""
    def phys(zyx):
        return np.array(fine.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))

    out = []
    for name, s in (("eye_L", "Lt"), ("eye_R", "Rt")):
        c = _centroid(fm[f"Orbit-{s}"])
        if c is not None:
            out.append((name, phys(c)))
    bs = np.argwhere(fm["Brainstem"])
    if len(bs):
        top = bs[bs[:, 0] == bs[:, 0].max()].mean(0)
        out.append(("brainstem_top", phys(top)))
    md = np.argwhere(fm["Mandible"])
    if len(md):
        front = md[md[:, 1] <= np.percentile(md[:, 1], 5)]
        out.append(("menton", phys(front[front[:, 0] == front[:, 0].min()].mean(0))))
    return out


# ------------------------------------------------------------------ writer

NOTICE = """Head-and-neck organ-at-risk contours in this folder are derived from the TCIA test & validation
set released with Nikolov et al., "Deep learning to achieve clinically applicable segmentation of head
and neck anatomy for radiotherapy", arXiv:1809.04430 (2018), github deepmind/tcia-ct-scan-dataset;
scans from TCIA Head-Neck Cetuximab (RTOG 0522) and TCGA-HNSC. Licence: Creative Commons Attribution
4.0 International (CC BY 4.0), https://creativecommons.org/licenses/by/4.0/.
Changes: cropped to the head, resampled to a 2 mm in-plane grid, renamed to PDDCA structure names;
the CT images are synthetic, rendered by organmtl (organmtl/demo_data/han_atlas.py, docs/han_atlas.md).
"""


def write_han_atlas(out: Path, n_cases: int | None = None, seed: int = 0, atlas_dir: Path = ATLAS_DIR) -> dict:
    """Write the rendered scans (the first ``n_cases`` of each split, default all) under ``out``;
    returns ``{"train": ids, "test": ids}``."""
    from tqdm import tqdm

    out = Path(out)
    ids = {}
    todo = []
    for split in ("train", "test"):
        cs = cases(split, atlas_dir)[: n_cases or None]
        ids[split] = [c.scan for c in cs]
        todo += [(split, c) for c in cs]
    for split, c in tqdm(todo, desc="han atlas", unit="case", disable=None):
        r = render_case(c.scan, seed, atlas_dir)
        case = out / split / c.scan
        write(r["image"], case / "img.nrrd")
        for name, m in r["labels"].items():
            write(m, case / "structures" / f"{name}.nrrd")
        for name, m in r["reference"].items():
            write(m, out / "reference" / c.scan / "structures" / f"{name}.nrrd")
        write_fcsv(case / "points" / "landmarks.fcsv", r["landmarks"], "RAS")
    out.mkdir(parents=True, exist_ok=True)
    (out / "NOTICE.txt").write_text(NOTICE)
    return ids


# ------------------------------------------------------------------ the box-threshold oracle

def box_threshold_oracle(image: np.ndarray, mask: np.ndarray, grow_slices: int = 2, grow_inplane: int = 5) -> float:
    """Dice of the learning-free "box-threshold oracle" (issue 25): inside the organ's bounding box
    grown by ``grow_slices`` slices and ``grow_inplane`` voxels in-plane, keep the voxels whose
    intensity lies between the 5th and 95th percentile of the organ's own voxels."""
    idx = np.argwhere(mask)
    if not len(idx):
        return float("nan")
    lo = np.maximum(idx.min(0) - (grow_slices, grow_inplane, grow_inplane), 0)
    hi = np.minimum(idx.max(0) + 1 + np.array([grow_slices, grow_inplane, grow_inplane]), mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p5, p95 = np.percentile(image[mask], [5, 95])
    pred = np.zeros(mask.shape, bool)
    sub = image[box]
    pred[box] = (sub >= p5) & (sub <= p95)
    return float(2 * (pred & mask).sum() / (pred.sum() + mask.sum()))


# ------------------------------------------------------------------ vendoring (run once, from ../shared)

def vendor_atlas(src: Path, dst: Path = ATLAS_DIR) -> None:
    """Copy the head region of ``src`` (../shared/anatomy/han_oar_atlas) into ``dst``: each scan and
    annotator cropped to the slices from 15 mm below the lowest of mandible, parotids and
    submandibulars to 25 mm above the highest of orbits, lacrimal glands, optic nerves and brainstem,
    in-plane to the contours within those slices + 20 mm; lungs dropped; geometry kept. Writes
    ``atlas.json`` (split, patient, spacing, volumes and inter-annotator Dice of the source)."""
    src, dst = Path(src), Path(dst)
    meta = json.loads((src / "anatomy.json").read_text())
    bits = meta["bits"]
    keep = sum(1 << b for n, b in bits.items() if not n.startswith("Lung"))
    low = ("Mandible", "Submandibular-Lt", "Submandibular-Rt", "Parotid-Lt", "Parotid-Rt")
    high = ("Orbit-Lt", "Orbit-Rt", "Lacrimal-Lt", "Lacrimal-Rt", "Optic-Nerve-Lt", "Optic-Nerve-Rt", "Brainstem")
    (dst / "labels").mkdir(parents=True, exist_ok=True)
    index = {"source": meta["source"], "bits": {n: b for n, b in bits.items() if not n.startswith("Lung")},
             "ground_truth": GROUND_TRUTH, "reference": REFERENCE, "splits": SPLITS, "scans": {}}
    inv = {v: k for k, v in SPLITS.items()}
    for key, e in sorted(meta["scans"].items()):
        scan = key.split("/", 1)[1]
        ims = {a: sitk.ReadImage(str(src / "labels" / f"{scan}_{a}.nrrd")) for a in (GROUND_TRUTH, REFERENCE)}
        arrs = {a: sitk.GetArrayFromImage(im) for a, im in ims.items()}
        ref = ims[GROUND_TRUTH]
        sp = ref.GetSpacing()
        u = arrs[GROUND_TRUTH] | arrs[REFERENCE]

        def slices(names):
            present = np.zeros(u.shape[0], bool)
            for n in names:
                present |= ((u >> bits[n]) & 1).any((1, 2))
            return np.nonzero(present)[0]

        z0 = max(0, slices(low).min() - int(round(15 / sp[2])))
        z1 = min(u.shape[0], slices(high).max() + 1 + int(round(25 / sp[2])))
        sub = u[z0:z1] & keep
        yy, xx = np.nonzero(sub.any((0, 2)))[0], np.nonzero(sub.any((0, 1)))[0]
        m = int(round(20 / sp[0]))
        y0, y1 = max(0, yy.min() - m), min(u.shape[1], yy.max() + 1 + m)
        x0, x1 = max(0, xx.min() - m), min(u.shape[2], xx.max() + 1 + m)
        for a, arr in arrs.items():
            o = sitk.GetImageFromArray((arr[z0:z1, y0:y1, x0:x1] & keep).astype(np.uint32))
            o.SetSpacing(sp)
            o.SetDirection(ref.GetDirection())
            o.SetOrigin(ref.TransformIndexToPhysicalPoint((int(x0), int(y0), int(z0))))
            sitk.WriteImage(o, str(dst / "labels" / f"{scan}_{a}.nrrd"), True)
        patient = scan[:-1] if scan[-1] in "ab" and scan[-2].isdigit() else scan
        index["scans"][scan] = {
            "split": inv[e["split"]], "source_split": e["split"], "patient": patient,
            "spacing_zyx_mm": e["spacing_zyx_mm"], "crop_index_zyx": [int(z0), int(y0), int(x0)],
            "volumes_cm3": {a: {n: v for n, v in e["annotators"][a].items() if not n.startswith("Lung")}
                            for a in (GROUND_TRUTH, REFERENCE)},
            "dice_oncologist_vs_radiographer": {n: v for n, v in e["dice_oncologist_vs_radiographer"].items()
                                                if not n.startswith("Lung")}}
    (dst / "atlas.json").write_text(json.dumps(index, indent=1) + "\n")


# ------------------------------------------------------------------ figure (docs/figures/han_atlas*.png)

def save_figure(scan: str, path: Path, seed: int = 0, atlas_dir: Path = ATLAS_DIR) -> Path:
    """A PNG of one rendered scan with the ground-truth contours: axial slices through the optic
    nerves, the parotids and the submandibulars, and a coronal slice through the optic nerves
    (soft-tissue window W 400 / L 40)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = render_case(scan, seed, atlas_dir)
    img = sitk.GetArrayFromImage(r["image"]).astype(np.float32)
    labels = {n: sitk.GetArrayFromImage(m).astype(bool) for n, m in r["labels"].items()}
    sp = r["image"].GetSpacing()

    def zmax(names):
        counts = sum(labels[n].sum((1, 2)) for n in names)
        return int(np.argmax(counts))

    nerves = labels["OpticNerve_L"] | labels["OpticNerve_R"]
    y_n = int(np.argwhere(nerves)[:, 1].mean()) if nerves.any() else img.shape[1] // 2
    views = [("axial, optic nerves", img[zmax(["OpticNerve_L", "OpticNerve_R"])], {n: m[zmax(["OpticNerve_L", "OpticNerve_R"])] for n, m in labels.items()}, sp[1] / sp[0]),
             ("axial, parotids", img[zmax(["Parotid_L", "Parotid_R"])], {n: m[zmax(["Parotid_L", "Parotid_R"])] for n, m in labels.items()}, sp[1] / sp[0]),
             ("axial, submandibulars", img[zmax(["Submandibular_L", "Submandibular_R", "Mandible"])],
              {n: m[zmax(["Submandibular_L", "Submandibular_R", "Mandible"])] for n, m in labels.items()}, sp[1] / sp[0]),
             ("coronal, optic nerves", img[::-1, y_n], {n: m[::-1, y_n] for n, m in labels.items()}, sp[2] / sp[0])]
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, len(labels)))
    fig, axes = plt.subplots(1, len(views), figsize=(4.2 * len(views), 4.6))
    for ax, (title, sl, ls, aspect) in zip(axes, views):
        ax.imshow(sl, cmap="gray", vmin=40 - 200, vmax=40 + 200, aspect=aspect, interpolation="nearest")
        for (n, m), c in zip(ls.items(), colors):
            if m.any():
                ax.contour(m.astype(float), levels=[0.5], colors=[c], linewidths=0.8)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in zip(labels, colors)]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.suptitle(f"{scan}: rendered CT (W 400 / L 40) with the oncologist's contours "
                 f"({sp[0]:g} x {sp[1]:g} x {sp[2]:g} mm)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ acceptance numbers (docs/han_atlas.md)

def acceptance_stats(seed: int = 0, atlas_dir: Path = ATLAS_DIR) -> dict:
    """Render every scan and measure, per organ: output voxels, border voxels (in-plane 4-neighbourhood),
    rendered vs atlas volume, the box-threshold oracle's Dice, the second annotator's Dice on the output
    grid (and the source's, native grid), the mean HU; plus the render time per case."""
    import time

    from tqdm import tqdm

    cross = np.zeros((3, 3, 3), bool)
    cross[1, 1, :] = cross[1, :, 1] = cross[:, 1, 1] = True
    index = atlas_index(atlas_dir)["scans"]
    res = {}
    for c in tqdm(cases(atlas_dir=atlas_dir), desc="han atlas stats", unit="case", disable=None):
        t = time.time()
        r = render_case(c.scan, seed, atlas_dir)
        e = {"split": c.split, "seconds": time.time() - t, "shape_zyx": list(r["image"].GetSize()[::-1]), "organs": {}}
        img = sitk.GetArrayFromImage(r["image"]).astype(np.float32)
        for n, m in r["labels"].items():
            a = sitk.GetArrayFromImage(m).astype(bool)
            b = sitk.GetArrayFromImage(r["reference"][n]).astype(bool)
            vv = float(np.prod(m.GetSpacing()) / 1000)
            e["organs"][n] = {
                "voxels": int(a.sum()), "border": int((a & ~ndi.binary_erosion(a, cross)).sum()), "voxel_cm3": vv,
                "vol_cm3": float(a.sum() * vv), "atlas_cm3": index[c.scan]["volumes_cm3"][GROUND_TRUTH][STRUCTURES[n]],
                "oracle": box_threshold_oracle(img, a) if a.any() else None,
                "human_dice": float(2 * (a & b).sum() / (a.sum() + b.sum())) if (a.any() or b.any()) else None,
                "atlas_human_dice": index[c.scan]["dice_oncologist_vs_radiographer"].get(STRUCTURES[n]),
                "mean_hu": float(img[a].mean()) if a.any() else None}
        res[c.scan] = e
    return res


if __name__ == "__main__":      # python -m organmtl.demo_data.han_atlas OUT.json: the numbers and figures of docs/han_atlas.md
    import subprocess
    import sys

    stats = {"code_revision": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                             cwd=Path(__file__).parent).stdout.strip(), "scans": acceptance_stats()}
    Path(sys.argv[1]).write_text(json.dumps(stats, indent=1) + "\n")
    for scan in ("0522c0017", "0522c0014"):
        save_figure(scan, Path(__file__).parents[2] / "docs" / "figures" / f"han_atlas_{scan}.png")
