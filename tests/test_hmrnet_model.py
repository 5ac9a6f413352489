"""HMR-Net model pieces (paper §2.2-2.5, docs/hmrnet.md): maxout and CoordConv shapes, cross-stitch units
(identity alpha = two independent N-Nets, exactly), the N-Net outputs, the maxout LRN, Eq. 1 level
pooling on equal-stride maps, gradient routing of the losses and inference outputs."""
from importlib import resources

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from detectron2.utils.visualizer import Visualizer

from organmtl.detectron_heads import add_organmtl_config
from organmtl.detectron_heads.hmrnet import add_hmrnet_config
from organmtl.detectron_heads.hmrnet.backbone import NNetBackbone
from organmtl.detectron_heads.hmrnet.layers import CrossStitchUnit, Maxout, add_coord_channels
from organmtl.detectron_heads.hmrnet.roi_heads import HighResolutionLevelPooler

CONFIGS = resources.files("organmtl.detectron_heads.hmrnet") / "configs"


def tiny_cfg(name="tiny/hmrnet_R_18_FPN_tiny.yaml", **opts):
    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.HMRNET.NUM_POINTS = 8
    cfg.MODEL.ROI_SHAPE_HEAD.CONV_DIMS = [8, 8]
    cfg.MODEL.ROI_SHAPE_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    for k, v in opts.items():
        cfg.merge_from_list([k, v])
    return cfg


def test_maxout_shape_and_value():
    m = Maxout(6, 4, pieces=3)
    x = torch.randn(5, 6)
    y = m(x)
    assert y.shape == (5, 4)
    assert torch.allclose(y, m.linear(x).view(5, 4, 3).amax(2))


def test_coord_conv_channels():
    x = torch.randn(2, 3, 8, 10)
    y = add_coord_channels(x)
    assert y.shape == (2, 5, 8, 10) and torch.equal(y[:, :3], x)
    assert torch.allclose(y[0, 3, 0], torch.linspace(-1, 1, 10))      # x varies along the width
    assert torch.allclose(y[0, 4, :, 0], torch.linspace(-1, 1, 8))    # y varies along the height


def test_cross_stitch_unit_mixes_with_learned_alpha():
    cs = CrossStitchUnit(0.9)
    a, b = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    a2, b2 = cs(a, b)
    assert torch.allclose(a2, 0.9 * a) and torch.allclose(b2, 0.1 * a)
    (a2.sum() + 2 * b2.sum()).backward()
    assert cs.alpha.grad is not None and cs.alpha.grad.abs().sum() > 0


def test_identity_cross_stitch_reproduces_two_independent_nnets():
    torch.manual_seed(0)
    twin = NNetBackbone(tiny_cfg(**{"MODEL.NNET.CROSS_STITCH_SELF": 1.0}), ShapeSpec(channels=3)).eval()
    single_cfg = tiny_cfg(**{"MODEL.NNET.TWIN": False})
    det, shp = (NNetBackbone(single_cfg, ShapeSpec(channels=3)).eval() for _ in range(2))
    det.nets[0].load_state_dict(twin.nets[0].state_dict())
    shp.nets[0].load_state_dict(twin.nets[1].state_dict())
    assert len(twin.stitches) == 12
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out, o_det, o_shp = twin(x), det(x), shp(x)
    assert set(out) == {"p2", "p3", "p4", "p5", "p6", "h2", "h3", "h4", "h5", "s_h2", "s_h3", "s_h4", "s_h5"}
    for k in ("p2", "p3", "p4", "p5", "p6", "h2", "h3", "h4", "h5"):
        assert torch.equal(out[k], o_det[k]), k
        assert torch.equal(out["s_" + k], o_shp[k]) if k.startswith("h") else True
    assert all(out[f"h{i}"].shape[-2:] == out["p2"].shape[-2:] for i in (2, 3, 4, 5))   # H at P2 resolution
    assert not torch.equal(out["h5"], out["s_h5"])
    # a non-identity alpha couples them
    with torch.no_grad():
        twin.stitches["res3"].alpha.copy_(torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
        assert not torch.equal(twin(x)["h5"], o_det["h5"])


def test_coord_conv_switch_sets_stem_input_channels():
    on = NNetBackbone(tiny_cfg(**{"MODEL.NNET.TWIN": False}), ShapeSpec(channels=3))
    off = NNetBackbone(tiny_cfg(**{"MODEL.NNET.TWIN": False, "MODEL.NNET.COORD_CONV": False}), ShapeSpec(channels=3))
    assert on.nets[0].resnet.stem.conv1.weight.shape[1] == 5
    assert off.nets[0].resnet.stem.conv1.weight.shape[1] == 3


def test_pooling_each_map_equals_pooling_their_concatenation():
    """pool_concatenated (per-map ROIAlign, then concatenate) is the paper's concatenate-then-ROIAlign."""
    from detectron2.modeling.poolers import ROIPooler

    from organmtl.detectron_heads.hmrnet.roi_heads import pool_concatenated

    torch.manual_seed(0)
    feats = {f"s_h{i}": torch.randn(2, 3 + i, 32, 40) for i in (2, 3, 4, 5)}
    boxes = [Boxes(torch.tensor([[3.0, 5.0, 60.0, 70.0], [10.5, 0.0, 159.0, 127.0]])),
             Boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]))]
    pooler = ROIPooler(7, scales=(0.25,), sampling_ratio=0, pooler_type="ROIAlignV2")
    names = list(feats)
    reference = pooler([torch.cat([feats[f] for f in names], dim=1)], boxes)
    got = pool_concatenated(pooler, feats, names, boxes)
    assert got.shape == (3, sum(3 + i for i in (2, 3, 4, 5)), 7, 7)
    torch.testing.assert_close(got, reference, atol=1e-6, rtol=1e-6)
    empty = pool_concatenated(pooler, feats, names, [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))])
    assert empty.shape == (0, reference.shape[1], 7, 7)


