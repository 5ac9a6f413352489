"""Config keys of organmtl's Detectron2 projects (PointRend-style ``add_*_config``)."""
from detectron2.config import CfgNode as CN


def add_organmtl_config(cfg) -> None:
    """Add ``cfg.ORGANMTL``: the COCO folder written by ``organmtl convert ... --to coco`` and the
    name its train/val splits are registered under (``<NAME>_train`` / ``<NAME>_val``)."""
    cfg.ORGANMTL = CN()
    cfg.ORGANMTL.DATASET_ROOT = ""
    cfg.ORGANMTL.DATASET_NAME = "organmtl"
