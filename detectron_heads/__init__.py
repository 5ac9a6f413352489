"""organmtl's Detectron2 side. Importing this package registers everything it provides with
Detectron2's registries and exposes :func:`add_organmtl_config` and dataset registration."""
from organmtl.detectron_heads.config import add_organmtl_config
from organmtl.detectron_heads.datasets import register_coco_folder, register_from_cfg

__all__ = ["add_organmtl_config", "register_coco_folder", "register_from_cfg"]
