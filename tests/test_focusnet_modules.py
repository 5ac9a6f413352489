"""FocusNetv2 network modules (Gao et al., "FocusNetv2: Imbalanced large and small organ segmentation
with adversarial shape constraint for head and neck CT images", Tables 9-10; docs/focusnetv2.md):
shapes, receptive fields, in-plane-only DenseASPP dilation, ROI crop/paste at borders, paste-back
through the logits."""
import pytest
import torch

from organmtl.nnunet_trainers.focusnet.blocks import DenseASPP3d, SEResBlock, SqueezeExcitation3d
from organmtl.nnunet_trainers.focusnet.network import FocusNet, SNet, overlay_probability
from organmtl.nnunet_trainers.focusnet.roi import (crop_roi, gaussian_heatmap, heatmap_peak, mask_centre, paste_roi,
                                                   roi_start)
from organmtl.nnunet_trainers.focusnet.shape_ae import ShapeAutoencoder


# tiny tensors: one thread is faster and immune to oversubscription on a shared CPU
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _extent(grad: torch.Tensor) -> list[int]:
    """Extent (voxels) of the non-zero input gradient along z, y, x."""
    nz = torch.nonzero(grad.abs().sum(dim=(0, 1)) > 0)
    return [int(nz[:, i].max() - nz[:, i].min() + 1) for i in range(3)]


def _positive(module):
    """Norms and squeeze-excitation (global by design) removed, every weight positive, biases zero: all activations stay positive, so the
    input gradient is non-zero exactly on the receptive field (no ReLU cut-offs, no cancellation)."""
    for name, child in list(module.named_children()):
        if isinstance(child, (torch.nn.InstanceNorm3d, SqueezeExcitation3d)):
            setattr(module, name, torch.nn.Identity())
        else:
            _positive(child)
    for p_name, p in module.named_parameters(recurse=False):
        with torch.no_grad():
            p.copy_(torch.full_like(p, 0.01) if "weight" in p_name else torch.zeros_like(p))
    return module.eval()


def _receptive_field(module, shape, out_index=None, in_channels=1):
    module = _positive(module)
    x = (torch.rand(1, in_channels, *shape, dtype=torch.float64) + 0.5).requires_grad_(True)
    module = module.double()
    y = module(x)
    y = y[0] if isinstance(y, tuple) else y
    idx = out_index or tuple(s // 2 for s in y.shape[2:])
    y[(0, slice(None), *idx)].sum().backward()
    return _extent(x.grad)


def test_seresblock_keeps_size_and_projects_channels():
    torch.manual_seed(0)
    blk = SEResBlock(3, 5, dilation=(1, 2, 2))
    y = blk(torch.randn(2, 3, 6, 12, 12))
    assert y.shape == (2, 5, 6, 12, 12) and (y >= 0).all()
    assert blk.conv1.dilation == (1, 2, 2)
    # two 3x3x3 convs: receptive field 5 without dilation
    assert _receptive_field(SEResBlock(1, 2), (9, 9, 9), in_channels=1) == [5, 5, 5]


def test_dense_aspp_dilates_in_plane_only():
    aspp = DenseASPP3d(4, rates=(3, 6, 12, 18), growth=4, bottleneck=4)
    assert aspp.out_channels == 4 + 4 * 4
    dil = [m.dilation for m in aspp.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)]
    assert dil == [(1, 3, 3), (1, 6, 6), (1, 12, 12), (1, 18, 18)]
    # the four stacked 3x3x3 layers reach 1 + 2*4 = 9 slices in z but 1 + 2*(3+6+12+18) = 79 voxels in-plane
    rf = _receptive_field(aspp, (13, 81, 81), in_channels=4)
    assert rf == [9, 79, 79]
    # paper width: 64 + 4 x 64 = 320 channels
    assert DenseASPP3d(64).out_channels == 320