def test_alphas_are_logged_every_period_from_one_stacked_copy():
    twin = NNetBackbone(tiny_cfg(**{"MODEL.NNET.LOG_ALPHA_PERIOD": 20}), ShapeSpec(channels=3)).train()
    with torch.no_grad():
        twin.stitches["p3"].alpha.copy_(torch.tensor([[0.7, 0.2], [0.3, 0.6]]))
    x = torch.randn(1, 3, 64, 64)
    logged = {}
    for it in (19, 20):
        with EventStorage(it) as storage:
            twin(x)
            logged[it] = {k: v for k, (v, _) in storage.latest().items() if k.startswith("cross_stitch/")}
    assert logged[19] == {}
    assert len(logged[20]) == 4 * 12
    assert [logged[20][f"cross_stitch/p3/a{rc}"] for rc in ("00", "01", "10", "11")] == pytest.approx([0.7, 0.2, 0.3, 0.6])


def test_level_pooler_follows_eq1_on_equal_stride_maps():
    pooler = HighResolutionLevelPooler(2, levels=4, stride=4, sampling_ratio=0, pooler_type="ROIAlignV2")
    maps = [torch.full((1, 1, 64, 64), float(lvl)) for lvl in (2, 3, 4, 5)]
    # sqrt(wh) = 56 -> level floor(4 + log2(56/224)) = 2 ; 224 -> 4 ; 1000 -> 5 (clamped)
    boxes = Boxes(torch.tensor([[0.0, 0.0, 56.0, 56.0], [0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 250.0, 250.0]]))
    out = pooler(maps, [boxes])
    assert out[:, 0, 0, 0].tolist() == [2.0, 4.0, 4.0]
    assert out.shape == (3, 1, 2, 2)


@pytest.fixture(scope="module")
def batch():
    img = torch.zeros(3, 64, 64)
    img[:, 16:40, 20:44] = 200
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 16.0, 44.0, 40.0]]))
    inst.gt_classes = torch.tensor([1])
    xs = torch.linspace(0, 1, 3)[:-1]
    top = torch.stack([20 + 24 * xs, torch.full_like(xs, 16.0)], 1)
    right = torch.stack([torch.full_like(xs, 44.0), 16 + 24 * xs], 1)
    bottom = torch.stack([44 - 24 * xs, torch.full_like(xs, 40.0)], 1)
    left = torch.stack([torch.full_like(xs, 20.0), 40 - 24 * xs], 1)
    inst.gt_points = torch.cat([top, right, bottom, left])[None]
    return [{"image": img, "instances": inst, "height": 128, "width": 128}]


