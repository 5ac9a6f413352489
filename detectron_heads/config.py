"""Config keys of organmtl's Detectron2 projects (PointRend-style ``add_*_config``)."""
from __future__ import annotations

from detectron2.config import CfgNode as CN

AXES = ("axial", "coronal", "sagittal")
INTENSITIES = ("ct_window", "percentiles", "png16")


def add_organmtl_config(cfg) -> None:
    """Add ``cfg.ORGANMTL``: the COCO folder written by ``organmtl convert ... --to coco`` and the
    name its train/val splits are registered under (``<NAME>_train`` / ``<NAME>_val``); how that
    converter made the training slices from volumes (``ORGANMTL.SLICES``) and the structure names
    (``ORGANMTL.CLASS_NAMES``), both recorded from the dataset by
    :func:`organmtl.detectron_heads.register_from_cfg` so that the ``config.yaml`` train_net writes
    next to the weights is enough to predict a new volume the way the model was trained
    (:mod:`organmtl.detectron_heads.volume_predictor`); and ``SOLVER.INVERSE_TIME_DECAY``, the
    per-iteration decay of the ``WarmupInverseTimeDecayLR`` schedule
    (:mod:`organmtl.detectron_heads.solver`; the HMR-Net paper's 1e-6)."""
    cfg.ORGANMTL = CN()
    cfg.ORGANMTL.DATASET_ROOT = ""
    cfg.ORGANMTL.DATASET_NAME = "organmtl"
    # Structure names of the model's classes 0..K-1 (the dataset's categories in id order); label
    # value k + 1 in a predicted volume. Empty: not recorded (taken from DATASET_ROOT if present).
    cfg.ORGANMTL.CLASS_NAMES = []
    cfg.ORGANMTL.SLICES = CN()
    # Plane of the training slices (convert --axis): axial, coronal or sagittal of the volume
    # reoriented to LPS (converters/coco.py). "": not recorded (taken from DATASET_ROOT if present).
    cfg.ORGANMTL.SLICES.AXIS = ""
    # Grey values of the slice images: "ct_window" (8-bit of WINDOW, the converter's rule for CT),
    # "percentiles" (8-bit of the volume's PERCENTILES, its rule for other modalities) or "png16"
    # (convert --png16: value + max(0, -volume minimum)). "": not recorded.
    cfg.ORGANMTL.SLICES.INTENSITY = ""
    cfg.ORGANMTL.SLICES.WINDOW = (-160.0, 240.0)      # HU, level 40 / width 400 (converters/coco.py CT_WINDOW)
    cfg.ORGANMTL.SLICES.PERCENTILES = (0.5, 99.5)     # converters/coco.py PERCENTILES
    cfg.SOLVER.INVERSE_TIME_DECAY = 1e-6


def slicing_of_coco(coco: dict, source: str = "COCO json") -> dict:
    """How ``organmtl convert ... --to coco`` made the slices of a COCO dict: its
    ``organmtl_slices`` record, or for folders written before that record existed, what the image
    entries show (``axis``; ``intensity_offset`` for --png16; the CT window as every ``window``,
    else per-volume percentiles). -> ``{"axis", "intensity", "window", "percentiles"}``."""
    if "organmtl_slices" in coco:
        rec = dict(coco["organmtl_slices"])
    else:
        from organmtl.converters.coco import CT_WINDOW, PERCENTILES

        images = coco.get("images", [])
        axes = {im.get("axis") for im in images}
        if not images or len(axes) != 1 or None in axes:
            raise ValueError(f"{source}: cannot tell the slicing plane (images with axes {sorted(map(str, axes))})")
        if all("intensity_offset" in im for im in images):
            intensity = "png16"
        elif all(tuple(im.get("window", ())) == tuple(CT_WINDOW) for im in images):
            intensity = "ct_window"
        else:
            intensity = "percentiles"
        rec = {"axis": axes.pop(), "intensity": intensity, "window": list(CT_WINDOW),
               "percentiles": list(PERCENTILES)}
    if rec.get("axis") not in AXES or rec.get("intensity") not in INTENSITIES:
        raise ValueError(f"{source}: unknown slicing {rec}")
    return rec


def record_dataset(cfg, coco: dict, source: str = "COCO json") -> None:
    """Set ``ORGANMTL.SLICES`` (:func:`slicing_of_coco`) and ``ORGANMTL.CLASS_NAMES`` (category
    names in id order) from the COCO dict ``coco`` of the training dataset; ``cfg`` must not be
    frozen."""
    rec = slicing_of_coco(coco, source)
    cfg.ORGANMTL.SLICES.AXIS = rec["axis"]
    cfg.ORGANMTL.SLICES.INTENSITY = rec["intensity"]
    cfg.ORGANMTL.SLICES.WINDOW = tuple(float(v) for v in rec["window"])
    cfg.ORGANMTL.SLICES.PERCENTILES = tuple(float(v) for v in rec["percentiles"])
    cfg.ORGANMTL.CLASS_NAMES = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
