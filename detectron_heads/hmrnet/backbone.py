"""HMR-Net's N-Net backbone (paper §2.2, Fig. 3 and 4; docs/hmrnet.md).

One N-Net = ResNet (bottom-up C1..C5) + FPN (top-down P2..P5, P6 by max-pool for the RPN) + the
new bottom-up path H2..H5 at P2 resolution::

    H2 = P2,   H_{i+1} = conv3x3( H_i + upsample(P_{i+1}) ),   i = 2, 3, 4   (256 ch, He init)

Optionally the input gets two CoordConv channels (§2.2). HMR-Net runs TWO N-Nets, one for
detection (RPN + LRN) and one for shape regression (SRN), joined by a cross-stitch unit after each
stage (C1..C5, P2..P5, H3..H5 by default; H2 = P2 is already stitched: ``MODEL.NNET.CROSS_STITCH_AT``). The backbone returns the
detection N-Net's ``p2..p6`` and ``h2..h5`` and the shape N-Net's ``s_h2..s_h5``; a single N-Net
(``MODEL.NNET.TWIN False``, the "no cross-stitch" ablation) returns ``p2..p6`` and ``h2..h5`` only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, ShapeSpec, get_norm
import fvcore.nn.weight_init as weight_init
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.utils.events import get_event_storage

from organmtl.detectron_heads.hmrnet.layers import CrossStitchUnit, add_coord_channels

H_LEVELS = (2, 3, 4, 5)
STAGES = ("stem", "res2", "res3", "res4", "res5")


class NNet(nn.Module):
    """One N-Net (§2.2): Detectron2's ResNet + FPN (reused as built by ``build_resnet_fpn_backbone``)
    plus the bottom-up H path. Its stages are run one by one by :class:`NNetBackbone` so that
    cross-stitch units can sit between them."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        bottom_up = build_resnet_backbone(cfg, input_shape)
        self.fpn = FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
                       out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
                       top_block=LastLevelMaxPool(), fuse_type=cfg.MODEL.FPN.FUSE_TYPE)
        if tuple(self.fpn.in_features) != ("res2", "res3", "res4", "res5"):
            raise ValueError(f"N-Net: MODEL.FPN.IN_FEATURES must be res2..res5, got {self.fpn.in_features}")
        ch = cfg.MODEL.FPN.OUT_CHANNELS
        self.h_convs = nn.ModuleList(
            Conv2d(ch, ch, 3, padding=1, bias=not cfg.MODEL.FPN.NORM, norm=get_norm(cfg.MODEL.FPN.NORM, ch))
            for _ in H_LEVELS[1:])
        for c in self.h_convs:
            weight_init.c2_msra_fill(c)        # He init (Table 2, step 1)
        self.channels = ch

    @property
    def resnet(self):
        return self.fpn.bottom_up

    def stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Run one bottom-up stage (``stem`` = C1, ``res2``..``res5`` = C2..C5)."""
        if name == "stem":
            return self.resnet.stem(x)
        return self.resnet.stages[self.resnet.stage_names.index(name)](x)

    def top_down(self, c: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """FPN's top-down path with its lateral/output convs (same arithmetic as ``FPN.forward``)."""
        fpn, names = self.fpn, self.fpn.in_features
        prev = fpn.lateral_convs[0](c[names[-1]])
        out = [fpn.output_convs[0](prev)]
        for idx in range(1, len(names)):
            lateral = fpn.lateral_convs[idx](c[names[-idx - 1]])
            prev = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            if fpn._fuse_type == "avg":
                prev = prev / 2
            out.insert(0, fpn.output_convs[idx](prev))
        return {f"p{lvl}": t for lvl, t in zip(H_LEVELS, out)}

    def h_step(self, i: int, h_prev: torch.Tensor, p_next: torch.Tensor) -> torch.Tensor:
        """H_{i+1} = conv3x3(H_i + P_{i+1} upsampled (bilinear) to the P2 grid)."""
        up = F.interpolate(p_next, size=h_prev.shape[-2:], mode="bilinear", align_corners=False)
        return self.h_convs[i](h_prev + up)


