"""Partial-label training (docs/partial_labels.md): the two losses against hand computations, zero
gradient (in each formulation's sense) for a class a case did not annotate, nnU-Net's own loss
when everything is annotated, the per-case annotated record of ``convert merge``, the stored
formulation, the sigmoid network's label-map rule, and the trainers' steps."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from organmtl.converters.merge import ANNOTATED_KEY
from organmtl.nnunet_trainers.multitask import partial_labels as P
from tests.helpers import dataset_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# one sample, classes (background, a, b), two voxels; the sample's source annotated a, not b
LOGITS = [[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]          # [class][voxel]
TARGET = [0, 1]                                        # voxel 0 background (b unlabelled), voxel 1 class a
ONLY_A = torch.tensor([[True, True, False]])


def _tiny():
    return torch.tensor([LOGITS]), torch.tensor([[TARGET]])


def test_marginal_loss_equals_hand_computation():
    logits, target = _tiny()
    loss = P.MarginalDCandCELoss(batch_dice=False)(logits, target, ONLY_A)
    e = [[math.exp(v) for v in row] for row in LOGITS]
    s = [e[0][i] + e[1][i] + e[2][i] for i in range(2)]
    # voxel 0: target background; b's probability is merged into it
    ce0 = -math.log((e[0][0] + e[2][0]) / s[0])
    ce1 = -math.log(e[1][1] / s[1])
    pa = [e[1][i] / s[i] for i in range(2)]
    tp, sp, sg = pa[1], pa[0] + pa[1], 1.0
    dice = (2 * tp + 1e-5) / (sp + sg + 1e-5)
    assert loss.item() == pytest.approx((ce0 + ce1) / 2 - dice, abs=1e-6)
    # b annotated too: the plain softmax CE + Dice over a and b (b absent: Dice (0 + s) / (p_b + s))
    full = P.MarginalDCandCELoss(batch_dice=False)(logits, target, torch.ones(1, 3, dtype=torch.bool))
    ce0_full = -math.log(e[0][0] / s[0])
    pb = [e[2][i] / s[i] for i in range(2)]
    dice_b = 1e-5 / (pb[0] + pb[1] + 1e-5)
    assert full.item() == pytest.approx((ce0_full + ce1) / 2 - (dice + dice_b) / 2, abs=1e-6)


def test_masked_sigmoid_loss_equals_hand_computation():
    logits, target = _tiny()
    loss = P.MaskedSigmoidLoss(batch_dice=False)(logits, target, ONLY_A)
    la = LOGITS[1]                                      # channel 1 = class a's sigmoid logit, channel 0 unused

    def sig(v):
        return 1 / (1 + math.exp(-v))

    bce = (-math.log(1 - sig(la[0])) - math.log(sig(la[1]))) / 2       # b's channel is not counted
    tp, sp, sg = sig(la[1]), sig(la[0]) + sig(la[1]), 1.0
    dice = (2 * tp + 1e-5) / (sp + sg + 1e-5)
    assert loss.item() == pytest.approx(bce - dice, abs=1e-6)


@pytest.mark.parametrize("batch_dice", [False, True])
def test_marginal_loss_with_everything_annotated_is_nnunets_dc_and_ce(batch_dice):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, 7, generator=g)
    target = torch.randint(0, 4, (2, 1, 5, 6, 7), generator=g)
    ref = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                         weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    mine = P.MarginalDCandCELoss(batch_dice=batch_dice)(logits, target, torch.ones(2, 4, dtype=torch.bool))
    assert mine.item() == pytest.approx(ref(logits, target.float()).item(), abs=1e-5)


def _split_logits(t: torch.Tensor, logits: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Logits with the same ``exp(z_c0) + exp(z_c1)`` everywhere, a share ``t`` of it on ``c0``."""
    total = torch.logsumexp(logits[:, [c0, c1]], 1)
    out = logits.clone()
    out[:, c0] = total + torch.log(t)
    out[:, c1] = total + torch.log(1 - t)
    return out


