"""HMR-Net (holistic multitask regression network; docs/hmrnet.md) as a Detectron2 project.

Importing this package registers its components with Detectron2's registries: backbone
``build_nnet_backbone`` (N-Net, :mod:`.backbone`), box head ``MaxoutFastRCNNConvFCHead`` (LRN,
:mod:`.box_head`), shape head ``SRNShapeHead`` (SRN, :mod:`.shape_head`), ROI heads
``HMRNetROIHeads`` (:mod:`.roi_heads`) and meta-architecture ``HMRNetRCNN`` (:mod:`.meta_arch`).
Config keys: :func:`add_hmrnet_config` (:mod:`.config`); data: :class:`HMRNetDatasetMapper`
(:mod:`.dataset_mapper`); evaluation: :class:`HMRNetEvaluator` (:mod:`.evaluator`); YAML configs
in ``configs/`` (inheriting ``detectron_heads/configs/Base-OMTL-RCNN-FPN.yaml``).
"""
from organmtl.detectron_heads.hmrnet import box_head as _box_head  # noqa: F401  (registers the LRN head)
from organmtl.detectron_heads.hmrnet.backbone import NNetBackbone, build_nnet_backbone
from organmtl.detectron_heads.hmrnet.config import add_hmrnet_config
from organmtl.detectron_heads.hmrnet.dataset_mapper import HMRNetDatasetMapper, build_hmrnet_augmentation
from organmtl.detectron_heads.hmrnet.evaluator import HMRNetEvaluator
from organmtl.detectron_heads.hmrnet.meta_arch import HMRNetRCNN
from organmtl.detectron_heads.hmrnet.roi_heads import HMRNetROIHeads
from organmtl.detectron_heads.hmrnet.shape_head import ROI_SHAPE_HEAD_REGISTRY, SRNShapeHead

__all__ = ["add_hmrnet_config", "NNetBackbone", "build_nnet_backbone", "ROI_SHAPE_HEAD_REGISTRY", "SRNShapeHead",
           "HMRNetROIHeads", "HMRNetRCNN", "HMRNetDatasetMapper", "build_hmrnet_augmentation", "HMRNetEvaluator"]
