"""The FocusNet small-organ paste (FocusNetv2 paper §3.1.3; docs/focusnetv2.md "Inference: one paste per case").

A near-zero, noisy SOL-Net map (untrained, or trained on an L2 loss it nearly minimises by staying low) used
to pass the per-window rule in every window, and SOS-Net then labelled whatever tissue it was shown: the
defect that took the mandible from 0.94 to 0.57 in the matched HaN run. These tests pin the rule that
replaced it: nnU-Net's per-window call pastes nothing, the case-level predictor pastes each small organ at
most once, at the case's SOL-Net peak, only above a floor calibrated on validation, and never outside the
ROI around that peak.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from organmtl.nnunet_trainers.focusnet import losses as L
from organmtl.nnunet_trainers.focusnet import options as O
from organmtl.nnunet_trainers.focusnet import paste as P
from organmtl.nnunet_trainers.focusnet.centres import sliding_window_heatmaps
from organmtl.nnunet_trainers.focusnet.predict import FocusNetPredictor
from organmtl.nnunet_trainers.focusnet.roi import crop_roi, heatmap_peak, mask_centre, roi_start
from organmtl.nnunet_trainers.focusnet.trainers import nnUNetTrainerOMTLFocusNetV2
from organmtl.nnunet_trainers.settings import to_stored

PATCH = (4, 16, 16)
ROI = (2, 8, 8)


def _manager(patch, n_classes=4):
    cm = SimpleNamespace(patch_size=list(patch))
    pm = SimpleNamespace(get_label_manager=lambda dataset_json: SimpleNamespace(num_segmentation_heads=n_classes))
    return pm, cm


def _trainer_network(roi=ROI):
    """FocusNet built as ``nnUNetv2_predict`` builds it: from the plans entry a trainer writes with the
    default options (every ``heat_*`` setting at its default), SOL-Net/SOS-Net marked trained."""
    entry = {"small_organs": ["Chiasm"], "small_labels": [3], "roi_size": list(roi), "use_sos": True,
             "concat_image": True, "use_ae": False, "width": 0.25,
             **{k: v for k, v in to_stored(O.FocusNetOptions()).items() if k.startswith("heat_")}}
    cm = SimpleNamespace(configuration={O.PLANS_KEY: entry})
    net = nnUNetTrainerOMTLFocusNetV2.build_network_architecture(None, cm, 1, 4, False)
    net.sos_trained.fill_(True)
    return net


def _noisy_sol(net, seed=0):
    """SOL-Net output layer whose map is near zero everywhere with noise (sigmoid of -6 + N(0, ~1.5))."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.sol.out.weight.copy_(torch.randn(net.sol.out.weight.shape, generator=g) * 1.5)
        net.sol.out.bias.fill_(-6.0)
    return net


def _stock_prediction(net, image, patch=PATCH):
    """nnU-Net's own sliding window (what ``nnUNetv2_predict`` and the final validation run)."""
    pm, cm = _manager(patch)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, None, {}, "test", None)
    return predictor.predict_sliding_window_return_logits(image).float()


def test_noisy_sol_map_pastes_nothing_through_nnunets_per_window_call():
    """Volume without any organ, a noisy near-zero SOL map: nnU-Net's sliding window gives S-Net's logits
    (before the fix the per-window rule, floor 0.0, pasted SOS-Net into windows of this volume)."""
    torch.manual_seed(0)
    net = _noisy_sol(_trainer_network()).eval()
    image = torch.randn(1, 8, 32, 32)
    pasted = _stock_prediction(net, image)
    net.paste_small_organs = False
    snet = _stock_prediction(net, image)
    assert torch.equal(pasted, snet)


def _focusnet_prediction(net, image, patch=PATCH):
    """:class:`FocusNetPredictor` (``organmtl predict-focusnet``, the trainers' final validation) on one case."""
    pm, cm = _manager(patch)
    predictor = FocusNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                  perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.manual_initialization(net, pm, cm, None, {}, "test", None)
    return predictor.predict_sliding_window_return_logits(image).float(), predictor


def _organ_patches(n=6, seed=1):
    """Validation-like patches, each holding organ 3 (a 1 x 3 x 3 blob) somewhere."""
    g = torch.Generator().manual_seed(seed)
    target = torch.zeros(n, 1, *PATCH)
    for b in range(n):
        z, y, x = (int(torch.randint(1, s - 2, (), generator=g)) for s in PATCH)
        target[b, 0, z, y - 1:y + 2, x - 1:x + 2] = 3
    return torch.randn(n, 1, *PATCH, generator=g) + 3 * (target == 3), target


