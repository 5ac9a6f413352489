"""PNG overlays of predicted vs reference contours, one panel per structure on the slice where
the two disagree most (falling back to the slice with the most reference voxels): for nnU-Net
volumes (``overlay_case``) and for COCO slices + instance results (``overlay_coco``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _worst_slice(g: np.ndarray, p: np.ndarray) -> int:
    """Index along axis 0 with the most voxels where reference and prediction disagree."""
    disagreement = (g ^ p).reshape(g.shape[0], -1).sum(1)
    if disagreement.any():
        return int(np.argmax(disagreement))
    return int(np.argmax(g.reshape(g.shape[0], -1).sum(1)))


def draw_panels(panels: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], out_png: Path, title: str,
                window=None) -> Path:
    """One panel per (grey image, reference mask, predicted mask, caption): reference contour green,
    prediction red; written as ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(2.6 * max(len(panels), 1), 2.9), squeeze=False)
    for ax, (img, g, p, caption) in zip(axes[0], panels):
        lo, hi = window or np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        if g.any():
            ax.contour(g, [0.5], colors="lime", linewidths=1)
        if p.any():
            ax.contour(p, [0.5], colors="red", linewidths=1)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    if not panels:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no structure", ha="center")
    fig.suptitle(f"{title}: reference (green) vs prediction (red)", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def overlay_case(image_file: Path, gt_file: Path, pred_file: Path, labels: dict, out_png: Path,
                 window=None) -> Path:
    """Overlay of one nnU-Net case: for every foreground label of ``labels`` (dataset.json
    ``labels``), the axial slice where reference and prediction disagree most."""
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(image_file))).astype(np.float32)
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_file)))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_file)))
    if img.ndim == 2:
        img, gt, pred = img[None], gt[None], pred[None]
    if window is None:
        window = tuple(np.percentile(img, [1, 99]))
    names = [(n, v) for n, v in labels.items() if isinstance(v, int) and v > 0 and n != "ignore"]
    panels = []
    for name, v in names:
        g, p = gt == v, pred == v
        z = _worst_slice(g, p)
        panels.append((img[z], g[z], p[z], f"{name} z={z}"))
    return draw_panels(panels, out_png, Path(gt_file).name, window)


def overlay_coco(gt_json: Path, results_json: Path, image_dir: Path, out_png: Path,
                 score_threshold: float = 0.5) -> Path:
    """Overlay of COCO results: for every category, the image where the union of the reference
    annotations and the union of the instances scoring >= ``score_threshold`` disagree most."""
    import contextlib
    import io
    import json

    from PIL import Image
    from pycocotools.coco import COCO

    from organmtl.evaluation.coco_eval import decode_segmentation

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_json))
    results = json.loads(Path(results_json).read_text())
    panels = []
    for cat in coco.loadCats(coco.getCatIds()):
        best = None
        for img in coco.loadImgs(coco.getImgIds()):
            h, w = img["height"], img["width"]
            g = np.zeros((h, w), bool)
            for a in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]], catIds=[cat["id"]], iscrowd=None)):
                g |= coco.annToMask(a).astype(bool)
            p = np.zeros((h, w), bool)
            for r in results:
                if r["image_id"] == img["id"] and r["category_id"] == cat["id"] and r.get("score", 1) >= score_threshold:
                    p |= decode_segmentation(r["segmentation"], h, w)
            if not (g.any() or p.any()):
                continue
            score = (int((g ^ p).sum()), int(g.sum()))
            if best is None or score > best[0]:
                best = (score, img, g, p)
        if best is None:
            continue
        _, img, g, p = best
        pixels = np.asarray(Image.open(Path(image_dir) / img["file_name"]).convert("L"), dtype=np.float32)
        panels.append((pixels, g, p, f"{cat['name']} {img['file_name']}"))
    return draw_panels(panels, out_png, Path(results_json).name, window=(0, 255))