def test_snet_shapes_channels_and_receptive_field():
    net = SNet(1, 10, channels=(4, 6, 8), aspp_growth=4)
    logits, feats = net(torch.randn(2, 1, 8, 32, 32))
    assert logits.shape == (2, 10, 8, 32, 32) and feats.shape == (2, 4, 8, 32, 32)
    paper = SNet(1, 10)
    assert paper.aspp.out_channels == 320 and paper.head.in_channels == 32
    assert [m.kernel_size for m in (paper.pool1, paper.pool2)] == [(1, 2, 2), (2, 2, 2)]
    # in-plane receptive field far larger than along z (DenseASPP in x,y only, z pooled once)
    rf = _receptive_field(net, (24, 72, 72))
    assert rf[1] > 2.5 * rf[0] and rf[1] == rf[2]


@pytest.mark.parametrize("shape", [(8, 20, 20), (7, 17, 21), (3, 10, 9)])
def test_focusnet_pads_any_patch_and_outputs_every_head(shape):
    torch.manual_seed(0)
    net = FocusNet(1, 6, small_labels=[2, 5], roi_size=(4, 8, 8), width=0.25)
    out = net(torch.randn(2, 1, *shape), part="heatmap")
    assert out.logits.shape == (2, 6, *shape) and out.heatmaps.shape == (2, 2, *shape)
    assert out.features.shape[1] == 8 and ((out.heatmaps >= 0) & (out.heatmaps <= 1)).all()
    net.eval()
    net.sos_trained.fill_(True)
    assert net(torch.randn(1, 1, *shape)).shape == (1, 6, *shape)


def test_sos_input_concat_and_no_concat():
    x = torch.randn(1, 2, 8, 16, 16)
    with_img = FocusNet(2, 4, [1], (4, 8, 8), width=0.25)
    no_img = FocusNet(2, 4, [1], (4, 8, 8), concat_image=False, width=0.25)
    assert with_img.sos[0].blocks[0].conv1.in_channels == 8 + 2
    assert no_img.sos[0].blocks[0].conv1.in_channels == 8
    out = with_img(x, part="sos", centres=[[(0, 0, 15)]])
    (rec,) = out.records
    assert rec.start == (-2, -4, 11) and rec.prob.shape == (1, 4, 8, 8)
    # the image part of the ROI is the raw image (zero outside the volume)
    inp = with_img.sos_input(x, out.features, 0, rec.start)
    torch.testing.assert_close(inp[0, 8:], crop_roi(x[0], rec.start, (4, 8, 8)))
    assert (inp[0, 8:, :2] == 0).all()


def test_shape_autoencoder_follows_table_9():
    ae = ShapeAutoencoder((8, 64, 64))
    convs = [m for m in ae.encoder.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size for c in convs] == [(5, 5, 5)] * 4
    assert [c.stride for c in convs] == [(2, 2, 2), (2, 2, 2), (1, 1, 1), (2, 2, 2)]
    assert [c.out_channels for c in convs] == [64, 128, 128, 256]
    assert ae.fc_latent.out_features == 512 and ae.fc_channels == 256
    small = ShapeAutoencoder((5, 12, 9), channels=(4, 8, 8, 16), latent=32)
    rec, feats = small(torch.rand(3, 1, 5, 12, 9))
    assert rec.shape == (3, 1, 5, 12, 9) and ((rec >= 0) & (rec <= 1)).all()
    assert feats[0].shape == (3, 32) and len(feats) == 4
    with pytest.raises(ValueError, match="expected"):
        small(torch.rand(1, 1, 4, 12, 9))