def test_noisy_sol_calibrates_to_no_paste_and_the_case_predictor_pastes_nothing():
    """The same noisy SOL-Net, calibrated on validation patches that hold the organ: its maps do not tell the
    organ from the rest, so the floor is +inf and the case-level predictor gives S-Net's logits for a volume
    without the organ."""
    torch.manual_seed(0)
    net = _noisy_sol(_trainer_network()).eval()
    data, target = _organ_patches()
    heat = net(data, part="heatmap", train_snet=False, train_sol=False).heatmaps
    stats = P.floor_statistics(heat, target, [3], ROI)
    floors, notes = P.calibrated_floors(stats, net.heat_floor.tolist())
    assert stats[0, 2] == 6 and stats[0, 3] == 6 and floors == [math.inf] and "not pasted" in notes[0]
    net.heat_floor.copy_(torch.tensor(floors))
    image = torch.randn(1, 8, 32, 32)
    pasted, predictor = _focusnet_prediction(net, image)
    snet = _stock_prediction(net, image)
    assert torch.equal(pasted, snet)
    assert not any(p for _, _, p in predictor.last_centres.values())


def test_floor_is_the_midpoint_between_the_organ_peaks_and_the_rest_by_hand():
    """Two patches with the organ, one without: on = the map's maximum within ROI/4 of the organ's centre, off =
    the maximum farther than ROI/2 from it (or anywhere without the organ)."""
    target = torch.zeros(3, 1, *PATCH)
    target[0, 0, 2, 8, 8] = 3
    target[1, 0, 1, 4, 12] = 3
    heat = torch.zeros(3, 1, *PATCH)
    heat[0, 0, 2, 8, 9] = 0.8          # near organ 0 (within 2 in-plane voxels)
    heat[0, 0, 0, 0, 0] = 0.1          # far from it (more than 4 in-plane voxels away)
    heat[1, 0, 1, 4, 12] = 0.6
    heat[1, 0, 3, 15, 0] = 0.2
    heat[2, 0, 3, 3, 3] = 0.3          # no organ in this patch: all of it is "off"
    stats = P.floor_statistics(heat, target, [3], ROI)
    assert stats[0].tolist() == pytest.approx([0.6, 0.3, 2, 3])
    floors, _ = P.calibrated_floors(stats, [math.inf])
    assert floors == [pytest.approx(0.45)]
    # overlap: the organ's weakest peak below the strongest elsewhere -> never pasted
    heat[2, 0, 3, 3, 3] = 0.7
    assert P.calibrated_floors(P.floor_statistics(heat, target, [3], ROI), [0.45])[0] == [math.inf]
    # nothing to compare against (no "off" patch): the floor is kept
    assert P.calibrated_floors(P.floor_statistics(heat[:1], target[:1], [3], (8, 32, 32)), [0.45])[0] == [0.45]


def test_one_paste_per_case_never_changes_voxels_outside_the_roi_at_the_case_peak():
    """A case larger than the patch (8 windows): each small organ is pasted once, at the argmax of SOL-Net's maps
    aggregated over the windows; every voxel outside that ROI keeps S-Net's aggregated logits. (Before, each
    window pasted at its own peak: 1135 voxels changed, 1039 of them outside the ROI at the case's peak.)"""
    torch.manual_seed(0)
    net = _noisy_sol(_trainer_network()).eval()
    net.heat_floor.fill_(0.0)                   # paste whatever the peak (the rule under test is where)
    image = torch.randn(1, 8, 32, 32)
    pasted, predictor = _focusnet_prediction(net, image)
    snet = _stock_prediction(net, image)
    heat = sliding_window_heatmaps(net, image, PATCH)
    peak, _ = heatmap_peak(heat[0])
    voxel, value, was_pasted = predictor.last_centres[3]
    assert was_pasted and tuple(voxel) == tuple(peak)
    start = roi_start(peak, ROI)
    inside = torch.zeros(image.shape[1:], dtype=torch.bool)
    inside[tuple(slice(max(s, 0), s + r) for s, r in zip(start, ROI))] = True
    changed = (pasted != snet).any(0)
    assert changed.any() and not (changed & ~inside).any()
    torch.testing.assert_close(pasted[:, ~inside], snet[:, ~inside], rtol=0, atol=0)


def test_sos_net_overfits_a_tiny_case():
    """SOS-Net alone (S-Net frozen at its initialisation) on one ROI of one case, the trainer's loss (Eq. 3, two
    classes): its mask reaches Dice > 0.9 (it can learn what it is shown)."""
    torch.manual_seed(0)
    net = _trainer_network(roi=(2, 8, 8)).train()
    x = torch.randn(1, 1, *PATCH)
    target = torch.zeros(1, 1, *PATCH)
    target[0, 0, 1:3, 6:10, 7:10] = 3
    x = x + 2 * (target == 3)
    centre = [[mask_centre(target[0, 0] == 3)]]
    opt = torch.optim.Adam(net.sos.parameters(), lr=5e-3)
    for _ in range(150):
        out = net(x, part="sos", centres=centre, train_snet=False, train_sol=False, heatmaps=False)
        r = out.records[0]
        gt = crop_roi((target[0] == 3).float(), r.start, net.roi_size)
        loss = L.binary_segmentation_loss(r.prob, gt, 0.7)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = (r.prob.detach() > 0.5).float()
    dice = float(2 * (pred * gt).sum() / (pred.sum() + gt.sum()))
    assert dice > 0.9, dice
