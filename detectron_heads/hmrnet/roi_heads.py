"""HMR-Net ROI heads (paper §2.2-2.6): LRN box head pooled from the H2..H5 maps with the
FPN level rule (Eq. 1), SRN shape head (or, for the Table 5/6 ablation, Detectron2's mask head) on
ROIAlign of the concatenated high-resolution maps of the shape N-Net, and the multitask loss of
Eq. 7 (class CE, smooth-L1 box, shape MSE of Eq. 10, manifold of Eq. 6)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import build_box_head, build_mask_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals

from organmtl.detectron_heads.hmrnet.manifold_loss import manifold_loss
from organmtl.detectron_heads.hmrnet.shape_head import build_shape_head, decode_points, encode_points, shape_regression_loss

CANONICAL_BOX_SIZE, CANONICAL_LEVEL = 224, 4        # Eq. 1: k0 = 4 for a 224 x 224 ROI


class HighResolutionLevelPooler(ROIPooler):
    """Detectron2's ROIPooler with its level assignment (Eq. 1, ``k = floor(k0 + log2(sqrt(wh)/224))``
    clamped to levels 2..5) over maps that all share one stride: N-Net's H2..H5 live at P2
    resolution (§2.2), so every level pooler samples at ``1 / stride``."""

    def __init__(self, output_size: int, levels: int, stride: int, sampling_ratio: int, pooler_type: str):
        super().__init__(output_size, scales=tuple(1.0 / 2 ** lvl for lvl in range(2, 2 + levels)),
                         sampling_ratio=sampling_ratio, pooler_type=pooler_type,
                         canonical_box_size=CANONICAL_BOX_SIZE, canonical_level=CANONICAL_LEVEL)
        single = ROIPooler(output_size, scales=(1.0 / stride,), sampling_ratio=sampling_ratio, pooler_type=pooler_type)
        self.level_poolers = nn.ModuleList(copy.deepcopy(single.level_poolers[0]) for _ in range(levels))


def _pooler(in_features, input_shape, resolution, sampling_ratio, pooler_type, *, concat: bool):
    strides = {input_shape[f].stride for f in in_features}
    if concat or len(in_features) == 1:
        if len(strides) != 1:
            raise ValueError(f"HMR-Net: concatenated features {in_features} must share one stride, got {strides}")
        return ROIPooler(resolution, scales=(1.0 / strides.pop(),), sampling_ratio=sampling_ratio, pooler_type=pooler_type)
    if len(strides) == 1:
        return HighResolutionLevelPooler(resolution, len(in_features), strides.pop(), sampling_ratio, pooler_type)
    return ROIPooler(resolution, scales=tuple(1.0 / input_shape[f].stride for f in in_features),
                     sampling_ratio=sampling_ratio, pooler_type=pooler_type)


def pool_concatenated(pooler: ROIPooler, features: dict, names, boxes) -> torch.Tensor:
    """§2.2: "the higher resolution features are concatenated into a single layer before being
    pooled by the ROIAlign layer". ROIAlign works per channel, so pooling each map with the same
    one-scale ``pooler`` and concatenating the (R, C_i, S, S) results is the same tensor without
    building the full-resolution (N, sum C_i, H, W) concatenation (tested equal)."""
    return torch.cat([pooler([features[f]], boxes) for f in names], dim=1)


@ROI_HEADS_REGISTRY.register()
class HMRNetROIHeads(StandardROIHeads):
    """``MODEL.ROI_HEADS.NAME: HMRNetROIHeads``. Box branch (LRN) on ``MODEL.HMRNET.BOX_IN_FEATURES``
    of the detection N-Net; shape branch (SRN, ``MODEL.HMRNET.SHAPE_ON``) and/or mask branch
    (``MODEL.MASK_ON``, the "semantic segmentation head" ablation) on the concatenation of
    ``MODEL.HMRNET.SHAPE_IN_FEATURES`` of the shape N-Net. Losses: ``loss_cls`` (lambda_c),
    ``loss_box_reg`` (lambda_b), ``loss_shape`` (lambda_s), ``loss_manifold`` (lambda_m).
    Inference adds ``pred_points`` (R, p, 2) in input-image coordinates."""

    @configurable
    def __init__(self, *, shape_in_features=None, shape_pooler=None, shape_head=None, shape_loss_weight=1.0,
                 manifold_loss_weight=0.0, shape_norm_weight=0.0, manifold_k=5, **kwargs):
        super().__init__(**kwargs)
        self.shape_on = shape_in_features is not None
        if self.shape_on:
            self.shape_in_features = shape_in_features
            self.shape_pooler = shape_pooler
            self.shape_head = shape_head
        self.shape_loss_weight = shape_loss_weight
        self.manifold_loss_weight = manifold_loss_weight
        self.shape_norm_weight = shape_norm_weight
        self.manifold_k = manifold_k

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(cls._init_shape_head(cfg, input_shape))
        h = cfg.MODEL.HMRNET
        ret.update(shape_loss_weight=h.SHAPE_LOSS_WEIGHT, manifold_loss_weight=h.MANIFOLD_LOSS_WEIGHT,
                   shape_norm_weight=h.SHAPE_NORM_WEIGHT, manifold_k=h.MANIFOLD_K)
        return ret

    @staticmethod
    def _check(names, input_shape, key):
        missing = [f for f in names if f not in input_shape]
        if missing:
            raise ValueError(f"{key}: backbone has no feature(s) {missing} (has {sorted(input_shape)})")

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        in_features = list(cfg.MODEL.HMRNET.BOX_IN_FEATURES)
        cls._check(in_features, input_shape, "MODEL.HMRNET.BOX_IN_FEATURES")
        b = cfg.MODEL.ROI_BOX_HEAD
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.HMRNET.BOX_IN_FEATURES: features differ in channels {channels}")
        box_head = build_box_head(cfg, ShapeSpec(channels=channels.pop(), height=b.POOLER_RESOLUTION,
                                                 width=b.POOLER_RESOLUTION))
        weights = {"loss_cls": cfg.MODEL.HMRNET.CLASS_LOSS_WEIGHT,
                   "loss_box_reg": cfg.MODEL.HMRNET.BOX_LOSS_WEIGHT * b.BBOX_REG_LOSS_WEIGHT}
        return {"box_in_features": in_features,
                "box_pooler": _pooler(in_features, input_shape, b.POOLER_RESOLUTION, b.POOLER_SAMPLING_RATIO,
                                      b.POOLER_TYPE, concat=False),
                "box_head": box_head,
                "box_predictor": FastRCNNOutputLayers(cfg, box_head.output_shape, loss_weight=weights)}

    @classmethod
    def _segmentation_input(cls, cfg, input_shape, resolution, sampling_ratio, pooler_type):
        in_features = list(cfg.MODEL.HMRNET.SHAPE_IN_FEATURES)
        cls._check(in_features, input_shape, "MODEL.HMRNET.SHAPE_IN_FEATURES")
        pooler = _pooler(in_features, input_shape, resolution, sampling_ratio, pooler_type, concat=True)
        shape = ShapeSpec(channels=sum(input_shape[f].channels for f in in_features), height=resolution, width=resolution)
        return in_features, pooler, shape

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        if not cfg.MODEL.MASK_ON:
            return {}
        m = cfg.MODEL.ROI_MASK_HEAD
        feats, pooler, shape = cls._segmentation_input(cfg, input_shape, m.POOLER_RESOLUTION,
                                                       m.POOLER_SAMPLING_RATIO, m.POOLER_TYPE)
        return {"mask_in_features": feats, "mask_pooler": pooler, "mask_head": build_mask_head(cfg, shape)}

    @classmethod
    def _init_shape_head(cls, cfg, input_shape):
        if not cfg.MODEL.HMRNET.SHAPE_ON:
            return {}
        s = cfg.MODEL.ROI_SHAPE_HEAD
        feats, pooler, shape = cls._segmentation_input(cfg, input_shape, s.POOLER_RESOLUTION,
                                                       s.POOLER_SAMPLING_RATIO, s.POOLER_TYPE)
        return {"shape_in_features": feats, "shape_pooler": pooler, "shape_head": build_shape_head(cfg, shape)}

    # ------------------------------------------------------------------ forward
    def forward(self, images, features, proposals, targets=None):
        pred, losses = super().forward(images, features, proposals, targets)
        if self.training:
            losses.update(self._forward_shape(features, pred))
        return pred, losses

    def forward_with_given_boxes(self, features, instances):
        instances = super().forward_with_given_boxes(features, instances)
        return self._forward_shape(features, instances)

    def _forward_mask(self, features, instances):
        if not self.mask_on:
            return {} if self.training else instances
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
        boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
        return self.mask_head(pool_concatenated(self.mask_pooler, features, self.mask_in_features, boxes), instances)

    def _forward_shape(self, features, instances):
        """Training: Eq. 10 shape loss and Eq. 6 manifold loss on the positive ROIs. Inference: adds
        ``pred_points`` decoded from the predicted boxes (§2.4)."""
        if not self.shape_on:
            return {} if self.training else instances
        if self.training:
            instances, _ = select_foreground_proposals(instances, self.num_classes)
            boxes = [x.proposal_boxes for x in instances]
        else:
            boxes = [x.pred_boxes for x in instances]
        pooled = pool_concatenated(self.shape_pooler, features, self.shape_in_features, boxes)
        if self.training and pooled.shape[0] == 0:
            zero = sum(p.sum() for p in self.shape_head.parameters()) * 0.0
            return {"loss_shape": zero, **({"loss_manifold": zero} if self.manifold_loss_weight else {})}
        q, z = self.shape_head(pooled)
        if self.training:
            if not all(x.has("gt_points") for x in instances if len(x)):
                raise ValueError("HMR-Net: training instances have no gt_points; use HMRNetDatasetMapper "
                                 "on a COCO folder with contour_points (organmtl convert ... --to coco)")
            box_t = torch.cat([b.tensor for b in boxes])
            target = encode_points(torch.cat([x.gt_points for x in instances if len(x)]), box_t)
            losses = {"loss_shape": self.shape_loss_weight * shape_regression_loss(q, target, self.shape_norm_weight)}
            if self.manifold_loss_weight:
                losses["loss_manifold"] = self.manifold_loss_weight * manifold_loss(z, target, self.manifold_k)
            return losses
        start = 0
        for inst in instances:
            n = len(inst)
            inst.pred_points = decode_points(q[start:start + n], inst.pred_boxes.tensor)
            start += n
        return instances