def test_marginal_unannotated_class_gets_no_gradient_against_background():
    """Marginal loss: a case that did not annotate b gives no signal between background and b: the
    gradient on the share of ``p_background + p_b`` that goes to b is zero (it is not zero where b is
    annotated, nor for the split between two annotated classes)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g)
    target[0][target[0] == 2] = 0                       # sample 0 did not annotate b: its b voxels read background
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    loss_fn = P.MarginalDCandCELoss(batch_dice=False)
    grads = {}
    for name, (c0, c1) in {"bg_b": (0, 2), "bg_a": (0, 1)}.items():
        t = torch.full((2, 4, 4, 4), 0.3, requires_grad=True)
        loss_fn(_split_logits(t, logits, c0, c1), target, annotated).backward()
        grads[name] = t.grad
    # sample 0: b vs background is free (float32 round-off of the log/exp re-parametrisation only)
    assert grads["bg_b"][0].abs().max() < 1e-8
    assert grads["bg_b"][1].abs().max() > 1e-4                         # sample 1 annotated b
    assert grads["bg_a"][0].abs().max() > 1e-4                         # a vs background counts for sample 0


@pytest.mark.parametrize("batch_dice", [False, True])
def test_sigmoid_unannotated_class_gets_zero_gradient(batch_dice):
    g = torch.Generator().manual_seed(2)
    out = torch.randn(2, 3, 4, 4, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4), generator=g)
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    P.MaskedSigmoidLoss(batch_dice=batch_dice)(out, target, annotated).backward()
    assert torch.count_nonzero(out.grad[0, 2]) == 0                    # sample 0, class b: not annotated
    assert torch.count_nonzero(out.grad[:, 0]) == 0                    # the constant background channel
    assert out.grad[1, 2].abs().max() > 1e-5 and out.grad[0, 1].abs().max() > 1e-5


def test_nothing_annotated_gives_zero_loss_attached_to_the_graph():
    out = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    only_bg = torch.tensor([[True, False, False]])
    loss = P.MaskedSigmoidLoss(batch_dice=True)(out, torch.zeros(1, 1, 4, 4, 4, dtype=torch.long), only_bg)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(out.grad) == 0


def test_a_voxel_of_an_uncounted_class_is_merged_background():
    logits, _ = _tiny()
    as_b = P.MarginalDCandCELoss(batch_dice=False)(logits, torch.tensor([[[2, 1]]]), ONLY_A)
    as_bg = P.MarginalDCandCELoss(batch_dice=False)(logits, torch.tensor([[[0, 1]]]), ONLY_A)
    assert torch.isfinite(as_b) and as_b.item() == as_bg.item()


def test_ignore_label_voxels_do_not_count():
    logits, target = _tiny()
    with_ignore = torch.tensor([[[0, 3]]])                              # voxel 1 -> ignore (3)
    a = P.MarginalDCandCELoss(batch_dice=False, ignore_label=3)(logits, with_ignore, ONLY_A)
    b = P.MarginalDCandCELoss(batch_dice=False)(logits[..., :1], target[..., :1], ONLY_A)
    assert a.item() == pytest.approx(b.item(), abs=1e-6)


def test_zero_background_logit_gives_the_threshold_then_argmax_label_map():
    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    net = P.ZeroBackgroundLogit(Identity())
    sig_logits = torch.tensor([[[-1.0, 2.0, 0.5], [-0.5, 1.0, 3.0]]])   # classes 1, 2 at three voxels
    out = net(sig_logits)
    assert out.shape == (1, 3, 3) and torch.count_nonzero(out[:, 0]) == 0
    # voxel 0: both below 0.5 -> background; voxel 1: both above, class 1 larger; voxel 2: class 2 larger
    assert out.argmax(1).tolist() == [[0, 1, 2]]
    one = net(torch.tensor([[[0.7, -2.0]]]))
    assert torch.allclose(torch.softmax(one, 1)[:, 1], torch.sigmoid(torch.tensor([[0.7, -2.0]])))
    assert [o.shape[1] for o in net([sig_logits, sig_logits])] == [3, 3]     # deep supervision lists


# ------------------------------------------------------------------ annotated labels per case
def test_annotated_labels_from_merge_record_tasks_or_everything():
    meta = {"labels": {"background": 0, "liver": 1, "spleen": 2, "kidney": 3},
            ANNOTATED_KEY: {"A_0": [1, 3], "B_0": [2, 3]}}
    ann = P.AnnotatedLabels.from_dataset_json(meta, 4)
    assert ann.mask(["A_0", "B_0"]).tolist() == [[True, True, False, True], [True, False, True, True]]
    assert ann.never_together() == [(1, 2)]
    with pytest.raises(KeyError, match="'C_0' is not listed"):
        ann.of("C_0")
    tasks = {"labels": meta["labels"], "organmtl_tasks": {"A": {"label_values": [1], "cases": ["A_0"]},
                                                          "B": {"label_values": [2, 3], "cases": ["B_0"]}}}
    assert P.AnnotatedLabels.from_dataset_json(tasks, 4).mask(["A_0", "B_x"]).tolist() == \
        [[True, True, False, False], [True, False, True, True]]
    assert P.AnnotatedLabels.from_dataset_json({"labels": meta["labels"]}, 4).of("anything") == {1, 2, 3}
    with pytest.raises(ValueError, match=r"lists value\(s\) \[7\]"):
        P.AnnotatedLabels.from_dataset_json({**meta, ANNOTATED_KEY: {"A_0": [7]}}, 4)


def test_merge_records_annotated_labels_per_case_with_shared_labels(tmp_path):
    from organmtl.cli import main
    from tests.test_converters_merge import _label_map, write_dataset

    a = write_dataset(tmp_path / "src", "Dataset001_A", {"background": 0, "liver": 1, "kidney": 2},
                      {"a0": _label_map([1, 2]), "a1": _label_map([1])}, test_maps={"t0": _label_map([2])})
    b = write_dataset(tmp_path / "src", "Dataset002_B", {"background": 0, "spleen": 1, "liver": 2},
                      {"b0": _label_map([1, 2])})
    for opt, liver_b in (("--shared-labels", 1), (None, 4)):
        out = tmp_path / ("shared" if opt else "prefixed")
        args = ["convert", "merge", str(a), str(b), "--dataset-id", "60", "--name", "PL", "--out", str(out)]
        assert main(args + ([opt] if opt else [])) == 0
        meta = dataset_json(out / "Dataset060_PL")
        if opt:
            assert meta["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
        else:
            assert meta["labels"] == {"background": 0, "A_liver": 1, "kidney": 2, "spleen": 3, "B_liver": 4}
        assert meta[ANNOTATED_KEY] == {"A_a0": [1, 2], "A_a1": [1, 2], "A_t0": [1, 2], "B_b0": [3, liver_b]}
        ann = P.AnnotatedLabels.from_dataset_json(meta, len(meta["labels"]))
        # "same organ" (--shared-labels): liver is annotated in both sources, so liver and spleen met
        assert ((1, 3) in ann.never_together()) == (opt is None)


# ------------------------------------------------------------------ the trainers
def _trainer(tmp_path, monkeypatch, formulation=None, batch_dice=False, name="nnUNetTrainerOMTLPartialLabels_Tiny"):
    import organmtl.nnunet_trainers as trainers
    from tests.trainer_steps import build_trainer

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, "")
    if formulation:
        monkeypatch.setenv("ORGANMTL_PARTIAL_LOSS", formulation)
    else:
        monkeypatch.delenv("ORGANMTL_PARTIAL_LOSS", raising=False)
    torch.manual_seed(0)
    return build_trainer(getattr(trainers, name), tmp_path, "tasks", batch_dice=batch_dice)


def _batch(trainer, seed, keys):
    from tests.trainer_steps import make_batch

    batch = make_batch(trainer, seed)
    batch["keys"] = np.array(keys)
    return batch


@pytest.mark.parametrize("formulation", ["marginal", "sigmoid"])
def test_trainer_steps_and_stored_formulation(tmp_path, monkeypatch, formulation):
    tr = _trainer(tmp_path, monkeypatch, None if formulation == "marginal" else formulation, batch_dice=True)
    assert tr.formulation == formulation
    entry = tr.plans_manager.plans["configurations"]["3d_steps"][P.PLANS_KEY]
    assert entry == {"options": {"formulation": formulation}}
    assert tr.my_init_kwargs["plans"]["configurations"]["3d_steps"][P.PLANS_KEY] == entry
    inner = tr.network.net if formulation == "sigmoid" else tr.network
    assert isinstance(tr.network, P.ZeroBackgroundLogit) == (formulation == "sigmoid")
    assert inner.decoder.seg_layers[0].out_channels == (2 if formulation == "sigmoid" else 3)
    out = tr.train_step(_batch(tr, 0, ["task_a_0", "task_b_1"]))
    assert np.isfinite(out["loss"])
    tr.network.eval()
    val = tr.validation_step(_batch(tr, 1, ["task_a_0", "task_a_1"]))
    # no case of the batch annotated class 2 (task_b): its TP/FP/FN are not counted
    assert val["tp_hard"][1] == val["fp_hard"][1] == val["fn_hard"][1] == 0
    assert val["tp_hard"][0] + val["fn_hard"][0] > 0
    with pytest.raises(KeyError, match="no 'keys'"):
        tr.train_step({k: v for k, v in _batch(tr, 2, ["task_a_0"] * 2).items() if k != "keys"})


def test_sigmoid_trainer_gives_no_gradient_to_a_class_the_batch_did_not_annotate(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, monkeypatch, "sigmoid")
    batch = _batch(tr, 3, ["task_a_0", "task_a_1"])          # both cases: task_a (label 1) only
    data, target = tr.batch_to_device(batch)
    tr.network.zero_grad()
    tr.compute_loss(tr.network(data), target, tr.annotated_mask(batch)).backward()
    heads = [h for h in tr.network.net.decoder.seg_layers if h.weight.grad is not None]   # weighted scales
    assert heads                    # the 3-stage test plan: one weighted deep-supervision scale
    for layer in heads:
        assert torch.count_nonzero(layer.weight.grad[1]) == 0 and torch.count_nonzero(layer.bias.grad[1]) == 0
    assert tr.network.net.decoder.seg_layers[-1].weight.grad[0].abs().max() > 0


def test_stored_formulation_wins_over_the_environment(tmp_path, monkeypatch):
    from tests.trainer_steps import _dataset_json, _plans
    import organmtl.nnunet_trainers as trainers

    plans = _plans()
    plans["configurations"]["3d_steps"][P.PLANS_KEY] = {"options": {"formulation": "sigmoid"}}
    monkeypatch.setenv("ORGANMTL_PARTIAL_LOSS", "marginal")
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    tr = trainers.nnUNetTrainerOMTLPartialLabels_Tiny(plans, "3d_steps", 0, _dataset_json("tasks"), torch.device("cpu"))
    assert tr.formulation == "sigmoid"
    log = open(tr.log_file).read()
    assert "formulation='sigmoid' stored with the model" in log and "wins over ORGANMTL_PARTIAL_LOSS='marginal'" in log
    monkeypatch.setenv("ORGANMTL_PARTIAL_LOSS", "softmax")
    with pytest.raises(ValueError, match=r"ORGANMTL_PARTIAL_LOSS='softmax': must be one of \['marginal', 'sigmoid'\]"):
        trainers.nnUNetTrainerOMTLPartialLabels_Tiny(_plans(), "3d_steps", 0, _dataset_json("tasks"),
                                                     torch.device("cpu"))


def test_predictor_network_needs_the_stored_entry():
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from tests.trainer_steps import _plans

    pm = PlansManager(_plans())
    with pytest.raises(ValueError, match="no 'organmtl_partial_labels' entry"):
        P.PartialLabelMixin.build_network_architecture(pm, pm.get_configuration("3d_steps"), 1, 3, False)
    plans = _plans()
    plans["configurations"]["3d_steps"][P.PLANS_KEY] = {"options": {"formulation": "sigmoid"}}
    pm = PlansManager(json.loads(json.dumps(plans)))
    net = P.PartialLabelMixin.build_network_architecture(pm, pm.get_configuration("3d_steps"), 1, 3, False)
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