@pytest.mark.parametrize("centre", [(0, 0, 0), (9, 19, 14), (5, 0, 14), (4, 10, 7), (-2, 25, 3)])
def test_roi_crop_paste_round_trip_at_borders(centre):
    vol = torch.arange(2 * 10 * 20 * 15, dtype=torch.float32).reshape(2, 10, 20, 15)
    size = (4, 8, 8)
    start = roi_start(centre, size)
    roi = crop_roi(vol, start, size)
    assert roi.shape == (2, *size)
    back = paste_roi(torch.zeros_like(vol), roi, start)
    inside = torch.zeros(vol.shape[1:], dtype=torch.bool)
    sl = tuple(slice(max(s, 0), max(min(s + n, d), 0)) for s, n, d in zip(start, size, vol.shape[1:]))
    inside[sl] = True
    torch.testing.assert_close(back[:, inside], vol[:, inside])
    assert (back[:, ~inside] == 0).all()
    # the part of the ROI outside the volume is zero
    assert roi.sum() == vol[(slice(None), *sl)].sum()


def test_centres_heatmaps_and_peaks():
    m = torch.zeros(6, 10, 10, dtype=torch.bool)
    m[2:4, 3:6, 7:10] = True
    assert mask_centre(m) == (2, 4, 8) or mask_centre(m) == (3, 4, 8)
    assert mask_centre(torch.zeros(3, 3, 3, dtype=torch.bool)) is None
    h = gaussian_heatmap((6, 10, 10), (2, 4, 8), sigma=5.0)
    assert h[2, 4, 8] == 1.0
    assert abs(float(h[2, 4, 3]) - float(torch.exp(torch.tensor(-25 / 50)))) < 1e-6
    assert heatmap_peak(h) == ((2, 4, 8), 1.0)
    assert gaussian_heatmap((2, 2, 2), None).sum() == 0


def test_overlay_probability_sets_softmax_of_the_small_organ():
    logits = torch.randn(5, 3, 4, 4)
    p = torch.rand(3, 4, 4) * 0.98 + 0.01
    out = overlay_probability(logits, 2, p)
    sm = torch.softmax(out, 0)
    torch.testing.assert_close(sm[2], p, atol=1e-5, rtol=1e-4)
    rest = torch.softmax(torch.cat([logits[:2], logits[3:]]), 0)          # other classes keep their ratios
    torch.testing.assert_close(sm[[0, 1, 3, 4]] / (1 - p), rest, atol=1e-5, rtol=1e-4)


def test_case_paste_puts_the_sos_mask_around_the_heatmap_peak():
    torch.manual_seed(0)
    net = FocusNet(1, 4, small_labels=[3], roi_size=(2, 4, 4), width=0.25).eval()

    class Peak(torch.nn.Module):
        def forward(self, feats):
            h = torch.zeros(feats.shape[0], 1, *feats.shape[2:])
            h[:, 0, 3, 5, 6] = 1.0
            return h

    class Certain(torch.nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 1, *x.shape[2:])

    net.sol = Peak()
    net.sos[0] = Certain()
    net.sos_trained.fill_(True)
    net.heat_floor.fill_(0.5)
    x = torch.randn(1, 1, 6, 12, 12)
    seg = net(x, part="case").argmax(1)[0]
    box = torch.zeros_like(seg, dtype=torch.bool)
    box[2:4, 3:7, 4:8] = True
    assert (seg[box] == 3).all()
    assert net.last_centres[0][3] == ((3, 5, 6), 1.0, True)
    assert torch.equal(net(x, part="case")[0][:, ~box], net.segment(x)[0][0][:, ~box])   # nothing outside the ROI
    net.paste_small_organs = False
    assert not (net(x, part="case").argmax(1)[0][box] == 3).all()


