"""A trained Detectron2 model (HMR-Net, Mask R-CNN; ``train_net.py``) back to a patient: predict a
volume slice by slice in the plane the model was trained on and return a label map on the
volume's geometry (docs/hmrnet.md, "Predicting a volume").

Slices are made exactly as ``organmtl convert ... --to coco`` made the training slices
(:mod:`organmtl.converters.coco`, whose functions are reused): the volume is reoriented to LPS,
cut along ``ORGANMTL.SLICES.AXIS`` in the converter's display orientation, mapped to the grey
values of ``ORGANMTL.SLICES.INTENSITY`` (CT window, the volume's percentiles, or 16-bit) and
converted to the model's ``INPUT.FORMAT`` as Detectron2's loader reads the PNGs. Those keys and the
structure names (``ORGANMTL.CLASS_NAMES``) are recorded in the ``config.yaml`` that train_net.py
writes next to the weights (:func:`organmtl.detectron_heads.register_from_cfg`); a config without
them takes them from its ``ORGANMTL.DATASET_ROOT`` if that folder is still there.

Each slice goes through Detectron2's :class:`~detectron2.engine.DefaultPredictor` (resize to
``INPUT.MIN_SIZE_TEST``, the model's own post-processing back to slice size). Detections with score
>= ``TEST.HMRNET.SCORE_THRESH`` are painted as label ``class + 1`` in ascending score, so where
instances overlap the highest score wins. Masks are the model's ``pred_masks``: Mask R-CNN's mask
head, or for HMR-Net the polygons through its points rasterised by its meta-architecture
(``MODEL.HMRNET.RASTER_ON_TEST``), the masks its evaluator scores; with that switch off the points
are rasterised by the same :func:`~organmtl.detectron_heads.hmrnet.shape_head.rasterize_points`.
"""
from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image
from tqdm import tqdm

from detectron2.config import get_cfg
from detectron2.data.detection_utils import convert_PIL_to_numpy
from detectron2.engine import DefaultPredictor

from organmtl.converters.coco import slices_along, to_lps, to_png_array
from organmtl.detectron_heads.config import AXES, INTENSITIES, add_organmtl_config, record_dataset
from organmtl.detectron_heads.hmrnet import add_hmrnet_config
from organmtl.detectron_heads.hmrnet.shape_head import rasterize_points
from organmtl.devices import resolve_device

__all__ = ["predict_volume", "label_names", "load_config", "slice_images", "paint_instances"]


def load_config(config_file, opts: list[str] | None = None):
    """The config of a trained model (usually ``OUTPUT_DIR/config.yaml`` of train_net.py) with
    ``opts`` merged, organmtl's and HMR-Net's keys added. Slicing and structure names it does not
    record are taken from ``ORGANMTL.DATASET_ROOT`` if that folder is there (with its class count,
    as :func:`~organmtl.detectron_heads.register_from_cfg` sets it for training); still missing ones
    raise ValueError naming the config."""
    config_file = Path(config_file)
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: config not found")
    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts or []))
    s = cfg.ORGANMTL.SLICES
    if not (s.AXIS and s.INTENSITY and cfg.ORGANMTL.CLASS_NAMES) and cfg.ORGANMTL.DATASET_ROOT:
        train_json = Path(cfg.ORGANMTL.DATASET_ROOT) / "annotations" / "instances_train.json"
        if train_json.is_file():
            recorded = (s.AXIS, s.INTENSITY, list(cfg.ORGANMTL.CLASS_NAMES))
            record_dataset(cfg, json.loads(train_json.read_text()), str(train_json))
            s.AXIS, s.INTENSITY = recorded[0] or s.AXIS, recorded[1] or s.INTENSITY
            if not recorded[2]:             # names from the dataset: its class count, as register_from_cfg sets it
                cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(cfg.ORGANMTL.CLASS_NAMES)
            cfg.ORGANMTL.CLASS_NAMES = recorded[2] or cfg.ORGANMTL.CLASS_NAMES
    missing = [k for k, v in (("ORGANMTL.SLICES.AXIS", s.AXIS), ("ORGANMTL.SLICES.INTENSITY", s.INTENSITY),
                              ("ORGANMTL.CLASS_NAMES", cfg.ORGANMTL.CLASS_NAMES)) if not v]
    if missing:
        raise ValueError(f"{config_file}: {', '.join(missing)} not recorded and ORGANMTL.DATASET_ROOT "
                         f"({cfg.ORGANMTL.DATASET_ROOT or 'unset'}) has no annotations/instances_train.json; "
                         "use the config.yaml train_net.py wrote or pass them as opts")
    if s.AXIS not in AXES or s.INTENSITY not in INTENSITIES:
        raise ValueError(f"{config_file}: ORGANMTL.SLICES.AXIS {s.AXIS!r} / INTENSITY {s.INTENSITY!r}: "
                         f"choose from {AXES} / {INTENSITIES}")
    n = len(cfg.ORGANMTL.CLASS_NAMES)
    if n != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        raise ValueError(f"{config_file}: {n} ORGANMTL.CLASS_NAMES but MODEL.ROI_HEADS.NUM_CLASSES "
                         f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}")
    if n > 255:
        raise ValueError(f"{config_file}: {n} classes do not fit a uint8 label map")
    return cfg


def label_names(config_file, opts: list[str] | None = None) -> dict[int, str]:
    """``{label value: structure name}`` of the label maps :func:`predict_volume` writes (1..K, in
    the order of the trained categories)."""
    cfg = load_config(config_file, opts)
    return {k + 1: str(name) for k, name in enumerate(cfg.ORGANMTL.CLASS_NAMES)}


