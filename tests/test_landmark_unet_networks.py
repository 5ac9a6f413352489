"""Landmark U-Net parts on nnU-Net's own U-Net: tails and heads (thesis §2.5 Table 3; landmark-input
U-Net §3.4.1, §3.6), losses against hand-computed values (thesis Eq. 1, 3, 9; per-organ BCE §3.4.3),
gradients reaching only the intended parameters, landmark localisation in mm, the thesis CT window,
and a tiny network overfitting a tiny phantom."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from organmtl.converters.landmark_encoding import gaussian_heatmap
from organmtl.nnunet_trainers.landmarks.aux_trainers import (nnUNetTrainerOMTLLandmarkJoint,
                                                             nnUNetTrainerOMTLLandmarkJointLite,
                                                             nnUNetTrainerOMTLLandmarkJointThesisCT,
                                                             nnUNetTrainerOMTLLandmarkUncertainty)
from organmtl.nnunet_trainers.landmarks.channels import PLANS_KEY, LandmarkChannels, LandmarkChannelsError
from organmtl.nnunet_trainers.landmarks.input_trainers import (nnUNetTrainerOMTLLandmarkLateFusion,
                                                               region_dataset_json)
from organmtl.nnunet_trainers.landmarks.localisation import local_peaks, patch_landmark_errors
from organmtl.nnunet_trainers.landmarks.losses import PerOrganBCELoss, UncertaintyWeighting, heatmap_mse
from organmtl.nnunet_trainers.landmarks.networks import (LandmarkTailUNet, LateFusionUNet, MultiTaskBlockUNet,
                                                         ThesisCTWindow)


def _arch(dim):
    conv, norm = ("torch.nn.Conv3d", "torch.nn.InstanceNorm3d") if dim == 3 else ("torch.nn.Conv2d", "torch.nn.InstanceNorm2d")
    return {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": conv,
                            "kernel_sizes": [[3] * dim] * 3, "strides": [[1] * dim] + [[2] * dim] * 2,
                            "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                            "norm_op": norm, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def _unet(dim, n_in, n_out, ds=True):
    a = _arch(dim)
    return get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], n_in, n_out,
                                  allow_init=True, deep_supervision=ds)


def _plans(dim, lc: LandmarkChannels, schemes=("CTNormalization",)):
    from dataclasses import asdict
    cfg = {"data_identifier": "x", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [16] * dim, "spacing": [1.0] * dim, "normalization_schemes": list(schemes) + ["NoNormalization"],
           "use_mask_for_norm": [False] * (len(schemes) + 1), "architecture": _arch(dim), "batch_dice": False,
           PLANS_KEY: asdict(lc)}
    pm = PlansManager({"dataset_name": "Dataset999_T", "plans_name": "nnUNetPlans", "configurations": {"c": cfg},
                       "foreground_intensity_properties_per_channel": {"0": {"mean": 40.0, "std": 200.0}},
                       "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                       "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager"})
    return pm, pm.get_configuration("c")


# ------------------------------------------------------------------ channels

def test_landmark_channels_from_dataset_json_and_errors():
    dj = {"channel_names": {"0": "fat", "1": "water", "2": "noNorm", "3": "noNorm"},
          "organmtl_landmark_channels": {"encoding": "heatmap", "channels": {"2": "hip_left", "3": "hip_right"},
                                         "landmarks": ["hip_left", "hip_right"], "sigma_mm": 5.0}}
    lc = LandmarkChannels.from_dataset_json(dj)
    assert (lc.n_image, lc.n_landmark, lc.merged, lc.channel_names) == (2, 2, False, ("hip_left", "hip_right"))
    merged = dict(dj, channel_names={"0": "CT", "1": "noNorm"},
                  organmtl_landmark_channels={"encoding": "heatmap", "channels": {"1": "max(a, b)"}, "landmarks": ["a", "b"]})
    assert LandmarkChannels.from_dataset_json(merged).merged
    with pytest.raises(LandmarkChannelsError, match="--landmark-channels"):
        LandmarkChannels.from_dataset_json({"channel_names": {"0": "CT"}}, "Dataset1_X")
    with pytest.raises(LandmarkChannelsError, match="must be the last channels"):
        LandmarkChannels.from_dataset_json(dict(dj, organmtl_landmark_channels={"encoding": "heatmap", "channels": {"0": "a"}}))


def test_region_dataset_json_one_region_per_organ():
    dj = {"labels": {"background": 0, "liver": 1, "spleen": 2}, "channel_names": {"0": "CT"}}
    out = region_dataset_json(dj)
    assert out["labels"] == {"background": 0, "liver": [1, 1], "spleen": [2, 2]} and out["regions_class_order"] == [1, 2]
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    lm = LabelManager(out["labels"], out["regions_class_order"])
    assert lm.has_regions and lm.num_segmentation_heads == 2
    assert dj["labels"]["liver"] == 1                      # the input is not modified
    with pytest.raises(ValueError, match="ignore"):
        region_dataset_json({"labels": {"background": 0, "a": 1, "ignore": 2}})


# ------------------------------------------------------------------ networks

@pytest.mark.parametrize("dim", [2, 3])
def test_landmark_tail_outputs_and_gradients(dim):
    torch.manual_seed(0)
    net = LandmarkTailUNet(_unet(dim, 2, 3), n_image=2, n_landmark=2)
    x = torch.randn((2, 4, *[16] * dim))                      # 2 image + 2 heatmap channels
    assert net.decoder is net.unet.decoder
    assert net.landmark_tail[1].out_channels == 2
    seg = net(x)                                              # default: what nnU-Net's predictor expects
    assert isinstance(seg, list) and seg[0].shape == (2, 3, *[16] * dim)
    net.outputs = "both"
    seg, heat = net(x)
    assert heat.shape == (2, 2, *[16] * dim)
    # the heatmap channels of the input are targets, never inputs
    x2 = x.clone()
    x2[:, 2:] = torch.randn_like(x2[:, 2:])
    seg2, heat2 = net(x2)
    torch.testing.assert_close(heat, heat2)
    torch.testing.assert_close(seg[0], seg2[0])
    # landmark loss reaches the tail and the shared U-Net, never the segmentation layers
    net.zero_grad()
    heatmap_mse(heat, torch.zeros_like(heat)).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.unet.decoder.seg_layers.parameters())
    assert all(p.grad.abs().sum() > 0 for p in net.landmark_tail.parameters())
    assert net.unet.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    # segmentation loss never reaches the landmark tail
    net.zero_grad()
    seg, heat = net(x)
    seg[0].sum().backward()
    assert all(p.grad is None for p in net.landmark_tail.parameters())
    net.outputs = "landmarks"
    assert net(x).shape == heat.shape


def test_landmark_tail_keeps_heatmaps_for_validation():
    net = LandmarkTailUNet(_unet(2, 1, 2, ds=False), n_image=1, n_landmark=1).eval()
    net.keep_landmarks = True
    with torch.no_grad():
        seg = net(torch.randn(1, 2, 16, 16))
    assert seg.shape == (1, 2, 16, 16) and net.last_landmarks.shape == (1, 1, 16, 16)


def test_trainer_builds_networks_from_plans_and_thesis_ct_window():
    lc = LandmarkChannels(n_image=1, n_landmark=1, encoding="heatmap", channel_names=("max(a, b)",), landmarks=("a", "b"),
                          sigma_mm=5.0)
    pm, cm = _plans(3, lc)
    net = nnUNetTrainerOMTLLandmarkUncertainty.build_network_architecture(pm, cm, 2, 3, True)
    assert isinstance(net, LandmarkTailUNet) and "task_weighting.log_vars" in net.state_dict()
    assert net.unet.encoder.stages[0][0].convs[0].conv.in_channels == 1
    net = nnUNetTrainerOMTLLandmarkJointThesisCT.build_network_architecture(pm, cm, 2, 3, True)
    window = net.input_transform
    assert isinstance(window, ThesisCTWindow)
    hu = torch.tensor([-3000.0, -1024.0, 0.0, 40.0, 500.0, 1024.0, 2000.0])
    z = ((hu - 40.0) / 200.0).view(1, 1, -1)                  # what nnU-Net's CTNormalization fed the network
    expected = torch.tensor([-1024.0, -1024.0, 0.0, 40.0, 500.0, 1024.0, 1024.0]) / 500.0
    torch.testing.assert_close(window(z)[0, 0], expected, rtol=0, atol=1e-5)
    assert not any("mean" in k or "std" in k for k in net.state_dict() if k.startswith("input_transform"))
    late = nnUNetTrainerOMTLLandmarkLateFusion.build_network_architecture(pm, cm, 2, 3, False)
    assert isinstance(late, LateFusionUNet)
    with pytest.raises(ValueError, match="CTNormalization"):
        ThesisCTWindow.from_plans(*_plans(3, lc, schemes=("ZScoreNormalization",)))


def test_tail_cost_thesis_width_vs_lite_on_an_nnunet_sized_plan():
    """The thesis tail repeats the full-resolution decoder stage (+~40% FLOPs per training step against
    the stock U-Net on a 3d_fullres-like plan, 32-256 features); the Lite tail (a quarter as wide)
    stays under +10%."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from torch.utils.flop_counter import FlopCounterMode

    lc = LandmarkChannels(n_image=1, n_landmark=2, encoding="heatmap", channel_names=("a", "b"), landmarks=("a", "b"),
                          sigma_mm=5.0)
    pm, cm = _plans(3, lc)
    cm.configuration["architecture"]["arch_kwargs"].update(
        n_stages=4, features_per_stage=[32, 64, 128, 256], kernel_sizes=[[3, 3, 3]] * 4, strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
        n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3)
    x = torch.randn(1, 3, 16, 16, 16)

    def flops(net, inp):
        with FlopCounterMode(display=False) as fc:
            out = net(inp)
            outs = [o for group in (out if isinstance(out, tuple) else (out,)) for o in group]
            sum(o.sum() for o in outs).backward()
        return fc.get_total_flops()

    stock = flops(nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, True), x[:, :1])
    ratios = {}
    for cls in (nnUNetTrainerOMTLLandmarkJoint, nnUNetTrainerOMTLLandmarkJointLite):
        net = cls.build_network_architecture(pm, cm, 3, 3, True)
        net.outputs = "both"
        ratios[cls.__name__] = flops(net, x) / stock
    assert net.landmark_tail[0].convs[0].conv.out_channels == 8     # Lite: 32 / 4
    assert 1.3 < ratios["nnUNetTrainerOMTLLandmarkJoint"] < 1.5, ratios
    assert ratios["nnUNetTrainerOMTLLandmarkJointLite"] < 1.1, ratios


