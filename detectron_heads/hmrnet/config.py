"""Config keys of HMR-Net (the holistic multitask regression network), added PointRend-style by
:func:`add_hmrnet_config`.

Every key is documented in docs/hmrnet.md ("Options"). Defaults are the paper's values where the
paper gives one (§2.2-2.6, §3.2) and our documented choice where it does not.
"""
from detectron2.config import CfgNode as CN


def add_hmrnet_config(cfg) -> None:
    """Add ``MODEL.NNET`` (N-Net backbone, §2.2), ``MODEL.HMRNET`` (losses of Eq. 7/10, manifold of
    Eq. 2-6, which features feed which branch), ``MODEL.ROI_SHAPE_HEAD`` (SRN, §2.5),
    ``MODEL.ROI_BOX_HEAD.MAXOUT_PIECES`` (LRN maxout, §2.3), ``INPUT.HMRNET_AUG`` (§3.1
    augmentations) and ``TEST.HMRNET`` (evaluation, §3.3). Safe to call twice."""
    if "NNET" in cfg.MODEL:
        return
    cfg.MODEL.NNET = CN()
    # Two N-Nets joined by cross-stitch units (Fig. 3/4) or a single N-Net ("no cross-stitch" ablation).
    cfg.MODEL.NNET.TWIN = True
    # CoordConv (§2.2): two extra input channels holding normalised (x, y) pixel coordinates.
    cfg.MODEL.NNET.COORD_CONV = True
    # Cross-stitch alpha init: [[SELF, 1-SELF], [1-SELF, SELF]] per unit (near identity).
    cfg.MODEL.NNET.CROSS_STITCH_SELF = 0.9
    # Where cross-stitch units sit: any of stem (C1), res2..res5 (C2-C5), p2..p5, h2..h5
    # (default: all but h2, which equals p2 and is stitched there).
    cfg.MODEL.NNET.CROSS_STITCH_AT = ["stem", "res2", "res3", "res4", "res5",
                                      "p2", "p3", "p4", "p5", "h3", "h4", "h5"]
    # Write the alpha values to the event storage every N iterations (metrics.json/TensorBoard); 20 =
    # Detectron2's default writer period (each write is one device-to-host copy).
    cfg.MODEL.NNET.LOG_ALPHA_PERIOD = 20

    cfg.MODEL.HMRNET = CN()
    cfg.MODEL.HMRNET.SHAPE_ON = True          # SRN shape regression head (off for the mask-head ablation)
    cfg.MODEL.HMRNET.NUM_POINTS = 100         # p of §2.4; ground truth is resampled to p if it differs
    cfg.MODEL.HMRNET.BOX_IN_FEATURES = ["h2", "h3", "h4", "h5"]      # LRN pooled per level by Eq. 1
    cfg.MODEL.HMRNET.SHAPE_IN_FEATURES = ["s_h2", "s_h3", "s_h4", "s_h5"]  # concatenated before ROIAlign
    cfg.MODEL.HMRNET.CLASS_LOSS_WEIGHT = 1.0      # lambda_c (Eq. 7)
    cfg.MODEL.HMRNET.BOX_LOSS_WEIGHT = 1.0        # lambda_b
    cfg.MODEL.HMRNET.SHAPE_LOSS_WEIGHT = 1.0      # lambda_s
    cfg.MODEL.HMRNET.MANIFOLD_LOSS_WEIGHT = 0.01  # lambda_m (0 = "no manifold" ablation)
    cfg.MODEL.HMRNET.SHAPE_NORM_WEIGHT = 0.0      # weight of the extra ||q||^2 term of Eq. 10
    cfg.MODEL.HMRNET.MANIFOLD_K = 5               # k of the kNN graph (Eq. 2)
    cfg.MODEL.HMRNET.RASTER_ON_TEST = True        # rasterise predicted points into pred_masks

    cfg.MODEL.ROI_SHAPE_HEAD = CN()
    cfg.MODEL.ROI_SHAPE_HEAD.NAME = "SRNShapeHead"
    cfg.MODEL.ROI_SHAPE_HEAD.CONV_DIMS = [100, 500]     # §2.5: two conv layers, BN + ReLU
    cfg.MODEL.ROI_SHAPE_HEAD.NORM = "BN"
    cfg.MODEL.ROI_SHAPE_HEAD.NUM_FC = 4                 # §2.5: four fully connected layers
    cfg.MODEL.ROI_SHAPE_HEAD.FC_DIM = 1024
    cfg.MODEL.ROI_SHAPE_HEAD.MAXOUT_PIECES = 2          # maxout on the last FC
    cfg.MODEL.ROI_SHAPE_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_SHAPE_HEAD.POOLER_SAMPLING_RATIO = 0
    cfg.MODEL.ROI_SHAPE_HEAD.POOLER_TYPE = "ROIAlignV2"

    cfg.MODEL.ROI_BOX_HEAD.MAXOUT_PIECES = 2            # LRN: maxout on the last FC (§2.3)

    cfg.INPUT.HMRNET_AUG = CN()
    # Empty: Detectron2's default (resize + RandomFlip from INPUT.RANDOM_FLIP). Otherwise applied in
    # this order after the resize: flip, rotate, translate_scale, crop, blur (§3.1).
    cfg.INPUT.HMRNET_AUG.NAMES = []
    cfg.INPUT.HMRNET_AUG.ROTATE_DEG = 10.0
    cfg.INPUT.HMRNET_AUG.SHIFT = 0.1              # translation, fraction of the image size
    cfg.INPUT.HMRNET_AUG.SCALE = (0.9, 1.1)       # scale of the kept extent
    cfg.INPUT.HMRNET_AUG.CROP = (0.9, 0.9)        # relative crop size
    cfg.INPUT.HMRNET_AUG.BLUR_SIGMA = (0.1, 1.0)  # Gaussian blur sigma range (pixels)
    cfg.INPUT.HMRNET_AUG.BLUR_PROB = 0.5

    cfg.TEST.HMRNET = CN()
    cfg.TEST.HMRNET.SCORE_THRESH = 0.5    # detections kept for Dice / Hausdorff
    cfg.TEST.HMRNET.NUM_OVERLAYS = 8      # PNG overlays written per evaluation
