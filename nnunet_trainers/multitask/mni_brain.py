"""A real brain MRI task from data that ships inside a PyPI package: nilearn's MNI152 (ICBM 2009a
symmetric) T1 template with its grey- and white-matter probability maps (bundled with nilearn, no
download), written as a ``volumes`` folder for ``organmtl convert volumes``
(Moeskops et al. §2 "Brain MRI": tissue classes in T1-weighted MR).

Labels (the paper segments six brain tissues; the template has GM and WM maps, and a third class is
added as follows):

- the brain envelope: voxels with ``p_GM + p_WM >= 0.5``, closed (2 iterations) and hole-filled,
  which adds the ventricles and sulci;
- inside the envelope each voxel gets the largest of ``p_CSF = 1 - p_GM - p_WM`` (1, "CSF"),
  ``p_GM`` (2, "GM") and ``p_WM`` (3, "WM"); outside it is background.

There is one subject, so cases are variants of it: case 0 the template resampled to ``voxel_mm``,
case 1 mirrored left-right, further cases with a random intensity gamma and Gaussian noise.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}


def mni152_tissue_labels(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """CSF/GM/WM label map from the GM and WM probability maps (see module docstring)."""
    from scipy import ndimage

    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    envelope = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm >= 0.5, iterations=2))
    csf = np.clip(1.0 - gm - wm, 0, 1)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    labels[~envelope] = 0
    return labels


def write_mni152_volumes(out: Path, n_cases: int = 3, voxel_mm: float = 4.0, seed: int = 0) -> list[str]:
    """Write ``out/images/mni152_XXX_0000.nii.gz``, ``out/labels/mni152_XXX.nii.gz`` and
    ``out/mapping.json`` (``volumes`` layout); returns the case ids."""
    import nibabel as nib
    from nilearn import datasets, image

    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    if voxel_mm <= 0:
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    target = np.diag([voxel_mm] * 3)
    t1 = image.resample_img(datasets.load_mni152_template(resolution=2), target_affine=target,
                            interpolation="continuous", force_resample=True, copy_header=True)
    prob = {name: image.resample_img(loader(resolution=2), target_affine=t1.affine, target_shape=t1.shape,
                                     interpolation="continuous", force_resample=True, copy_header=True).get_fdata()
            for name, loader in (("gm", datasets.load_mni152_gm_template), ("wm", datasets.load_mni152_wm_template))}
    base = t1.get_fdata().astype(np.float32)
    labels = mni152_tissue_labels(prob["gm"], prob["wm"])
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_cases):
        img, lab = base.copy(), labels.copy()
        if i == 1:
            img, lab = img[::-1].copy(), lab[::-1].copy()          # left-right mirror (axis 0 is x in RAS)
        elif i >= 2:
            scale = float(img.max()) or 1.0
            img = scale * (np.clip(img, 0, None) / scale) ** rng.uniform(0.7, 1.4)
            img = img + rng.normal(0, 0.02 * scale, img.shape)
        case = f"mni152_{i:03d}"
        nib.save(nib.Nifti1Image(img.astype(np.float32), t1.affine), out / "images" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), t1.affine), out / "labels" / f"{case}.nii.gz")
        ids.append(case)
    (out / "mapping.json").write_text(json.dumps({"name": "mni152_brain", "channel_names": {"0": "T1"},
                                                  "labels": LABELS}, indent=2) + "\n")
    return ids
