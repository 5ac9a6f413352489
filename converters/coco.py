"""nnU-Net raw dataset -> COCO instance segmentation (per-slice 2D instances), for Detectron2.

Per case and slice along ``--axis``, each structure's mask becomes one instance per connected
component (``--instances components``, default) or one per structure (``class``). Each
annotation holds what pycocotools and Detectron2's ``load_coco_json`` read (``segmentation``,
``bbox``, ``area``, ``iscrowd``, ``category_id``) plus HMR-Net's regression target:

``contour_points``: ``p`` points ``[x0, y0, x1, y1, ...]`` evenly spaced by arc length along the
instance's outer contour (HMR-Net §2.4; p = 50 for images >= 512 px, 100 otherwise, or
``--points``). Canonical order: start where the vertical line through the box centre meets the top
of the contour, run clockwise as seen on screen (x right, y down). Coordinates are COCO's continuous pixel
coordinates (pixel (r, c) covers [c, c+1] x [r, r+1]). The contour geometry is
:mod:`organmtl.geometry`, shared with the HMR-Net mapper and shape head.

Segmentation is a list of polygons (outer contours) unless a component has a hole; then it is a
compressed RLE so no pixel is lost. Slices are written as 8-bit RGB PNGs with a window
(``CT``: level 40 / width 400 HU; other modalities: the volume's 0.5-99.5 percentiles), or with
``--png16`` as 16-bit grey PNGs of ``value + intensity_offset`` (offset in the image entry).
Pixel spacing (row, column mm) is kept in each image entry; the plane and the intensity rule in
the top-level ``organmtl_slices`` (``axis``, ``intensity``: ct_window / percentiles / png16,
``window``, ``percentiles``), which a model trained on the slices records in its config.

Volumes are reoriented to LPS first (``sitk.DICOMOrient``: axes permuted and flipped, voxels
never resampled), so "axial", "coronal" and "sagittal" are anatomical whatever order the file
stores its voxels in (RAS NIfTI, permuted direction matrices); ``slice_index`` counts slices of
the LPS-ordered volume, and the image entry keeps ``orientation: "LPS"``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from pycocotools import mask as mask_util
from scipy import ndimage

from organmtl.converters.common import ConversionError, read_image, same_geometry, write_json
from organmtl.geometry import contour_points, outer_contour

AXES = ("axial", "coronal", "sagittal")
CT_WINDOW = (-160.0, 240.0)
PERCENTILES = (0.5, 99.5)        # 8-bit window of non-CT volumes: these percentiles of the volume


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """COCO options (shared by ``to-coco`` and every source's ``--to coco``)."""
    g = parser.add_argument_group("COCO output")
    g.add_argument("--axis", choices=AXES, default="axial", help="slicing plane (default axial)")
    g.add_argument("--points", type=int, default=0, help="contour points p (default: 50 if >= 512 px, else 100)")
    g.add_argument("--instances", choices=("components", "class"), default="components",
                   help="one instance per connected component (default) or per structure")
    g.add_argument("--keep-empty", action="store_true", help="also write slices without any structure")
    g.add_argument("--png16", action="store_true", help="16-bit grey PNGs instead of windowed 8-bit RGB")
    g.add_argument("--num-folds", type=int, default=5, help="cases split into this many folds (default 5)")
    g.add_argument("--fold", type=int, default=0, help="fold written as instances_val.json (default 0)")


# ---------------------------------------------------------------- COCO annotations of masks

def _encode(mask: np.ndarray) -> dict:
    return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))


def instance_annotation(mask: np.ndarray, category_id: int, p: int) -> dict:
    """COCO annotation (without ids) for one instance mask, with ``contour_points``."""
    rle = _encode(mask)
    filled = ndimage.binary_fill_holes(mask)
    if (filled != mask).any():
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    else:
        polys = []
        for lab in range(1, ndimage.label(mask)[1] + 1):
            xy = outer_contour(ndimage.label(mask)[0] == lab)
            if len(xy) >= 3:
                polys.append([round(float(v), 2) for v in xy.ravel()])
        segmentation = polys
    return {"category_id": int(category_id), "segmentation": segmentation,
            "area": float(mask_util.area(rle)), "bbox": [float(v) for v in mask_util.toBbox(rle)],
            "iscrowd": 0, "num_points": p,
            "contour_points": [round(float(v), 3) for v in contour_points(mask, p).ravel()]}


