"""HMR-Net meta-architecture: Detectron2's GeneralizedRCNN whose post-processing also maps the
SRN's ``pred_points`` to the output image and rasterises them into ``pred_masks`` (§2.4), so
Detectron2's Visualizer and COCOEvaluator work unchanged."""
from __future__ import annotations

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess

from organmtl.detectron_heads.hmrnet.shape_head import rasterize_points


@META_ARCH_REGISTRY.register()
class HMRNetRCNN(GeneralizedRCNN):
    """``MODEL.META_ARCHITECTURE: HMRNetRCNN``. Training is GeneralizedRCNN's; inference returns
    ``instances`` with ``pred_points`` (R, p, 2, output-image x/y) and, when
    ``MODEL.HMRNET.RASTER_ON_TEST`` and no mask head, ``pred_masks`` (R, H, W) bool, the polygons
    through the points."""

    @configurable
    def __init__(self, *, raster_on_test: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.raster_on_test = raster_on_test

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["raster_on_test"] = cfg.MODEL.HMRNET.RASTER_ON_TEST
        return ret

    def inference(self, batched_inputs, detected_instances=None, do_postprocess: bool = True):
        results = super().inference(batched_inputs, detected_instances, do_postprocess=False)
        if not do_postprocess:
            return results
        out = []
        for r, inp in zip(results, batched_inputs):
            in_h, in_w = r.image_size
            h, w = inp.get("height", in_h), inp.get("width", in_w)
            has_points = r.has("pred_points")
            if has_points:
                pts = r.pred_points.clone()
                pts[..., 0] *= w / in_w
                pts[..., 1] *= h / in_h
                r.pred_points = pts
            r = detector_postprocess(r, h, w)
            if has_points and self.raster_on_test and not r.has("pred_masks"):
                r.pred_masks = rasterize_points(r.pred_points, h, w)
            out.append({"instances": r})
        return out
