"""organmtl's Detectron2 side, laid out like Detectron2's ``projects/``: generic pieces here, one
subpackage per method beside them.

* here: :func:`add_organmtl_config` (``cfg.ORGANMTL``, :mod:`.config`), COCO folder registration
  (:mod:`.datasets`), ``train_net.py`` and ``configs/`` (``Base-OMTL-RCNN-FPN.yaml``, the base of
  every config, and the plain Mask R-CNN baselines);
* :mod:`organmtl.detectron_heads.hmrnet`: HMR-Net (docs/hmrnet.md).

Importing this package registers every method's components with Detectron2's registries.
"""
from organmtl.detectron_heads.config import add_organmtl_config
from organmtl.detectron_heads.datasets import register_coco_folder, register_from_cfg
from organmtl.detectron_heads import hmrnet  # noqa: F401  (registers HMR-Net's heads, backbone, meta-arch)

__all__ = ["add_organmtl_config", "register_coco_folder", "register_from_cfg", "hmrnet"]
