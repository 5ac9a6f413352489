"""PNG overlays of predicted vs reference contours, one panel per structure on the slice where
the two disagree most (falling back to the slice with the most reference voxels)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def overlay_case(image_file: Path, gt_file: Path, pred_file: Path, labels: dict, out_png: Path,
                 window=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))).astype(np.float32)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_file)))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
    names = [(n, v) for n, v in labels.items() if isinstance(v, int) and v > 0 and n != "ignore"]
    lo, hi = window or np.percentile(img, [1, 99])
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.9), squeeze=False)
    for ax, (name, v) in zip(axes[0], names):
        g, p = gt == v, pred == v
        disagreement = (g ^ p).reshape(g.shape[0], -1).sum(1)
        z = int(np.argmax(disagreement)) if disagreement.any() else int(np.argmax(g.reshape(g.shape[0], -1).sum(1)))
        ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi)
        if g[z].any():
            ax.contour(g[z], [0.5], colors="lime", linewidths=1)
        if p[z].any():
            ax.contour(p[z], [0.5], colors="red", linewidths=1)
        ax.set_title(f"{name} z={z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{Path(gt_file).name}: reference (green) vs prediction (red)", fontsize=9)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
