"""Config keys of organmtl's Detectron2 projects (PointRend-style ``add_*_config``)."""
from detectron2.config import CfgNode as CN


def add_organmtl_config(cfg) -> None:
    """Add ``cfg.ORGANMTL``: the COCO folder written by ``organmtl convert ... --to coco`` and the
    name its train/val splits are registered under (``<NAME>_train`` / ``<NAME>_val``); and
    ``SOLVER.INVERSE_TIME_DECAY``, the per-iteration decay of the ``WarmupInverseTimeDecayLR``
    schedule (:mod:`organmtl.detectron_heads.solver`; the HMR-Net paper's 1e-6)."""
    cfg.ORGANMTL = CN()
    cfg.ORGANMTL.DATASET_ROOT = ""
    cfg.ORGANMTL.DATASET_NAME = "organmtl"
    cfg.SOLVER.INVERSE_TIME_DECAY = 1e-6