@pytest.mark.parametrize("dim", [2, 3])
def test_late_fusion_map_bypasses_encoder(dim):
    torch.manual_seed(0)
    net = LateFusionUNet(_unet(dim, 2, 3), n_image=2, n_landmark=1)
    assert net.unet.encoder.stages[0][0].convs[0].conv.in_channels == 2
    head = net.unet.decoder.seg_layers[-1]
    assert head.conv.in_channels == 4 + 1                     # last decoder features + the map
    x = torch.randn((1, 3, *[16] * dim), requires_grad=True)
    out = net(x)
    assert out[0].shape == (1, 3, *[16] * dim) and head.maps is None
    low_res = sum(o.sum() for o in out[1:])                   # deep-supervision outputs never see the map
    assert torch.autograd.grad(low_res, x, retain_graph=True)[0][0, 2].abs().sum() == 0
    # the map only reaches the full-resolution output, through a 1x1 conv: its gradient at a voxel is
    # the head's map weights summed over classes, whatever the encoder does
    out[0].sum().backward()
    per_voxel = head.conv.weight[:, -1].sum().detach()
    torch.testing.assert_close(x.grad[0, 2], torch.full_like(x.grad[0, 2], float(per_voxel)))


@pytest.mark.parametrize("dim", [2, 3])
def test_multitask_block_one_head_per_organ(dim):
    torch.manual_seed(0)
    net = MultiTaskBlockUNet(_unet(dim, 1, 3, ds=False), n_image=1, n_organs=3)
    block = net.unet.decoder.seg_layers[-1]
    assert len(block.organs) == 3
    out = net(torch.randn((1, 1, *[16] * dim)))
    assert out.shape == (1, 3, *[16] * dim)
    out[:, 1].sum().backward()                               # organ 1's loss
    assert all(p.grad.abs().sum() > 0 for p in block.organs[1].parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for k in (0, 2) for p in block.organs[k].parameters())


