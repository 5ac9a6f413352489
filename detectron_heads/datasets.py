"""Registration of COCO folders written by organmtl's converters as Detectron2 datasets."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from organmtl.detectron_heads.config import record_dataset

EXTRA_ANNOTATION_KEYS = ["contour_points", "num_points"]


def register_coco_folder(name: str, root: str | Path) -> list[str]:
    """Register ``<name>_train`` and ``<name>_val`` from ``root/annotations/instances_*.json``
    (images in ``root/images``), keeping HMR-Net's ``contour_points`` and each image's pixel
    spacing. Already registered names are left as they are. Returns the registered names."""
    root = Path(root)
    names = []
    for split in ("train", "val"):
        json_file = root / "annotations" / f"instances_{split}.json"
        if not json_file.is_file():
            raise FileNotFoundError(f"{json_file}: not found (write it with 'organmtl convert ... --to coco')")
        dataset = f"{name}_{split}"
        names.append(dataset)
        if dataset in DatasetCatalog.list():
            continue
        DatasetCatalog.register(dataset, lambda j=str(json_file), r=str(root / "images"), d=dataset:
                                _load(j, r, d))
        categories = json.loads(json_file.read_text())["categories"]
        MetadataCatalog.get(dataset).set(json_file=str(json_file), image_root=str(root / "images"),
                                         evaluator_type="coco",
                                         thing_classes=[c["name"] for c in sorted(categories, key=lambda c: c["id"])])
    return names


def _load(json_file: str, image_root: str, dataset: str) -> list[dict]:
    records = load_coco_json(json_file, image_root, dataset, extra_annotation_keys=EXTRA_ANNOTATION_KEYS)
    images = {im["file_name"]: im for im in json.loads(Path(json_file).read_text())["images"]}
    for r in records:
        im = images[Path(r["file_name"]).name]
        r["pixel_spacing"] = im.get("pixel_spacing", [1.0, 1.0])
        r["case"] = im.get("case")
    return records


def register_from_cfg(cfg) -> None:
    """Register ``cfg.ORGANMTL.DATASET_ROOT`` (if set), use its splits when DATASETS are empty,
    set ``MODEL.ROI_HEADS.NUM_CLASSES`` to its number of structures (logged when it changes) and
    record its slicing and structure names (``ORGANMTL.SLICES``, ``ORGANMTL.CLASS_NAMES``;
    :func:`organmtl.detectron_heads.config.record_dataset`) so the saved config predicts volumes."""
    if not cfg.ORGANMTL.DATASET_ROOT:
        return
    train, val = register_coco_folder(cfg.ORGANMTL.DATASET_NAME, cfg.ORGANMTL.DATASET_ROOT)
    frozen = cfg.is_frozen()
    cfg.defrost()
    if not cfg.DATASETS.TRAIN:
        cfg.DATASETS.TRAIN = (train,)
    if not cfg.DATASETS.TEST:
        cfg.DATASETS.TEST = (val,)
    train_json = Path(MetadataCatalog.get(train).json_file)
    record_dataset(cfg, json.loads(train_json.read_text()), str(train_json))
    n_classes = len(MetadataCatalog.get(train).thing_classes)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != n_classes:
        logging.getLogger("organmtl").info("MODEL.ROI_HEADS.NUM_CLASSES set to %d (structures of %s)",
                                           n_classes, cfg.ORGANMTL.DATASET_ROOT)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = n_classes
    if frozen:
        cfg.freeze()