def _grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_sgd_steps_on_one_image_reduce_the_shape_loss(batch):
    """Gradients reach the SRN and move it the right way: a few SGD steps of the total Eq. 7 loss on
    one image (fixed seed, so the same ROIs are sampled) lower loss_shape."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16})).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    shape = []
    for step in range(6):
        torch.manual_seed(1)
        with EventStorage(step):
            losses = model(batch)
        shape.append(losses["loss_shape"].item())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert shape[-1] < 0.7 * shape[0], shape


def test_losses_reach_only_their_branches_and_alphas_are_logged(batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16}))
    model.train()
    with EventStorage(0) as storage:
        losses = model(batch)
        assert {"loss_cls", "loss_box_reg", "loss_shape", "loss_manifold", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
        assert all(torch.isfinite(v) for v in losses.values())
        assert "cross_stitch/res5/a01" in storage.latest()
    losses["loss_shape"].backward(retain_graph=True)
    heads = model.roi_heads
    assert all(g is None for g in _grads(heads.box_predictor)) and all(g is None for g in _grads(heads.box_head))
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(heads.shape_head))
    model.zero_grad(set_to_none=True)
    losses["loss_cls"].backward(retain_graph=True)
    assert all(g is None for g in _grads(heads.shape_head))
    assert model.backbone.stitches["res5"].alpha.grad is not None   # detection loss also trains the alphas
    model.zero_grad(set_to_none=True)
    losses["loss_manifold"].backward()
    assert all(g is None for g in _grads(heads.shape_head.predictor))   # Eq. 6 acts on the latent before it


@pytest.mark.parametrize("config", ["tiny/hmrnet_R_18_FPN_tiny.yaml", "tiny/hmrnet_R_18_FPN_mask_head_tiny.yaml",
                                    "tiny/hmrnet_R_18_FPN_no_cross_stitch_tiny.yaml"])
def test_inference_outputs_masks_at_output_size(batch, config):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(config, **{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})).eval()
    with torch.no_grad():
        inst = model([{k: batch[0][k] for k in ("image", "height", "width")}])[0]["instances"]
    assert len(inst) > 0
    assert inst.pred_masks.shape[1:] == (128, 128) and inst.pred_masks.dtype == torch.bool
    drawn = Visualizer(np.zeros((128, 128, 3), np.uint8)).draw_instance_predictions(inst[:3]).get_image()
    assert drawn.shape == (128, 128, 3)                                       # Detectron2's Visualizer as is
    if "mask_head" in config:
        assert not inst.has("pred_points")
    else:
        assert inst.pred_points.shape == (len(inst), 8, 2)


# the 8 box-normalised points (u, v) the predictor is forced to output: corners and edge midpoints
FORCED_UV = torch.tensor([[0, -1], [1, -1], [1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1]], dtype=torch.float32)


def test_inference_decodes_points_with_the_predicted_box_and_rescales_to_the_output_size(batch):
    """§2.4 rescaling: with the SRN forced to output the box corners and edge midpoints, every predicted
    point lies on its (rescaled) predicted box in output pixels, here 192 x 128 for a 64 x 64 input
    (x scaled by 3, y by 2), and the rasterised mask fills that box."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})).eval()
    with torch.no_grad():
        model.roi_heads.shape_head.predictor.weight.zero_()
        model.roi_heads.shape_head.predictor.bias.copy_(FORCED_UV.flatten())
        inst = model([{"image": batch[0]["image"], "height": 128, "width": 192}])[0]["instances"]
    assert len(inst) > 0 and inst.image_size == (128, 192)
    box = inst.pred_boxes.tensor
    assert box[:, 2].max() > 64                                        # boxes are in output pixels (x 3)
    centre, half = (box[:, :2] + box[:, 2:]) / 2, (box[:, 2:] - box[:, :2]) / 2
    expected = centre[:, None] + FORCED_UV[None] * half[:, None]
    torch.testing.assert_close(inst.pred_points, expected, atol=1e-3, rtol=0)
    big = ((box[:, 2:] - box[:, :2]) >= 8).all(1)
    assert big.any()
    for m, b in zip(inst.pred_masks[big], box[big]):
        ys, xs = torch.nonzero(m, as_tuple=True)
        got = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        torch.testing.assert_close(got, b, atol=1.0, rtol=0)           # the mask is the box, to a pixel


def test_inference_without_detections(batch):
    model = build_model(tiny_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 1.01})).eval()
    with torch.no_grad():
        inst = model([{k: batch[0][k] for k in ("image", "height", "width")}])[0]["instances"]
    assert len(inst) == 0
    assert inst.pred_points.shape == (0, 8, 2) and inst.pred_masks.shape == (0, 128, 128)


def _full_cfg(path):
    cfg = get_cfg()
    add_organmtl_config(cfg)
    add_hmrnet_config(cfg)
    cfg.merge_from_file(path)
    return cfg