def test_channels_last_layout_gives_the_same_outputs_and_gradients():
    """The CPU channels-last-3d layout (FocusNet.set_channels_last) changes memory order only."""
    torch.manual_seed(0)
    ref = FocusNet(1, 4, [2, 3], (4, 8, 8), width=0.25).train()
    ref.sos_trained.fill_(True)                               # eval below pastes
    cl = FocusNet(1, 4, [2, 3], (4, 8, 8), width=0.25).train()
    cl.load_state_dict(ref.state_dict())
    cl.set_channels_last(True)
    convs = [p for p in cl.parameters() if p.dim() == 5 and p.shape[2:].numel() > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    assert any(not p.is_contiguous() for p in convs)
    x = torch.randn(2, 1, 8, 16, 16)
    centres = [[(3, 7, 8), (4, 2, 14)], [(2, 9, 9), None]]
    outs = []
    for net in (ref, cl):
        out = net(x, part="sos", centres=centres)
        masks = [torch.rand(3, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), None]
        (ae,) = [o for o in net(part="ae", masks=masks) if o is not None]
        rec, feats = ae.reconstruction, ae.features
        loss = out.logits.square().mean() + out.heatmaps.mean() + sum(r.prob.mean() for r in out.records) \
            + rec.mean() + feats[0].square().mean()
        loss.backward()
        outs.append((out.logits, out.heatmaps, rec, {n: p.grad for n, p in net.named_parameters()}))
    for a, b in zip(outs[0][:3], outs[1][:3]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    for name, g in outs[0][3].items():
        assert torch.allclose(g, outs[1][3][name], atol=1e-5, rtol=1e-3), name
    # eval-mode prediction on the CPU switches the layout on by itself and predicts the same
    ref.eval(), cl.eval()
    fresh = FocusNet(1, 4, [2, 3], (4, 8, 8), width=0.25)
    fresh.load_state_dict(ref.state_dict())
    fresh.eval()
    for net in (fresh, cl):
        net.heat_floor.fill_(0.0)                              # every organ pasted at the sample's peak
    assert torch.allclose(fresh(x, part="case"), cl(x, part="case"), atol=1e-5) and fresh.channels_last


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_overlay_probability_is_finite_in_half_precision_and_argmax_equal_to_fp32(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(4, 5, 6, 6) * 4).to(dtype).float()      # the same S-Net logits in both precisions
    p = torch.tensor([0.0, 1e-8, 0.5, 1 - 1e-8, 1.0]).view(5, 1, 1).expand(5, 6, 6)
    ref = overlay_probability(logits, 2, p)
    half = overlay_probability(logits.to(dtype), 2, p.to(dtype))
    assert half.dtype == dtype and torch.isfinite(half).all() and torch.isfinite(ref).all()
    decided = [0, 1, 3, 4]        # p = 0.5 ties the organ with the strongest other class: compare probabilities
    assert torch.equal(half.float().argmax(0)[decided], ref.argmax(0)[decided])
    torch.testing.assert_close(torch.softmax(half.float(), 0)[2], torch.softmax(ref, 0)[2], atol=1e-2, rtol=0)
    assert (ref.argmax(0)[3:] == 2).all() and (ref.argmax(0)[:2] != 2).all()    # p ~ 1 wins, p ~ 0 loses


def _pasting_net(heat_value, **kw):
    """FocusNet whose SOL-Net returns a fixed heatmap (a peak of ``heat_value`` at (3, 5, 6) on zeros) and whose
    SOS-Net is certain of its organ (label 3)."""
    net = FocusNet(1, 4, small_labels=[3], roi_size=(2, 4, 4), width=0.25, **kw).eval()

    class Heat(torch.nn.Module):
        def forward(self, feats):
            h = torch.zeros((feats.shape[0], 1, *feats.shape[2:]))
            h[:, 0, 3, 5, 6] = heat_value
            return h

    class Certain(torch.nn.Module):
        def forward(self, x):
            return torch.ones(x.shape[0], 1, *x.shape[2:])

    net.sol, net.sos[0] = Heat(), Certain()
    net.sos_trained.fill_(True)
    return net


def test_a_case_pastes_only_where_its_peak_reaches_the_calibrated_floor(capsys):
    """The floor (``heat_floor``, saved with the weights) decides, not the window: uncalibrated weights paste
    nothing, a peak below the floor pastes nothing, a peak above it pastes; ``heat_threshold`` is a lower
    bound of the floor. nnU-Net's per-window call never pastes and says so once."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 12, 12)
    box = torch.zeros(6, 12, 12, dtype=torch.bool)
    box[2:4, 3:7, 4:8] = True
    net = _pasting_net(0.2)
    snet = net.segment(x)[0]
    assert torch.equal(net(x, part="case"), snet)                         # uncalibrated: +inf
    net.heat_floor.fill_(0.3)
    assert torch.equal(net(x, part="case"), snet) and net.last_centres[0][3] == ((3, 5, 6), pytest.approx(0.2), False)
    net.heat_floor.fill_(0.1)
    assert (net(x, part="case").argmax(1)[0][box] == 3).all() and net.last_centres[0][3][2]
    assert net.floors() == [pytest.approx(0.1)]
    bounded = _pasting_net(0.2, heat_threshold=0.25)
    bounded.heat_floor.fill_(0.1)
    assert bounded.floors() == [0.25] and torch.equal(bounded(x, part="case"), bounded.segment(x)[0])
    # nnU-Net's sliding window calls the network per window: S-Net's logits, and one line naming the command
    assert torch.equal(net(x), snet) and torch.equal(net(x), snet)
    assert capsys.readouterr().out.count("organmtl predict-focusnet") == 1
    # the floor travels with the weights; weights saved before it existed have none (+inf: nothing pasted)
    again = _pasting_net(0.2)
    again.load_state_dict(net.state_dict())
    assert again.floors() == [pytest.approx(0.1)]
    legacy = {k: v for k, v in net.state_dict().items() if k != "heat_floor"}
    old = _pasting_net(0.2)
    old.load_state_dict(legacy)
    assert old.floors() == [float("inf")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_confident_network_predicts_finite_logits_under_autocast(dtype):
    """SOL-Net and SOS-Net saturated (sigmoid = 1 in half precision): the fp16 paste-back used to give +inf."""
    torch.manual_seed(0)
    net = FocusNet(1, 4, small_labels=[2, 3], roi_size=(2, 4, 4), heat_threshold=0.5, width=0.125).eval()
    net.sos_trained.fill_(True)
    net.heat_floor.fill_(0.5)
    net.eval_call = "case"                       # the trainer's validation call (each input a case)
    with torch.no_grad():
        net.sol.out.bias.fill_(30.0)
        net.sos[0].out.bias.fill_(30.0)          # organ 2: probability 1 everywhere in its ROI
        net.sos[1].out.bias.fill_(-30.0)         # organ 3: probability 0
    x = torch.randn(1, 1, 6, 12, 12)
    ref = net(x)
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    assert (out.float().argmax(1) == 2).any() and (ref.argmax(1) == 2).any()
    assert torch.equal(out.float().argmax(1) == 2, ref.argmax(1) == 2)


def test_untrained_sos_weights_are_not_pasted_and_old_weights_count_as_trained():
    torch.manual_seed(0)
    net = FocusNet(1, 4, small_labels=[2], roi_size=(2, 4, 4), heat_threshold=0.0, width=0.125).eval()
    net.heat_floor.fill_(0.0)
    x = torch.randn(1, 1, 6, 12, 12)
    snet_only = net.segment(x)[0]
    assert not bool(net.sos_trained)
    with pytest.warns(UserWarning, match="untrained"):
        assert torch.equal(net(x, part="case"), snet_only)
    net.sos_trained.fill_(True)
    assert not torch.equal(net(x, part="case"), snet_only)
    legacy = {k: v for k, v in net.state_dict().items() if k != "sos_trained"}
    fresh = FocusNet(1, 4, small_labels=[2], roi_size=(2, 4, 4), heat_threshold=0.0, width=0.125)
    fresh.load_state_dict(legacy)
    assert bool(fresh.sos_trained)