# ------------------------------------------------------------------ losses

def test_heatmap_mse_by_hand():
    pred = torch.tensor([[[0.5, 1.0], [0.0, 0.25]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert float(heatmap_mse(pred, target)) == pytest.approx((0.25 + 0 + 0 + 0.0625) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        heatmap_mse(pred, target[..., :1])


def test_uncertainty_weighting_eq9_by_hand_and_gradients():
    w = UncertaintyWeighting(("segmentation", "landmarks"), (1.0, 2.0))
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([math.log(4.0), math.log(0.25)]))   # s^2 = 4 and 1/4
    l_seg, l_lm = torch.tensor(2.0), torch.tensor(0.5)
    # Eq. 9: L_t / (C_t s_t^2) + log s_t
    expected = 2.0 / (1 * 4.0) + math.log(2.0) + 0.5 / (2 * 0.25) + math.log(0.5)
    total = w([l_seg, l_lm])
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
    total.backward()
    # dL/dv_t = -exp(-v_t) L_t / C_t + 1/2
    torch.testing.assert_close(w.log_vars.grad, torch.tensor([-2.0 / 4.0 + 0.5, -0.5 * 4.0 / 2.0 + 0.5]))
    assert w.as_dict() == pytest.approx({"segmentation": math.log(4.0), "landmarks": math.log(0.25)})


@pytest.mark.parametrize("weight_dice", [0.0, 1.0])
def test_per_organ_bce_sum_by_hand(weight_dice):
    logits = torch.tensor([[[[0.0, 2.0]], [[-1.0, 1.0]]]])        # (B=1, organs=2, 1, 2)
    target = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])
    bce = lambda z, y: -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))
    organ0 = (bce(0.0, 0) + bce(2.0, 1)) / 2
    organ1 = (bce(-1.0, 1) + bce(1.0, 1)) / 2
    expected = organ0 + organ1
    if weight_dice:
        p = torch.sigmoid(logits)[0, :, 0]
        dice = [(2 * (p[k] * target[0, k, 0]).sum() + 1e-5) / (p[k].sum() + target[0, k, 0].sum() + 1e-5) for k in range(2)]
        expected += sum(1 - float(d) for d in dice)
    assert float(PerOrganBCELoss(weight_dice)(logits, target)) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------ localisation