def test_manifest_lists_every_yaml_and_each_merges():
    """The hmrnet manifest is derived from the two config folders (generic base + baselines, HMR-Net's
    own); every listed file merges through its _BASE_ chain into a config with the method it names."""
    from pathlib import Path

    from organmtl.plugins.builtin import HMRNET

    root = Path(str(resources.files("organmtl.detectron_heads")))
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}
    listed = {ref.split(":", 1)[1] for ref in HMRNET.detectron_configs}
    assert listed == on_disk and len(listed) == 12
    assert "hmrnet/configs/Base-HMRNet.yaml" in listed and "configs/Base-OMTL-RCNN-FPN.yaml" in listed
    for path in HMRNET.config_paths():
        cfg = _full_cfg(path)
        name = Path(path).name
        if name.startswith("hmrnet_"):
            assert cfg.MODEL.META_ARCHITECTURE == "HMRNetRCNN" and cfg.MODEL.ROI_HEADS.NAME == "HMRNetROIHeads", name
        elif name.startswith("mask_rcnn_"):
            assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON, name
        assert cfg.SOLVER.NESTEROV and cfg.SOLVER.WEIGHT_DECAY == pytest.approx(1e-4), name   # from the shared base


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_paper_batch_scales_with_gpus_by_reference_world_size(gpus):
    """The documented multi-GPU rule: batch 3 does not divide over 2/4/8 GPUs (Detectron2's loader
    refuses it); with SOLVER.REFERENCE_WORLD_SIZE 1 Detectron2's trainer scales to 3N images, lr x N
    and iterations / N."""
    from detectron2.engine import DefaultTrainer

    cfg = _full_cfg(str(CONFIGS / "hmrnet_R_50_FPN.yaml"))
    assert cfg.SOLVER.IMS_PER_BATCH == 3 and cfg.SOLVER.IMS_PER_BATCH % gpus != 0
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 1
    scaled = DefaultTrainer.auto_scale_workers(cfg, gpus)
    assert scaled.SOLVER.IMS_PER_BATCH == 3 * gpus and scaled.SOLVER.IMS_PER_BATCH % gpus == 0
    assert scaled.SOLVER.BASE_LR == pytest.approx(0.001 * gpus)
    assert scaled.SOLVER.MAX_ITER == round(cfg.SOLVER.MAX_ITER / gpus)
    assert scaled.SOLVER.STEPS == tuple(round(s / gpus) for s in cfg.SOLVER.STEPS)


def test_r50_configs_follow_the_paper_schedule_and_tiny_ones_say_otherwise():
    """§3.2: lr 0.001 with Keras decay 1e-6 (lr_t = 0.001 / (1 + 1e-6 t)), no warm-up, no steps."""
    from detectron2.solver import build_optimizer

    from organmtl.detectron_heads.train_net import Trainer

    for name in ("hmrnet_R_50_FPN.yaml", "hmrnet_R_50_FPN_no_manifold.yaml", "hmrnet_R_50_FPN_mask_head.yaml",
                 "../../configs/mask_rcnn_R_50_FPN_baseline.yaml"):
        cfg = get_cfg()
        add_organmtl_config(cfg)
        add_hmrnet_config(cfg)
        cfg.merge_from_file(str(CONFIGS / name))
        s = cfg.SOLVER
        assert (s.LR_SCHEDULER_NAME, s.BASE_LR, s.INVERSE_TIME_DECAY, s.WARMUP_ITERS, tuple(s.STEPS)) == \
            ("WarmupInverseTimeDecayLR", 0.001, 1e-6, 0, ()), name
    cfg.SOLVER.MAX_ITER = 30000
    opt = build_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = Trainer.build_lr_scheduler(cfg, opt)               # what train_net.py trains with
    lrs = {}
    for it in range(30000):
        if it in (0, 1, 10000, 29999):
            lrs[it] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert lrs == pytest.approx({t: 0.001 / (1 + 1e-6 * t) for t in lrs}, rel=1e-6)
    tiny = tiny_cfg()
    assert tiny.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and tiny.SOLVER.BASE_LR == 0.01


@pytest.mark.parametrize("config", ["hmrnet_R_18_FPN_tiny", "hmrnet_R_18_FPN_no_manifold_tiny",
                                    "hmrnet_R_18_FPN_no_cross_stitch_tiny", "hmrnet_R_18_FPN_mask_head_tiny"])
def test_each_tiny_ablation_config_trains_the_parts_it_names(batch, config):
    """The shipped tiny ablation configs (Tables 5-6 and §2.4's parts; ``train_net.py`` runs the full one and
    the Mask R-CNN baseline in tests/e2e/test_hmrnet_e2e.py): one training forward gives the shape loss unless
    the mask head replaces it, the manifold loss only where the config keeps it, and cross-stitch alphas only
    for the twin N-Net."""
    from detectron2.structures import BitMasks

    torch.manual_seed(0)
    model = build_model(tiny_cfg(f"tiny/{config}.yaml", **{"MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16})).train()
    inputs = [dict(b) for b in batch]
    inst = Instances((64, 64), **{k: v for k, v in batch[0]["instances"].get_fields().items()})
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 16:40, 20:44] = True
    inst.gt_masks = BitMasks(masks)
    inputs[0]["instances"] = inst
    with EventStorage(0) as storage:
        losses = model(inputs)
        logged = set(storage.latest())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert ("loss_shape" in losses) == ("mask_head" not in config)
    assert ("loss_mask" in losses) == ("mask_head" in config)
    assert ("loss_manifold" in losses) == (config in ("hmrnet_R_18_FPN_tiny", "hmrnet_R_18_FPN_no_cross_stitch_tiny"))
    assert ("cross_stitch/res5/a01" in logged) == ("no_cross_stitch" not in config)