class NNetBackbone(Backbone):
    """One N-Net or two N-Nets with cross-stitch units (§2.2, Fig. 3/4), as a Detectron2 backbone.

    Outputs (all 256 ch by default): ``p2..p6`` (strides 4..64, for the RPN) and ``h2..h5``
    (stride 4, LRN box features) of the detection N-Net; with ``twin`` also ``s_h2..s_h5`` (stride
    4, SRN shape features) of the shape N-Net. The learned alphas are written to the event storage
    as ``cross_stitch/<unit>/a<r><c>`` while training, every ``MODEL.NNET.LOG_ALPHA_PERIOD`` iterations
    (one device-to-host copy of all units' alphas stacked)."""

    def __init__(self, cfg, input_shape: ShapeSpec):
        super().__init__()
        self.coord_conv = cfg.MODEL.NNET.COORD_CONV
        channels = input_shape.channels + (2 if self.coord_conv else 0)
        shape = ShapeSpec(channels=channels, height=input_shape.height, width=input_shape.width)
        self.twin = cfg.MODEL.NNET.TWIN
        self.nets = nn.ModuleList([NNet(cfg, shape) for _ in range(2 if self.twin else 1)])
        self.stitch_at = tuple(cfg.MODEL.NNET.CROSS_STITCH_AT) if self.twin else ()
        allowed = set(STAGES) | {f"p{i}" for i in H_LEVELS} | {f"h{i}" for i in H_LEVELS}
        bad = [s for s in self.stitch_at if s not in allowed]
        if bad:
            raise ValueError(f"MODEL.NNET.CROSS_STITCH_AT: unknown stage(s) {bad}; allowed: {sorted(allowed)}")
        self.stitches = nn.ModuleDict({s: CrossStitchUnit(cfg.MODEL.NNET.CROSS_STITCH_SELF) for s in self.stitch_at})
        self.log_period = max(1, int(cfg.MODEL.NNET.LOG_ALPHA_PERIOD))
        ch = self.nets[0].channels
        self._out_feature_strides = {f"p{i}": 2 ** i for i in (2, 3, 4, 5, 6)}
        self._out_feature_strides.update({f"h{i}": 4 for i in H_LEVELS})
        if self.twin:
            self._out_feature_strides.update({f"s_h{i}": 4 for i in H_LEVELS})
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: ch for k in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32

    def _stitch(self, name: str, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if name in self.stitches:
            return list(self.stitches[name](xs[0], xs[1]))
        return xs

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.coord_conv:
            x = add_coord_channels(x)
        nets = list(self.nets)
        xs = [x] * len(nets)
        c = [{} for _ in nets]
        for name in STAGES:
            xs = self._stitch(name, [net.stage(name, t) for net, t in zip(nets, xs)])
            for d, t in zip(c, xs):
                d[name] = t
        ps = [net.top_down(d) for net, d in zip(nets, c)]
        for lvl in H_LEVELS:
            stitched = self._stitch(f"p{lvl}", [p[f"p{lvl}"] for p in ps])
            for p, t in zip(ps, stitched):
                p[f"p{lvl}"] = t
        hs_cur = self._stitch("h2", [p["p2"] for p in ps])          # H2 = P2
        hs = [{"h2": t} for t in hs_cur]
        for k, lvl in enumerate(H_LEVELS[1:]):
            hs_cur = self._stitch(f"h{lvl}", [net.h_step(k, h, p[f"p{lvl}"])
                                             for net, h, p in zip(nets, hs_cur, ps)])
            for h, t in zip(hs, hs_cur):
                h[f"h{lvl}"] = t
        out = {f"p{lvl}": ps[0][f"p{lvl}"] for lvl in H_LEVELS}
        out["p6"] = F.max_pool2d(out["p5"], kernel_size=1, stride=2)
        out.update(hs[0])
        if self.twin:
            out.update({f"s_{k}": v for k, v in hs[1].items()})
        if self.training:
            self._log_alphas()
        return out

    def _log_alphas(self) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:          # called outside a Detectron2 training loop
            return
        if storage.iter % self.log_period:
            return
        if not self.stitches:
            return
        alphas = torch.stack([unit.alpha.detach() for unit in self.stitches.values()]).cpu().tolist()  # one sync
        storage.put_scalars(**{f"cross_stitch/{name}/a{r}{c}": a[r][c] for name, a in zip(self.stitches, alphas)
                               for r in (0, 1) for c in (0, 1)}, smoothing_hint=False)


@BACKBONE_REGISTRY.register()
def build_nnet_backbone(cfg, input_shape: ShapeSpec) -> NNetBackbone:
    """HMR-Net's N-Net backbone (§2.2): ``MODEL.BACKBONE.NAME: build_nnet_backbone``; keys in
    ``MODEL.NNET`` (TWIN, COORD_CONV, CROSS_STITCH_SELF, CROSS_STITCH_AT)."""
    return NNetBackbone(cfg, input_shape)
