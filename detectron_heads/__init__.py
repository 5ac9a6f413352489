"""organmtl's Detectron2 side. Importing this package registers everything it provides with
Detectron2's registries (HMR-Net: backbone ``build_nnet_backbone``, ROI heads ``HMRNetROIHeads``,
box head ``MaxoutFastRCNNConvFCHead``, shape head ``SRNShapeHead``, meta-architecture
``HMRNetRCNN``) and exposes the config functions, dataset registration, mapper and evaluator."""
from organmtl.detectron_heads.config import add_organmtl_config
from organmtl.detectron_heads.datasets import register_coco_folder, register_from_cfg
from organmtl.detectron_heads.hmrnet_config import add_hmrnet_config
from organmtl.detectron_heads import box_head as _box_head  # noqa: F401  (registers the LRN head)
from organmtl.detectron_heads.nnet_backbone import NNetBackbone, build_nnet_backbone
from organmtl.detectron_heads.shape_head import ROI_SHAPE_HEAD_REGISTRY, SRNShapeHead
from organmtl.detectron_heads.hmrnet_roi_heads import HMRNetROIHeads
from organmtl.detectron_heads.hmrnet_rcnn import HMRNetRCNN
from organmtl.detectron_heads.hmrnet_mapper import HMRNetDatasetMapper, build_hmrnet_augmentation

__all__ = ["add_organmtl_config", "add_hmrnet_config", "register_coco_folder", "register_from_cfg",
           "NNetBackbone", "build_nnet_backbone", "ROI_SHAPE_HEAD_REGISTRY", "SRNShapeHead", "HMRNetROIHeads",
           "HMRNetRCNN", "HMRNetDatasetMapper", "build_hmrnet_augmentation"]