def _window(array: np.ndarray, s) -> tuple[tuple[float, float], float]:
    """(8-bit window, 16-bit offset) of the whole volume, as converters/coco.py computes them."""
    if s.INTENSITY == "ct_window":
        window = (float(s.WINDOW[0]), float(s.WINDOW[1]))
    elif s.INTENSITY == "percentiles":
        window = tuple(float(v) for v in np.percentile(array, list(s.PERCENTILES)))
    else:
        window = (0.0, 1.0)                                  # unused by --png16
    return window, float(max(0.0, -float(array.min())))


def slice_images(lps_array: np.ndarray, cfg, input_format: str = "BGR"):
    """Yield ``(k, image)`` for every slice of the LPS-ordered volume array (z, y, x) along
    ``ORGANMTL.SLICES.AXIS``: the converter's PNG content (:func:`organmtl.converters.coco.to_png_array`)
    as Detectron2's ``read_image(..., format=input_format)`` returns it from the PNG file (16-bit
    slices really go through PNG, so PIL's mode and conversion are the file's)."""
    s = cfg.ORGANMTL.SLICES
    png16 = s.INTENSITY == "png16"
    window, offset = _window(lps_array, s)
    for k, im2d in slices_along(lps_array, s.AXIS):
        arr = to_png_array(im2d, window, png16, offset)
        pil = Image.fromarray(arr)
        if png16:
            buf = io.BytesIO()
            pil.save(buf, format="PNG")
            buf.seek(0)
            pil = Image.open(buf)
        yield k, convert_PIL_to_numpy(pil, input_format)


def paint_instances(instances, height: int, width: int, score_thresh: float) -> np.ndarray:
    """(H, W) uint8 label slice of Detectron2 ``Instances``: every detection with score >=
    ``score_thresh`` painted as ``pred_classes + 1`` in ascending score (the highest score wins
    where masks overlap). Masks: ``pred_masks``, else ``pred_points`` rasterised
    (:func:`~organmtl.detectron_heads.hmrnet.shape_head.rasterize_points`)."""
    out = np.zeros((height, width), np.uint8)
    inst = instances.to("cpu")
    if not len(inst):
        return out
    keep = (inst.scores >= score_thresh).numpy()
    if not keep.any():
        return out
    if inst.has("pred_masks"):
        masks = inst.pred_masks.numpy()[keep].astype(bool)
    elif inst.has("pred_points"):
        masks = rasterize_points(inst.pred_points[torch.from_numpy(keep)], height, width).numpy()
    else:
        raise ValueError("the model returns neither pred_masks nor pred_points (a detection-only config?)")
    classes = inst.pred_classes.numpy()[keep]
    for i in np.argsort(inst.scores.numpy()[keep], kind="stable"):
        out[masks[i]] = classes[i] + 1
    return out


@functools.lru_cache(maxsize=1)
def _predictor(config_file: str, weights: str, device: str, opts: tuple[str, ...]):
    cfg = load_config(config_file, list(opts)).clone()
    cfg.MODEL.WEIGHTS = weights
    cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg, DefaultPredictor(cfg)


def _back_to_geometry(labels_lps: np.ndarray, lps: sitk.Image, image: sitk.Image) -> sitk.Image:
    """The LPS-ordered label array on ``image``'s voxel grid: ``to_lps`` only permuted and flipped
    axes, so orienting back to ``image``'s own orientation code undoes it voxel for voxel."""
    lab = sitk.GetImageFromArray(labels_lps)
    lab.CopyInformation(lps)
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    back = sitk.DICOMOrient(lab, code)
    if back.GetSize() != image.GetSize() or not np.allclose(back.GetDirection(), image.GetDirection(), atol=1e-6) \
            or not np.allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4 * max(image.GetSpacing())):
        raise RuntimeError(f"reorienting back to {code} did not restore the input grid")
    back.CopyInformation(image)
    return back


def predict_volume(config_file, weights, image: sitk.Image, device: str = "auto",
                   opts: list[str] | None = None) -> sitk.Image:
    """Label map (uint8, labels 1..K = :func:`label_names`) of the 3D ``image`` predicted slice by
    slice with the Detectron2 model ``config_file`` + ``weights``, on ``image``'s geometry (same
    size, origin, spacing, direction). ``device``: "auto" (cuda if available, else cpu), "cpu",
    "cuda[:N]". ``opts``: config overrides (``KEY VALUE ...``)."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"expected a scalar 3D volume, got {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components per voxel")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"{weights}: weights not found")
    cfg, predictor = _predictor(str(config_file), str(weights), resolve_device(device), tuple(opts or ()))
    lps = to_lps(image)
    array = sitk.GetArrayFromImage(lps)
    labels = np.zeros(array.shape, np.uint8)
    views = dict(slices_along(labels, cfg.ORGANMTL.SLICES.AXIS))         # writable views, the same cut
    thresh = cfg.TEST.HMRNET.SCORE_THRESH
    slices = slice_images(array, cfg, "BGR")                              # DefaultPredictor takes BGR
    for k, bgr in tqdm(slices, total=len(views), desc=f"{cfg.ORGANMTL.SLICES.AXIS} slices", unit="slice",
                       leave=False, disable=None):
        instances = predictor(bgr)["instances"]
        views[k][...] = paint_instances(instances, *bgr.shape[:2], thresh)
    return _back_to_geometry(labels, lps, image)