def test_patch_landmark_errors_per_landmark_and_anisotropic():
    spacing = (2.0, 0.5, 1.0)
    target = torch.from_numpy(gaussian_heatmap((8, 12, 10), spacing, [(3, 5, 4)], sigma_mm=2.0))
    pred = torch.from_numpy(gaussian_heatmap((8, 12, 10), spacing, [(4, 7, 4)], sigma_mm=2.0))
    errors = patch_landmark_errors(pred[None, None], target[None, None], spacing, merged=False)
    np.testing.assert_allclose(errors, [math.hypot(1 * 2.0, 2 * 0.5)])
    # a landmark outside the patch (target below the threshold everywhere) is not scored
    far = torch.from_numpy(gaussian_heatmap((8, 12, 10), spacing, [(3, 5, 20)], sigma_mm=2.0))
    assert patch_landmark_errors(pred[None, None], far[None, None], spacing, merged=False).size == 0


def test_patch_landmark_errors_merged_map_voronoi():
    spacing = (1.0, 1.0)
    target = torch.from_numpy(gaussian_heatmap((20, 30), spacing, [(5, 5), (12, 24)], sigma_mm=2.0))
    # prediction: first blob one voxel off, second blob three voxels off and weaker
    pred = torch.from_numpy(np.maximum(gaussian_heatmap((20, 30), spacing, [(5, 6)], sigma_mm=2.0),
                                       0.6 * gaussian_heatmap((20, 30), spacing, [(12, 21)], sigma_mm=2.0)))
    assert [tuple(p) for p in local_peaks(target, 0.9)] == [(5, 5), (12, 24)]
    errors = patch_landmark_errors(pred[None, None], target[None, None], spacing, merged=True)
    np.testing.assert_allclose(sorted(errors), [1.0, 3.0])


# ------------------------------------------------------------------ overfitting

def test_tiny_landmark_unet_overfits_a_phantom(one_torch_thread):   # tiny convolutions: threads only add overhead
    """Segmentation + heatmap of one 2D phantom: after training, the argmax of the predicted heatmap
    is the landmark and the disc is segmented (Dice > 0.9)."""
    torch.manual_seed(0)
    yy, xx = np.mgrid[:16, :16]
    disc = ((yy - 7) ** 2 + (xx - 9) ** 2) < 12
    image = torch.from_numpy(disc.astype(np.float32) + 0.1 * np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32))
    heat = torch.from_numpy(gaussian_heatmap((16, 16), (1.0, 1.0), [(12, 3)], sigma_mm=1.5))
    x = torch.stack([image, heat])[None]
    seg_target = torch.from_numpy(disc.astype(np.int64))[None]
    net = LandmarkTailUNet(_unet(2, 1, 2, ds=False), n_image=1, n_landmark=1)
    net.outputs = "both"
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(120):
        opt.zero_grad()
        seg, h = net(x)
        loss = F.cross_entropy(seg, seg_target) + 10 * heatmap_mse(h, x[:, 1:])
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        seg, h = net(x)
    pred = (seg.argmax(1)[0] == 1).numpy()
    dice = 2 * (pred & disc).sum() / (pred.sum() + disc.sum())
    assert dice > 0.9
    errors = patch_landmark_errors(h, x[:, 1:], (1.0, 1.0), merged=False)
    assert errors.size == 1 and errors[0] <= 1.0
