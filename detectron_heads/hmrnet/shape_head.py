"""HMR-Net's shape regression network SRN (paper §2.4-2.6).

* :class:`SRNShapeHead`: two conv layers (100 and 500 filters, 3x3, BN + ReLU), four fully
  connected layers of 1024 (ReLU, the last one maxout), then a linear layer with 2p outputs (§2.5).
  Its latent ``z`` for the manifold loss (Eq. 6) is the output of the maxout FC, the last hidden layer.
* :func:`encode_points` / :func:`decode_points`: the "scaled normalisation" of §2.4: contour points
  relative to their ROI, ``u = 2 (x - cx) / w``, ``v = 2 (y - cy) / h`` (the box spans [-1, 1]).
* :func:`shape_regression_loss`: Eq. 10, MSE plus a configurable weight on ``||q||^2``.
* :func:`rasterize_points`: predicted points -> instance masks (§2.4, pycocotools polygons).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
import fvcore.nn.weight_init as weight_init
from detectron2.utils.registry import Registry

from organmtl.detectron_heads.hmrnet.layers import Maxout
from organmtl.geometry import rasterize_polygon

ROI_SHAPE_HEAD_REGISTRY = Registry("ROI_SHAPE_HEAD")
ROI_SHAPE_HEAD_REGISTRY.__doc__ = "Shape regression heads of HMR-Net (SRN, §2.5): ROI features -> 2p coordinates."


@ROI_SHAPE_HEAD_REGISTRY.register()
class SRNShapeHead(nn.Module):
    """SRN (§2.5). ``forward(x (R, C, S, S)) -> (q (R, 2p), z (R, FC_DIM))`` where ``q`` are the
    box-normalised point coordinates ``[u0, v0, u1, v1, ...]`` and ``z`` the latent of the maxout
    FC used by the manifold loss."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        c = cfg.MODEL.ROI_SHAPE_HEAD
        self.num_points = cfg.MODEL.HMRNET.NUM_POINTS
        if c.NUM_FC < 1:
            raise ValueError(f"MODEL.ROI_SHAPE_HEAD.NUM_FC must be >= 1, got {c.NUM_FC}")
        convs, ch = [], input_shape.channels
        for dim in c.CONV_DIMS:
            conv = Conv2d(ch, dim, 3, padding=1, bias=not c.NORM, norm=get_norm(c.NORM, dim), activation=nn.ReLU())
            weight_init.c2_msra_fill(conv)                 # He init (Table 2, step 1)
            convs.append(conv)
            ch = dim
        self.convs = nn.Sequential(*convs)
        n_in = ch * input_shape.height * input_shape.width
        fcs = []
        for _ in range(c.NUM_FC - 1):
            fc = nn.Linear(n_in, c.FC_DIM)
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
            fcs += [fc, nn.ReLU()]
            n_in = c.FC_DIM
        self.fcs = nn.Sequential(*fcs)
        self.maxout = Maxout(n_in, c.FC_DIM, c.MAXOUT_PIECES)
        self.predictor = nn.Linear(c.FC_DIM, 2 * self.num_points)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.convs(x).flatten(1)
        z = self.maxout(self.fcs(x))
        return self.predictor(z), z


def build_shape_head(cfg, input_shape: ShapeSpec) -> nn.Module:
    """Build ``MODEL.ROI_SHAPE_HEAD.NAME`` from :data:`ROI_SHAPE_HEAD_REGISTRY`."""
    return ROI_SHAPE_HEAD_REGISTRY.get(cfg.MODEL.ROI_SHAPE_HEAD.NAME)(cfg, input_shape)


def _box_centre_size(boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = (boxes[:, 2:] - boxes[:, :2]).clamp_min(1e-3)
    return centre, size


def encode_points(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """§2.4 normalisation: image points (R, p, 2) -> box coordinates (R, 2p), box = [-1, 1]^2."""
    centre, size = _box_centre_size(boxes)
    return (2 * (points - centre[:, None]) / size[:, None]).flatten(1)


def decode_points(q: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_points`: (R, 2p) box coordinates -> (R, p, 2) image points (§2.4,
    "rescaling step ... back to the original image space")."""
    centre, size = _box_centre_size(boxes)
    return centre[:, None] + q.view(q.shape[0], q.shape[1] // 2, 2) * size[:, None] / 2


def shape_regression_loss(q: torch.Tensor, q_star: torch.Tensor, norm_weight: float = 0.0) -> torch.Tensor:
    """Eq. 10: ``1/N sum_i ((q*_i - q_i)^2 + w ||q_i||^2)`` with the squared error averaged over the
    2p coordinates (MSE) and ``w`` = ``MODEL.HMRNET.SHAPE_NORM_WEIGHT`` on the mean square of q (the
    paper's w = 1 would halve every optimal prediction, so it is a configurable regulariser).
    Zero (connected to q's graph) for N = 0."""
    if q.shape != q_star.shape:
        raise ValueError(f"shape_regression_loss: prediction {tuple(q.shape)} vs target {tuple(q_star.shape)}")
    if q.numel() == 0:
        return q.sum() * 0.0
    loss = ((q_star - q) ** 2).mean()
    if norm_weight:
        loss = loss + norm_weight * (q ** 2).mean()
    return loss


def rasterize_points(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Instance masks (R, H, W) bool from (R, p, 2) polygons in image (COCO) coordinates (§2.4)."""
    pts = points.detach().cpu().numpy().astype(np.float64)
    masks = np.zeros((len(pts), height, width), dtype=bool)
    for i, poly in enumerate(pts):
        if np.isfinite(poly).all() and len(poly) >= 3:
            masks[i] = rasterize_polygon(poly, height, width)
    return torch.from_numpy(masks).to(points.device)
