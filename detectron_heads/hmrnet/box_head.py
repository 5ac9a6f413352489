"""HMR-Net's LRN box head (paper §2.3): Detectron2's FastRCNNConvFCHead with a maxout
activation on its final fully connected layer."""
from __future__ import annotations

from torch import nn

from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead

from organmtl.detectron_heads.hmrnet.layers import Maxout


@ROI_BOX_HEAD_REGISTRY.register()
class MaxoutFastRCNNConvFCHead(FastRCNNConvFCHead):
    """LRN (§2.3): ``MODEL.ROI_BOX_HEAD.NAME: MaxoutFastRCNNConvFCHead``. Same layers as
    FastRCNNConvFCHead (``NUM_CONV``, ``NUM_FC``, ``FC_DIM``), the last FC + ReLU replaced by a
    maxout layer of ``MODEL.ROI_BOX_HEAD.MAXOUT_PIECES`` pieces and the same width."""

    def __init__(self, cfg, input_shape):
        super().__init__(cfg, input_shape)
        n = len(self.fcs)
        if n == 0:
            raise ValueError("MaxoutFastRCNNConvFCHead: MODEL.ROI_BOX_HEAD.NUM_FC must be >= 1")
        last = self.fcs[-1]
        setattr(self, f"fc{n}", Maxout(last.in_features, last.out_features, cfg.MODEL.ROI_BOX_HEAD.MAXOUT_PIECES))
        setattr(self, f"fc_relu{n}", nn.Identity())
        self.fcs = self.fcs[:-1] + [getattr(self, f"fc{n}")]
