"""FocusNetv2 losses against hand computation (Gao et al., "FocusNetv2: Imbalanced large and small
organ segmentation with adversarial shape constraint for head and neck CT images", Eq. 1-8;
docs/focusnetv2.md), the phase schedule, and the trainer steps: each phase and the alternating G/D
steps update only their parameters."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from organmtl.nnunet_trainers.focusnet import losses as L
from organmtl.nnunet_trainers.focusnet import options as O
from organmtl.nnunet_trainers.focusnet.network import FocusNet
from organmtl.nnunet_trainers.focusnet.trainers import (nnUNetTrainerOMTLFocusNetV1, nnUNetTrainerOMTLFocusNetV2,
                                                        nnUNetTrainerOMTLFocusNetV2OriginAE)
from organmtl.nnunet_trainers.settings import resolve


def test_alpha_inversely_proportional_to_size():
    a = L.alpha_from_sizes([100.0, 10.0, 0.0, 50.0])
    inv = np.array([1 / 100, 1 / 10, 1 / 10, 1 / 50])
    np.testing.assert_allclose(a.numpy(), inv / inv.sum(), rtol=1e-6)


def test_focal_class_weights_by_hand():
    # sizes 80 / 15 / 5: alpha_c = sum(s) / (C s_c) = 100 / (3 s_c)
    a = L.focal_class_weights([80.0, 15.0, 5.0])
    np.testing.assert_allclose(a.numpy(), [100 / 240, 100 / 45, 100 / 15], rtol=1e-6)
    f = np.array([0.80, 0.15, 0.05])
    assert abs(float((f * a.numpy()).sum()) - 1.0) < 1e-6          # voxel-frequency-weighted mean 1
    np.testing.assert_allclose(L.focal_class_weights([80.0, 0.0, 5.0]).numpy(), [90 / 240, 90 / 15, 90 / 15],
                               rtol=1e-6)                          # unseen class: the smallest seen size


#: voxels per class of one demo head-and-neck case (organmtl.demo_data.han, 32 x 80 x 80, seed 0):
#: background, brainstem, chiasm, optic nerves L/R, mandible, parotid L, submandibular L, parotid R, submandibular R
DEMO_HAN_VOXELS = [198678, 1327, 67, 47, 37, 2094, 1021, 274, 1024, 231]


def test_snet_focal_term_is_not_negligible_against_dice_at_initialisation():
    """Eq. 3 at a uniform prediction on the demo class sizes: the focal term of the trainer's weights
    counts (weights summing to 1 gave focal 0.001 vs Dice 9.8 and a 37x smaller gradient)."""
    counts = torch.tensor(DEMO_HAN_VOXELS)
    t = torch.repeat_interleave(torch.arange(len(counts)), counts)
    t = t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(0))].view(1, 32, 80, 80)
    tr = object.__new__(nnUNetTrainerOMTLFocusNetV2)
    tr.organ_sizes_mm3 = {c: float(n) for c, n in enumerate(DEMO_HAN_VOXELS)}
    tr.label_manager = SimpleNamespace(num_segmentation_heads=len(counts), ignore_label=None)
    loss = tr._build_loss()
    z = torch.zeros(1, len(counts), 32, 80, 80, requires_grad=True)
    focal = loss.focal(z, t)
    g_focal, = torch.autograd.grad(focal, z)
    onehot = torch.nn.functional.one_hot(t, len(counts)).movedim(-1, 1).float()
    dice = L.generalised_dice_loss(torch.softmax(z, 1), onehot)
    g_dice, = torch.autograd.grad(dice, z)
    # unweighted focal at p_t = 1/C is (1 - 1/C)^2 log C; the mean weight 1 keeps exactly that value
    assert abs(float(focal) - (1 - 1 / len(counts)) ** 2 * math.log(len(counts))) < 1e-3
    assert float(dice) / float(focal) < 10
    ratio = float(g_focal.norm() / g_dice.norm())
    assert 1 / 10 < ratio < 100, ratio         # measured 41: the weight sits on the rare small-organ voxels


def test_weighted_focal_loss_by_hand():
    # two voxels, three classes; voxel 0 is class 0, voxel 1 class 2
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]).T.reshape(1, 3, 2, 1, 1)
    target = torch.tensor([0, 2]).reshape(1, 1, 2, 1, 1)
    alpha = [0.2, 0.3, 0.5]
    p = torch.softmax(logits[0, :, :, 0, 0], 0)
    p0, p1 = float(p[0, 0]), float(p[2, 1])
    hand = (-0.2 * (1 - p0) ** 2 * math.log(p0) - 0.5 * (1 - p1) ** 2 * math.log(p1)) / 2
    assert abs(float(L.WeightedFocalLoss(alpha)(logits, target)) - hand) < 1e-6
    # ignored voxels do not count
    t_ign = torch.tensor([0, 9]).reshape(1, 1, 2, 1, 1)
    hand0 = -0.2 * (1 - p0) ** 2 * math.log(p0)
    assert abs(float(L.WeightedFocalLoss(alpha, ignore_label=9)(logits, t_ign)) - hand0) < 1e-6


def test_generalised_dice_loss_by_hand():
    probs = torch.tensor([[0.8, 0.3], [0.2, 0.7]]).reshape(1, 2, 2, 1, 1)     # classes x voxels
    onehot = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 2, 1, 1)
    # class 0: 1 - 2*0.8/(1 + 1.1); class 1: 1 - 2*0.7/(1 + 0.9)
    hand = (1 - 1.6 / 2.1) + (1 - 1.4 / 1.9)
    assert abs(float(L.generalised_dice_loss(probs, onehot, smooth=0.0)) - hand) < 1e-6


def test_segmentation_loss_is_focal_plus_lambda_dice():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, 5)
    target = torch.randint(0, 4, (2, 1, 3, 5, 5))
    alpha = [0.1, 0.2, 0.3, 0.4]
    onehot = torch.nn.functional.one_hot(target[:, 0], 4).movedim(-1, 1).float()
    expected = L.WeightedFocalLoss(alpha)(logits, target) + L.generalised_dice_loss(torch.softmax(logits, 1), onehot)
    torch.testing.assert_close(L.SegmentationLoss(alpha)(logits, target), expected)


def test_binary_segmentation_loss_by_hand():
    prob = torch.tensor([0.9, 0.2]).reshape(1, 2, 1, 1)
    mask = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1)
    focal = (-0.7 * 0.1 ** 2 * math.log(0.9) - 0.3 * 0.2 ** 2 * math.log(0.8)) / 2
    dice = (1 - 2 * 0.9 / (1 + 1.1)) + (1 - 2 * 0.8 / (1 + 0.9))
    assert abs(float(L.binary_segmentation_loss(prob, mask, alpha_fg=0.7)) - (focal + dice)) < 1e-5


def test_aae_losses_by_hand():
    y, ry = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0])
    g, rg = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])
    assert float(L.reconstruction_loss(ry, y, rg, g)) == pytest.approx(0.25 / 2 + 1 / 2)      # Eq. 4
    assert float(L.reconstruction_loss(ry, y)) == pytest.approx(0.125)
    fy = [torch.tensor([1.0, 2.0]), torch.tensor([[2.0]])]
    fg = [torch.tensor([1.0, 0.0]), torch.tensor([[3.0]])]
    ls = L.shape_loss(fy, fg)                            # Eq. 5, per scale mse(a, b) / (mean a^2 + mean b^2)
    # scale 1: mse (0 + 4) / 2 = 2 over (1 + 4) / 2 + (1 + 0) / 2 = 3; scale 2: mse 1 over 4 + 9 = 13
    expected = 2 / 3 + 1 / 13
    assert float(ls) == pytest.approx(expected, rel=1e-5)
    assert float(L.generator_loss(torch.tensor(1.0), ls)) == pytest.approx(1 + 5 * expected, rel=1e-5)       # Eq. 7
    assert float(L.discriminator_loss(torch.tensor(2.0), ls)) == pytest.approx(2 - 0.001 * expected, rel=1e-6)  # Eq. 8
    assert float(L.shape_loss([torch.tensor([1.0, -1.0])], [torch.tensor([-1.0, 1.0])])) == pytest.approx(2.0)  # the bound


def _tiny_shape_ae(roi=(8, 24, 24)):
    from organmtl.nnunet_trainers.focusnet.shape_ae import ShapeAutoencoder
    torch.manual_seed(0)
    ae = ShapeAutoencoder(roi, channels=(8, 16, 16, 32), latent=64)
    gt = torch.zeros(2, 1, *roi)
    gt[0, 0, 2:5, 4:10, 5:12] = 1
    gt[1, 0, 1:4, 6:12, 3:9] = 1
    return ae, gt, 0.6 * torch.roll(gt, (1, 1), (3, 4))


def test_shape_loss_ignores_a_rescaling_that_leaves_the_reconstruction_unchanged():
    """The latent code times 10 (fc_latent x 10, fc_decode's weight / 10) and the first decoder features
    times 10 (the batch norm's affine parameters before their ReLU x 10; the next batch norm renormalises)
    give the same reconstruction; the plain Eq. 5 distance grew by 100 on those scales."""
    ae, gt, pred = _tiny_shape_ae()
    x = torch.cat([gt, pred])
    rec0, f0 = ae(x)
    with torch.no_grad():
        ae.fc_latent.weight.mul_(10)
        ae.fc_latent.bias.mul_(10)
        ae.fc_decode.weight.div_(10)
        bn = ae.up1[1][1]
        bn.weight.mul_(10)
        bn.bias.mul_(10)
    rec1, f1 = ae(x)
    torch.testing.assert_close(rec1, rec0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(f1[0], 10 * f0[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f1[2], 10 * f0[2], rtol=1e-4, atol=1e-4)
    before = L.shape_loss([f[:2] for f in f0], [f[2:] for f in f0]).item()
    after = L.shape_loss([f[:2] for f in f1], [f[2:] for f in f1]).item()
    assert after == pytest.approx(before, rel=1e-4)


def test_repeated_d_steps_keep_the_shape_loss_bounded():
    """Eq. 8's D step (Adam, lr 5e-4 as the trainer) 80 times on fixed masks after 20 pre-training
    steps: the plain squared distance grew from 0.75 to 361 here (the autoencoder inflated its
    features' scale, docs/focusnetv2.md "Shape loss scale"); the scale-free one stays below its bound,
    2 per scale."""
    ae, gt, pred = _tiny_shape_ae()
    opt = torch.optim.Adam(ae.parameters(), lr=5e-4)
    for _ in range(20):
        rec, _ = ae(gt)
        opt.zero_grad()
        L.reconstruction_loss(rec, gt).backward()
        opt.step()
    values = []
    for _ in range(80):
        rec, feats = ae(torch.cat([gt, pred]))
        ls = L.shape_loss([f[:2] for f in feats], [f[2:] for f in feats])
        values.append(ls.item())
        opt.zero_grad()
        L.discriminator_loss(L.reconstruction_loss(rec[:2], gt, rec[2:], pred), ls, 0.001).backward()
        opt.step()
    assert max(values) < 2 * len(feats), values[::10]


def _env_options(monkeypatch, **env) -> O.FocusNetOptions:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return resolve(O.FocusNetOptions).options


def test_phase_schedule_and_parsing(monkeypatch):
    assert O.phase_schedule(O.ALL_PHASES, 10) == [("snet", 4), ("sol", 1), ("ae", 1), ("sos", 2), ("joint", 2)]
    assert O.phase_schedule(("snet",), 7) == [("snet", 7)]
    # fewer epochs than phases: every phase still runs once
    assert [n for _, n in O.phase_schedule(O.ALL_PHASES, 2)] == [1, 1, 1, 1, 1]
    opts = _env_options(monkeypatch, ORGANMTL_FOCUSNET_PHASE_EPOCHS="snet=2,sol=0,ae=1,sos=1,joint=1")
    sched = O.phase_schedule(O.ALL_PHASES, 0, opts.explicit_phase_epochs(O.ALL_PHASES))
    assert sched == [("snet", 2), ("ae", 1), ("sos", 1), ("joint", 1)]
    assert [O.phase_at(sched, e) for e in range(6)] == ["snet", "snet", "ae", "sos", "joint", "joint"]
    # phases the variant does not run are ignored (one setting for every trainer)
    opts = _env_options(monkeypatch, ORGANMTL_FOCUSNET_PHASE_EPOCHS="snet=3,ae=2")
    assert opts.explicit_phase_epochs(("snet", "sol")) == {"snet": 3}
    monkeypatch.setenv("ORGANMTL_FOCUSNET_PHASE_EPOCHS", "snet=2,aae=1")
    with pytest.raises(ValueError, match="ORGANMTL_FOCUSNET_PHASE_EPOCHS='snet=2,aae=1'.*'aae=1'"):
        resolve(O.FocusNetOptions)
    monkeypatch.setenv("ORGANMTL_FOCUSNET_PHASE_EPOCHS", "snet=two")
    with pytest.raises(ValueError, match="not an integer"):
        resolve(O.FocusNetOptions)


def test_small_organs_and_roi(monkeypatch):
    labels = {"background": 0, "BrainStem": 1, "Chiasm": 2, "OpticNerve_L": 3}
    sizes = {0: 1e6, 1: 25000.0, 2: 300.0, 3: 500.0}
    assert O.choose_small_organs(labels, {"organmtl_small_organs": ["Chiasm"]}, sizes) == ["Chiasm"]
    assert O.choose_small_organs(labels, {}, sizes) == ["Chiasm", "OpticNerve_L"]        # threshold 2000 mm^3
    assert O.choose_small_organs(labels, {}, sizes, O.FocusNetOptions(small_mm3=400)) == ["Chiasm"]
    opts = _env_options(monkeypatch, ORGANMTL_FOCUSNET_SMALL_ORGANS="OpticNerve_L")
    assert O.choose_small_organs(labels, {"organmtl_small_organs": ["Chiasm"]}, sizes, opts) == ["OpticNerve_L"]
    opts = _env_options(monkeypatch, ORGANMTL_FOCUSNET_SMALL_ORGANS="Lens")
    with pytest.raises(ValueError, match="Lens"):
        O.choose_small_organs(labels, {}, sizes, opts)
    assert O.roi_size([3.0, 1.0, 1.0], [40, 240, 240]) == [8, 64, 64]                      # the paper's ROI
    assert O.roi_size([2.5, 1.0, 1.0], [16, 40, 40]) == [10, 40, 40]                       # capped at the patch
    opts = _env_options(monkeypatch, ORGANMTL_FOCUSNET_ROI="4,16,16")
    assert O.roi_size([2.5, 1.0, 1.0], [16, 40, 40], opts.roi) == [4, 16, 16]
    monkeypatch.setenv("ORGANMTL_FOCUSNET_ROI", "4,16")
    with pytest.raises(ValueError, match="ORGANMTL_FOCUSNET_ROI='4,16'"):
        resolve(O.FocusNetOptions)


# tiny tensors: one thread is faster and immune to oversubscription on a shared CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fake_trainer(cls, phase):
    """A trainer object with just what train_step needs (no nnU-Net folders)."""
    torch.manual_seed(0)
    tr = object.__new__(cls)
    net = FocusNet(1, 4, small_labels=[2, 3], roi_size=(4, 8, 8), use_ae=cls.use_ae, width=0.125)
    tr.network = net
    tr.device = torch.device("cpu")
    tr.grad_scaler, tr.is_ddp = None, False              # nnU-Net on the CPU, one process
    tr.focus_settings = {"small_labels": [2, 3], "roi_size": [4, 8, 8]}
    tr.organ_sizes_mm3 = {0: 5000.0, 1: 800.0, 2: 20.0, 3: 30.0}
    tr.configuration_manager = SimpleNamespace(spacing=[1.0, 1.0, 1.0])
    tr.label_manager = SimpleNamespace(num_segmentation_heads=4, ignore_label=None)
    tr.centre_jitter = 1
    tr.loss = tr._build_loss()
    tr.initial_lr, tr.weight_decay, tr.num_epochs = 1e-3, 0.0, 5
    tr.optimizer, _ = tr.configure_optimizers()
    order = list(O.ALL_PHASES) if cls.use_ae else ["snet", "sol", "sos", "joint"]
    tr.schedule = [(p, 1) for p in order]
    tr.current_epoch = order.index(phase)
    return tr


def _batch():
    target = torch.zeros(2, 1, 6, 16, 16, dtype=torch.long)
    target[:, :, 1:5, 2:14, 2:14] = 1
    target[0, :, 2:4, 5:8, 6:9] = 2
    target[:, :, 3:5, 9:12, 9:12] = 3
    data = torch.randn(2, 1, 6, 16, 16) + target.float()
    return {"data": data, "target": target}


def _changed(before, net):
    parts = set()
    for n, p in net.named_parameters():
        if not torch.equal(before[n], p.detach()):
            parts.add(n.split(".")[0])
    return parts


@pytest.mark.parametrize("cls, phase, expected", [
    (nnUNetTrainerOMTLFocusNetV2, "snet", {"snet"}),
    (nnUNetTrainerOMTLFocusNetV2, "sol", {"sol"}),
    (nnUNetTrainerOMTLFocusNetV2, "ae", {"shape_ae"}),
    (nnUNetTrainerOMTLFocusNetV2, "sos", {"sos", "shape_ae"}),       # G step: SOS-Net; D step: the AE
    (nnUNetTrainerOMTLFocusNetV2OriginAE, "sos", {"sos"}),           # frozen AE: no D step
    (nnUNetTrainerOMTLFocusNetV1, "sos", {"sos"}),
    (nnUNetTrainerOMTLFocusNetV2, "joint", {"snet", "sol", "sos", "shape_ae"}),
])
def test_each_phase_updates_only_its_parameters(cls, phase, expected):
    tr = _fake_trainer(cls, phase)
    before = {n: p.detach().clone() for n, p in tr.network.named_parameters()}
    tr.network.train()
    out = tr.train_step(_batch())
    assert np.isfinite(out["loss"])
    assert _changed(before, tr.network) == expected


def test_generator_gradients_reach_only_the_segmenter_and_discriminator_gradients_only_the_ae(monkeypatch):
    """The fused G/D step: one optimizer step whose G loss (Eq. 7) is differentiated for SOS-Net only and
    whose D loss (Eq. 8) for the autoencoder only (equality with the alternating steps:
    tests/test_focusnet_train_steps.py)."""
    tr = _fake_trainer(nnUNetTrainerOMTLFocusNetV2, "sos")
    tr.network.train()
    names = {id(p): n for n, p in tr.network.named_parameters()}
    calls, real_grad = [], torch.autograd.grad

    def spy(outputs, inputs, *a, **k):
        calls.append({names[id(p)].split(".")[0] for p in inputs})
        return real_grad(outputs, inputs, *a, **k)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    steps, real_step = [], tr.optimizer.step
    monkeypatch.setattr(tr.optimizer, "step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    before = {n: p.detach().clone() for n, p in tr.network.named_parameters()}
    tr.train_step(_batch())
    assert calls == [{"sos"}, {"shape_ae"}] and len(steps) == 1
    assert {n.split(".")[0] for n in before if not torch.equal(before[n], dict(tr.network.named_parameters())[n])} \
        == {"sos", "shape_ae"}


def test_snet_overfits_a_tiny_phantom():
    tr = _fake_trainer(nnUNetTrainerOMTLFocusNetV1, "snet")
    for g in tr.optimizer.param_groups:
        g["lr"] = 5e-3
    batch = _batch()
    tr.network.train()
    first = float(tr.train_step(batch)["loss"])
    for _ in range(60):
        last = float(tr.train_step(batch)["loss"])
    assert last < 0.6 * first
    seg = tr.network(batch["data"], part="snet").logits.argmax(1)
    assert (seg == batch["target"][:, 0]).float().mean() > 0.8


def test_shape_terms_are_means_over_the_rois_like_the_sos_segmentation_loss():
    """Eq. 5's L_shape (and Eq. 4's L_rec) reduced like SOS-Net's L_seg, a mean over the (sample, organ) ROIs:
    organ k weighs n_k / N. Three ROIs here (organ 2 in one sample, organ 3 in two): L_G = L_seg + 5 (1/3 S_2 +
    2/3 S_3), L_D = (1/3 R_2 + 2/3 R_3) - 0.001 (1/3 S_2 + 2/3 S_3), every term computed by hand from one
    autoencoder forward over the same batch (a sum over the organs gives L_G = L_seg + 5 (S_2 + S_3))."""
    tr = _fake_trainer(nnUNetTrainerOMTLFocusNetV2, "sos")
    net = tr.network
    net.train()
    torch.manual_seed(3)
    roi = (4, 8, 8)
    gt2, gt3 = (torch.rand(1, 1, *roi) > 0.7).float(), (torch.rand(2, 1, *roi) > 0.6).float()
    pr2, pr3 = torch.rand(1, 1, *roi), torch.rand(2, 1, *roi)
    per_organ = [([gt2[0]], [pr2[0]]), ([gt3[0], gt3[1]], [pr3[0], pr3[1]])]
    seg = torch.tensor(0.7)
    state = copy.deepcopy(net.shape_ae.state_dict())
    l_g, l_d = tr._shape_terms(seg, per_organ)
    net.shape_ae.load_state_dict(state)                     # batch-norm running stats as before
    with torch.no_grad():
        rec, feats = net.shape_ae(torch.cat([gt2, pr2, gt3, pr3]))   # the one batch of _shape_terms

    def by_hand(sl_gt, sl_pr):
        s = 0.0
        for f in feats:
            a, b = f[sl_gt].double(), f[sl_pr].double()
            s += float(((a - b) ** 2).mean() / ((a ** 2).mean() + (b ** 2).mean() + 1e-6))
        return s

    def rec_by_hand(sl_gt, sl_pr, m_gt, m_pr):
        return float(((rec[sl_gt] - m_gt) ** 2).mean() + ((rec[sl_pr] - m_pr) ** 2).mean())

    s2, s3 = by_hand(slice(0, 1), slice(1, 2)), by_hand(slice(2, 4), slice(4, 6))
    r2, r3 = rec_by_hand(slice(0, 1), slice(1, 2), gt2, pr2), rec_by_hand(slice(2, 4), slice(4, 6), gt3, pr3)
    shape = s2 / 3 + 2 * s3 / 3
    assert float(l_g) == pytest.approx(0.7 + 5.0 * shape, rel=1e-4)
    assert float(l_g) != pytest.approx(0.7 + 5.0 * (s2 + s3), rel=1e-2)
    assert float(l_d) == pytest.approx(r2 / 3 + 2 * r3 / 3 - 0.001 * shape, rel=1e-4)