# ---------------------------------------------------------------- slicing and intensities

def slices_along(array: np.ndarray, axis: str):
    """Yield (index, 2D slice) with display orientation: axial (y, x); coronal/sagittal with the
    superior end at the top (rows = z reversed)."""
    if axis == "axial":
        for k in range(array.shape[0]):
            yield k, array[k]
    elif axis == "coronal":
        for k in range(array.shape[1]):
            yield k, array[::-1, k, :]
    else:
        for k in range(array.shape[2]):
            yield k, array[::-1, :, k]


def pixel_spacing(spacing_xyz, axis: str) -> list[float]:
    sx, sy, sz = spacing_xyz
    return {"axial": [sy, sx], "coronal": [sz, sx], "sagittal": [sz, sy]}[axis]


def to_png_array(slice2d: np.ndarray, window, png16: bool, offset: float) -> np.ndarray:
    if png16:
        return np.clip(slice2d.astype(np.float64) + offset, 0, 65535).astype(np.uint16)
    lo, hi = window
    grey = np.clip((slice2d.astype(np.float32) - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def to_lps(image: sitk.Image) -> sitk.Image:
    """``image`` with its axes permuted and flipped so that index x runs to patient Left, y to
    Posterior, z to Superior (nearest axes for oblique directions); no voxel is resampled."""
    if image.GetDimension() != 3:
        return image
    return sitk.DICOMOrient(image, "LPS")


def _case_images(task):
    case, image_path, label_path, out, labels, opts = task
    image = read_image(image_path)
    seg_img = read_image(label_path)
    if seg_img.GetSize() != image.GetSize():
        raise ConversionError(f"{label_path}: size {seg_img.GetSize()} differs from image {image.GetSize()}")
    if not same_geometry(image, seg_img):
        raise ConversionError(f"{label_path}: spacing/origin/direction differ from {Path(image_path).name}")
    image, seg_img = to_lps(image), to_lps(seg_img)
    img = sitk.GetArrayFromImage(image)
    seg = sitk.GetArrayFromImage(seg_img)
    window = CT_WINDOW if opts["modality"].upper() == "CT" else tuple(np.percentile(img, PERCENTILES))
    offset = float(max(0.0, -float(img.min())))
    spacing = pixel_spacing(image.GetSpacing(), opts["axis"])
    entries = []
    seg_slices = dict(slices_along(seg, opts["axis"]))
    for k, im2d in slices_along(img, opts["axis"]):
        s2d = seg_slices[k]
        anns = []
        h, w = s2d.shape
        p = opts["points"] or (50 if max(h, w) >= 512 else 100)
        for name, value in labels.items():
            if value == 0 or name == "ignore":
                continue
            m = s2d == value
            if not m.any():
                continue
            if opts["instances"] == "components":
                comp, n = ndimage.label(m)
                masks = [comp == i for i in range(1, n + 1)]
            else:
                masks = [m]
            anns.extend(instance_annotation(mk, value, p) for mk in masks)
        if not anns and not opts["keep_empty"]:
            continue
        file_name = f"{case}_{opts['axis'][:3]}{k:04d}.png"
        Image.fromarray(to_png_array(im2d, window, opts["png16"], offset)).save(out / "images" / file_name)
        info = {"file_name": file_name, "height": int(h), "width": int(w), "case": case,
                "axis": opts["axis"], "slice_index": int(k), "orientation": "LPS",
                "pixel_spacing": [float(v) for v in spacing]}
        if opts["png16"]:
            info["intensity_offset"] = offset
        else:
            info["window"] = [float(window[0]), float(window[1])]
        entries.append((info, anns))
    return entries


TAGS_KEY = "organmtl_tags"


def tag_images(coco: dict, case_tags: dict) -> dict:
    """Set each image's ``organmtl_tags`` (a list of strings, e.g. the artefacts of
    :func:`organmtl.demo_data.spine.write_spine_benchmark`) from ``case_tags`` {case: [tags]} by its
    ``case``; images of other cases get ``[]``. pycocotools and Detectron2 ignore the extra key.
    Changes and returns ``coco``."""
    for im in coco["images"]:
        im[TAGS_KEY] = sorted(case_tags.get(im.get("case"), []))
    return coco


def nnunet_cases(dataset: Path) -> tuple[dict, list[tuple[str, Path, Path]]]:
    ds_json = dataset / "dataset.json"
    if not ds_json.is_file():
        raise ConversionError(f"{ds_json}: not found (is {dataset} an nnU-Net raw dataset?)")
    meta = json.loads(ds_json.read_text())
    ending = meta["file_ending"]
    cases = []
    for lab in sorted((dataset / "labelsTr").glob(f"*{ending}")):
        case = lab.name[: -len(ending)]
        img = dataset / "imagesTr" / f"{case}_0000{ending}"
        if not img.is_file():
            raise ConversionError(f"{img}: image for label {lab.name} not found")
        cases.append((case, img, lab))
    if not cases:
        raise ConversionError(f"{dataset / 'labelsTr'}: no label files ending in {ending}")
    return meta, cases


def to_coco(dataset: Path, out: Path, args, run_cases) -> dict:
    """Write ``out/images/*.png`` and ``out/annotations/instances_{train,val}.json``."""
    if not 0 <= args.fold < args.num_folds:
        raise ConversionError(f"--fold {args.fold}: must be in 0..{args.num_folds - 1}")
    meta, cases = nnunet_cases(Path(dataset))
    labels = {k: int(v) for k, v in meta["labels"].items() if isinstance(v, int)}
    opts = {"axis": args.axis, "points": args.points, "instances": args.instances,
            "keep_empty": args.keep_empty, "png16": args.png16, "modality": meta["channel_names"]["0"]}
    (out / "images").mkdir(parents=True)
    per_case = run_cases(_case_images, [(c, i, lab, out, labels, opts) for c, i, lab in cases], desc="to-coco")
    categories = [{"id": v, "name": k, "supercategory": "organ"} for k, v in labels.items()
                  if v != 0 and k != "ignore"]
    splits = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    image_id = ann_id = 0
    for index, entries in enumerate(per_case):
        split = "val" if index % args.num_folds == args.fold else "train"
        for info, anns in entries:
            image_id += 1
            splits[split]["images"].append({"id": image_id, **info})
            for a in anns:
                ann_id += 1
                splits[split]["annotations"].append({"id": ann_id, "image_id": image_id, **a})
    small = {"organmtl_small_organs": meta["organmtl_small_organs"]} if "organmtl_small_organs" in meta else {}
    # how the slices were made, recorded with a model trained on them (ORGANMTL.SLICES) so that a new
    # volume is sliced the same way (organmtl.detectron_heads.volume_predictor)
    intensity = "png16" if args.png16 else ("ct_window" if opts["modality"].upper() == "CT" else "percentiles")
    slicing = {"axis": args.axis, "intensity": intensity, "window": list(CT_WINDOW), "percentiles": list(PERCENTILES)}
    if "organmtl_case_tags" in meta:    # optional dataset.json record {case: [tags]}
        for content in splits.values():
            tag_images(content, meta["organmtl_case_tags"])
    for split, content in splits.items():
        write_json(out / "annotations" / f"instances_{split}.json", {
            "info": {"description": f"{meta.get('name', dataset.name)} ({args.axis} slices) by organmtl",
                     "source_dataset": str(dataset.name)},
            "licenses": [], "categories": categories, "organmtl_slices": slicing, **small, **content})
    return {"images": image_id, "annotations": ann_id, "categories": len(categories),
            "train_images": len(splits["train"]["images"]), "val_images": len(splits["val"]["images"])}
