"""FocusNet train steps on nnU-Net's AMP path (docs/focusnetv2.md "Mixed precision and multi-GPU"):
every phase's ``train_step`` of the real trainer: ``snet``/``sol``/``ae`` in fp32 bit-identical to the step
logic before the AMP change (a saved copy below); ``sos``/``joint`` (one autoencoder forward, G and D
gradients per parameter group, SOS-Net batched per organ, ROIs where SOS-Net meets them) equal within float
tolerance, losses and gradients, to the alternating two-pass formulation written out below; finite under
CPU autocast fp16/bf16, NaN-free epoch logging when a batch has no small organ, "best" checkpoints from
the last phase only."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from organmtl.nnunet_trainers.focusnet import losses as L
from organmtl.nnunet_trainers.focusnet import options as O
from organmtl.nnunet_trainers.focusnet.roi import crop_roi, roi_start
from organmtl.nnunet_trainers.focusnet.trainer import PHASE_PARAMETERS
from organmtl.nnunet_trainers.focusnet.trainers import nnUNetTrainerOMTLFocusNetV2_Tiny
from tests.helpers import one_thread

CONFIG = "3d_tiny"
PATCH = [8, 24, 24]
SCHEDULE = [["snet", 1], ["sol", 1], ["ae", 1], ["sos", 1], ["joint", 1]]
DATASET_JSON = {"labels": {"background": 0, "BrainStem": 1, "Chiasm": 2}, "channel_names": {"0": "CT"},
                "file_ending": ".nii.gz", "numTraining": 4}
ENTRY = {"options": {}, "small_organs": ["Chiasm"], "small_labels": [2], "roi_size": [4, 16, 16], "use_sos": True,
         "concat_image": True, "use_ae": True, "heat_threshold": 0.5, "width": 0.125,
         "fold_record": {"fold": 0, "organ_sizes_mm3": {"0": 9000.0, "1": 400.0, "2": 30.0}, "schedule": SCHEDULE}}


def tiny_plans(batch_size: int = 2) -> dict:
    """A 3D plans dict with a complete stored FocusNet entry (no preprocessing needed to build the trainer)."""
    cfg = {"data_identifier": "d", "preprocessor_name": "DefaultPreprocessor", "batch_size": batch_size,
           "patch_size": PATCH, "median_image_size_in_voxels": [16, 32, 32], "spacing": [2.5, 1.0, 1.0],
           "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
           "batch_dice": False, O.PLANS_KEY: copy.deepcopy(ENTRY),
           "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                            "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8]}, "_kw_requires_import": []}}
    return {"continue_training": False, "dataset_name": "Dataset997_FNSteps", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [2.5, 1, 1], "original_median_shape_after_transp": [16, 32, 32],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "x", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}, "configurations": {CONFIG: cfg}}


def nnunet_folders(root, env) -> None:
    """nnU-Net's folders under ``root`` in ``env`` (a dict or ``monkeypatch.setenv``-like callable), with
    the preprocessed folder the trainer infers its dataset class from."""
    set_env = env if callable(env) else env.__setitem__
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        set_env(var, str(root / var))
    pre = root / "nnUNet_preprocessed" / "Dataset997_FNSteps" / "d"
    pre.mkdir(parents=True, exist_ok=True)
    np.savez(pre / "case_000.npz", data=np.zeros((1, 2, 2, 2), np.float32))


def make_trainer(batch_size: int = 2, cls=nnUNetTrainerOMTLFocusNetV2_Tiny):
    """The real FocusNetV2 trainer, initialised on the CPU (nnU-Net's folders must be set)."""
    tr = cls(tiny_plans(batch_size), CONFIG, 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
    tr.initialize()
    return tr


def make_batch(seed: int, n: int = 2, small: bool = True) -> dict:
    """CT-like patches with BrainStem (label 1) and, when ``small``, a Chiasm blob (label 2) per sample."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(n, 1, *PATCH, generator=g)
    target = torch.zeros(n, 1, *PATCH)
    for b in range(n):
        z, y, x = (int(v) for v in torch.randint(2, 6, (3,), generator=g))
        target[b, 0, 1:7, 2:12, 2:12] = 1
        if small:
            target[b, 0, z - 1:z + 2, 12 + y:16 + y, 12 + x:16 + x] = 2
        data[b] += 2 * target[b]
    return {"data": data, "target": [target], "keys": [f"c{b}" for b in range(n)]}


def set_phase(tr, phase: str) -> None:
    tr.current_epoch = [p for p, _ in tr.schedule].index(phase)
    assert tr.current_phase == phase


# ------------------------------------------------------------------ the step logic before the AMP change

def _old_apply(tr, loss, parts):
    if not loss.requires_grad:
        return
    loss.backward()
    for name, p in tr._module().named_parameters():
        if not name.startswith(tuple(f"{q}." for q in parts)):
            p.grad = None
    torch.nn.utils.clip_grad_norm_(tr.network.parameters(), 12)
    tr.optimizer.step()


def _old_sos_step(tr, data, target, joint):
    centres = tr._small_centres(target, tr.centre_jitter)
    out = tr.network(data, part="sos", centres=centres, train_snet=joint, train_sol=joint)
    records = out.records
    labels, roi = tr.focus_settings["small_labels"], tr.focus_settings["roi_size"]
    gts = [crop_roi((target[r.b] == labels[r.k]).float(), r.start, roi) for r in records]
    loss = out.logits.new_zeros(())
    if records:
        loss = sum(L.binary_segmentation_loss(r.prob, g, tr._sos_alpha(labels[r.k]))
                   for r, g in zip(records, gts)) / len(records)
    if joint:
        loss = loss + tr.loss(out.logits, target) + L.heatmap_l2_loss(out.heatmaps, tr._heatmap_targets(target))
    per_organ = [([g for r, g in zip(records, gts) if r.k == k], [r.prob for r in records if r.k == k])
                 for k in range(len(labels))]
    if tr.use_ae and records:
        masks = [torch.cat([torch.stack(g), torch.stack(p)]) if g else None for g, p in per_organ]
        ae_params = list(tr._module().shape_ae.parameters())
        for prm in ae_params:
            prm.requires_grad_(False)
        try:
            ae_out = tr._module().run_autoencoder(masks)
        finally:
            for prm in ae_params:
                prm.requires_grad_(True)
        l_shape = 0.0
        for (g, _), o in zip(per_organ, ae_out):
            if o is None:
                continue
            n = len(g)
            l_shape = l_shape + n / len(records) * L.shape_loss([f[:n].detach() for f in o.features],
                                                                [f[n:] for f in o.features])
        loss = L.generator_loss(loss, l_shape, tr.lambda1)
    _old_apply(tr, loss, PHASE_PARAMETERS["joint" if joint else "sos"])
    if tr.use_ae and tr.adversarial and records:
        tr.optimizer.zero_grad(set_to_none=True)
        masks = [torch.cat([torch.stack(g), torch.stack(p).detach()]) if g else None for g, p in per_organ]
        ae_out = tr.network(part="ae", masks=masks)
        l_rec, l_shape = 0.0, 0.0
        for (g, _), m, o in zip(per_organ, masks, ae_out):
            if o is None:
                continue
            n = len(g)
            rec = o.reconstruction
            l_rec = l_rec + n / len(records) * L.reconstruction_loss(rec[:n], m[:n], rec[n:], m[n:])
            l_shape = l_shape + n / len(records) * L.shape_loss([f[:n] for f in o.features], [f[n:] for f in o.features])
        _old_apply(tr, L.discriminator_loss(l_rec, l_shape, tr.lambda2), ("shape_ae",))
    return loss


def old_train_step(tr, batch):
    data = batch["data"].to(tr.device)
    target = batch["target"]
    target = (target[0] if isinstance(target, list) else target).to(tr.device)
    phase = tr.current_phase
    tr.optimizer.zero_grad(set_to_none=True)
    if phase == "snet":
        loss = tr.loss(tr.network(data, part="snet").logits, target)
        _old_apply(tr, loss, PHASE_PARAMETERS[phase])
    elif phase == "sol":
        out = tr.network(data, part="heatmap", train_snet=False)
        loss = L.heatmap_l2_loss(out.heatmaps, tr._heatmap_targets(target))
        _old_apply(tr, loss, PHASE_PARAMETERS[phase])
    elif phase == "ae":
        rois = tr._gt_rois(target, tr._small_centres(target, tr.centre_jitter))
        outs = tr.network(part="ae", masks=rois)
        terms = [L.reconstruction_loss(o.reconstruction, m) for o, m in zip(outs, rois) if o is not None]
        if not terms:
            return {"loss": np.array(np.nan)}
        loss = sum(terms)
        _old_apply(tr, loss, PHASE_PARAMETERS[phase])
    else:
        loss = _old_sos_step(tr, data, target, joint=phase == "joint")
    return {"loss": loss.detach().cpu().numpy()}


# ------------------------------------------------------------------ tests

@pytest.fixture
def folders(tmp_path, monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("ORGANMTL_FOCUSNET")]:
        monkeypatch.delenv(var)
    nnunet_folders(tmp_path, monkeypatch.setenv)
    return tmp_path


def _state(tr):
    return {k: v.detach().clone() for k, v in tr._module().state_dict().items()}


def _run(step, phase, batches, seed=0):
    torch.manual_seed(seed)
    tr = make_trainer()
    set_phase(tr, phase)
    losses = []
    for i, b in enumerate(batches):
        torch.manual_seed(seed + 1 + i)
        losses.append(np.asarray(step(tr, b)["loss"]).item())
    return losses, _state(tr), tr


@pytest.mark.parametrize("phase", ["snet", "sol", "ae"])
def test_fp32_cpu_step_is_bit_identical_to_the_step_before_amp(folders, phase):
    batches = [make_batch(1), make_batch(2)]
    with one_thread():
        old_losses, old_state, _ = _run(old_train_step, phase, batches)
        new_losses, new_state, tr = _run(nnUNetTrainerOMTLFocusNetV2_Tiny.train_step, phase, batches)
    assert new_losses == old_losses and all(np.isfinite(old_losses))
    start = _run(lambda t, b: {"loss": 0.0}, phase, [])[1]
    trained = PHASE_PARAMETERS[phase] + (("shape_ae",) if phase in ("sos", "joint") else ())   # + the D step
    changed = [k for k in old_state if not torch.equal(old_state[k], start[k])]
    assert changed and all(k.split(".")[0] in trained or "running" in k or "num_batches" in k for k in changed), changed
    for k in old_state:
        assert torch.equal(new_state[k], old_state[k]), f"{phase}: {k} differs from the old step"


# ------------------------------------------------------------------ the sos/joint step before the speed-ups

def _two_pass_sos_step(tr, data, target, joint):
    """The alternating formulation the fused step replaced, written out: S-Net + SOL-Net (also in ``sos``),
    SOS-Net once per (sample, organ), G step = autoencoder forward on [GT; prediction] with frozen weights,
    backward, clip, step; D step = a second autoencoder forward on [GT; prediction.detach()], backward,
    clip, step. Returns the G loss and the D loss."""
    net = tr._module()
    labels, roi = tr.focus_settings["small_labels"], tr.focus_settings["roi_size"]
    h = net.run_heatmap(data, train_snet=joint, train_sol=joint)
    centres = tr._sos_centres(target, h.heatmaps.detach())          # SOL-Net's peak, offsets, negatives
    x = net._layout(data)
    records = []
    for b in range(x.shape[0]):
        for k in range(len(labels)):
            if centres[b][k] is not None:
                start = roi_start(centres[b][k], roi)
                records.append((b, k, start, net.sos[k](net.sos_input(x, h.features, b, start))[0]))
    gts = [crop_roi((target[b] == labels[k]).float(), start, roi) for b, k, start, _ in records]
    loss = sum(L.binary_segmentation_loss(p, g, tr._sos_alpha(labels[k])) for (b, k, _, p), g in zip(records, gts)) \
        / len(records)
    if joint:
        loss = loss + tr.loss(h.logits, target) + L.heatmap_l2_loss(h.heatmaps, tr._heatmap_targets(target))
    shaped = [(r, g) for r, g in zip(records, gts) if bool(g.any())]     # the shape terms: ROIs holding their organ
    per_organ = [([g for r, g in shaped if r[1] == k], [r[3] for r, _ in shaped if r[1] == k])
                 for k in range(len(labels))]
    records = shaped
    masks = [torch.cat([torch.stack(g), torch.stack(p)]) if g else None for g, p in per_organ]
    for prm in net.shape_ae.parameters():
        prm.requires_grad_(False)
    ae_out = net.run_autoencoder(masks)
    for prm in net.shape_ae.parameters():
        prm.requires_grad_(True)
    l_shape = sum(len(g) / len(records) * L.shape_loss([f[:len(g)].detach() for f in o.features],
                                                       [f[len(g):] for f in o.features])
                  for (g, _), o in zip(per_organ, ae_out) if o is not None)
    loss = L.generator_loss(loss, l_shape, tr.lambda1)
    _old_apply(tr, loss, PHASE_PARAMETERS["joint" if joint else "sos"])
    tr.optimizer.zero_grad(set_to_none=True)
    masks = [torch.cat([torch.stack(g), torch.stack(p).detach()]) if g else None for g, p in per_organ]
    ae_out = net.run_autoencoder(masks)
    l_rec, l_shape = 0.0, 0.0
    for (g, _), m, o in zip(per_organ, masks, ae_out):
        if o is not None:
            n, rec = len(g), o.reconstruction
            l_rec = l_rec + n / len(records) * L.reconstruction_loss(rec[:n], m[:n], rec[n:], m[n:])
            l_shape = l_shape + n / len(records) * L.shape_loss([f[:n] for f in o.features], [f[n:] for f in o.features])
    d_loss = L.discriminator_loss(l_rec, l_shape, tr.lambda2)
    _old_apply(tr, d_loss, ("shape_ae",))
    return loss, d_loss


def _recording_steps(tr):
    """Wrap ``tr.optimizer.step``: each call first records ``{name: grad}`` of the parameters that have one."""
    seen, step = [], tr.optimizer.step

    def recorded(*a, **k):
        seen.append({n: p.grad.detach().clone() for n, p in tr._module().named_parameters() if p.grad is not None})
        return step(*a, **k)

    tr.optimizer.step = recorded
    return seen


@pytest.mark.parametrize("phase", ["sos", "joint"])
def test_fused_sos_step_equals_the_two_pass_g_and_d_steps(folders, phase, monkeypatch):
    """The fused step (one autoencoder forward over [GT; prediction], G gradients for the segmentation
    parameters and D gradients for the autoencoder from it, one optimizer step) against the alternating G and
    D steps: the same G loss, the same gradients per parameter (G step: SOS-Nets, + S-Net/SOL-Net in
    ``joint``; D step: the autoencoder) handed to the optimizer; SOL-Net runs in both phases (SOS-Net's ROIs
    may sit at its peak), frozen in ``sos``."""
    batch = make_batch(1)
    data, target = batch["data"], batch["target"][0]
    with one_thread():
        torch.manual_seed(0)
        ref = make_trainer()
        set_phase(ref, phase)
        ref_steps = _recording_steps(ref)
        ref.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        ref_g, ref_d = _two_pass_sos_step(ref, data, target, phase == "joint")
        torch.manual_seed(0)
        new = make_trainer()
        set_phase(new, phase)
        new_steps = _recording_steps(new)
        sol_calls = []
        new._module().sol.register_forward_hook(lambda *a: sol_calls.append(1))
        d_losses = []
        monkeypatch.setattr(L, "discriminator_loss", lambda *a: d_losses.append(ref_fn(*a)) or d_losses[-1])
        torch.manual_seed(5)
        out = new.train_step(batch)
    assert len(ref_steps) == 2 and len(new_steps) == 1
    assert float(out["loss"]) == pytest.approx(float(ref_g.detach()), rel=1e-5)
    assert len(d_losses) == 1 and float(d_losses[0].detach()) == pytest.approx(float(ref_d.detach()), rel=1e-5)
    assert sol_calls
    g_ref, d_ref = ref_steps
    assert set(d_ref) == {n for n in new_steps[0] if n.startswith("shape_ae.")} and d_ref
    assert set(g_ref) == {n for n in new_steps[0] if not n.startswith("shape_ae.")} and g_ref
    assert ("snet.head.weight" in g_ref) == (phase == "joint") and any(n.startswith("sos.") for n in g_ref)
    for name, g in {**g_ref, **d_ref}.items():
        got = new_steps[0][name]
        assert torch.allclose(got, g, rtol=1e-3, atol=1e-6 * max(1.0, float(g.abs().max()))), \
            f"{phase}: gradient of {name} differs: {float((got - g).abs().max())} (max |g| {float(g.abs().max())})"
    # (weights after the step are not compared: Adam's first step is ~lr * sign(g), so gradients equal to
    # float tolerance but near 0 can move a weight by up to 2 lr in opposite directions)


ref_fn = L.discriminator_loss


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_phase_trains_finite_under_cpu_autocast(folders, dtype):
    """The CUDA AMP path emulated on the CPU (:attr:`cpu_autocast_dtype`): finite losses and weights per
    phase, the forwards really ran in half precision, then a confident (overfitted) network predicts finite."""
    with one_thread():
        torch.manual_seed(0)
        tr = make_trainer()
        tr.cpu_autocast_dtype = dtype
        for g in tr.optimizer.param_groups:
            g["lr"] = 1e-2                                  # overfit fast: a confident network
        seen = set()
        hook = tr._module().snet.head.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
        batch = make_batch(3)
        for phase in O.ALL_PHASES:
            set_phase(tr, phase)
            for _ in range(3 if phase in ("sos", "joint") else 1):
                out = tr.train_step(batch)
                assert np.isfinite(out["loss"]), (phase, out)
        hook.remove()
        assert seen == {dtype}
        assert all(torch.isfinite(p).all() for p in tr._module().parameters())
        net = tr._module().eval()
        net.sos_trained.fill_(True)
        net.heat_floor.fill_(0.5)
        with torch.no_grad():
            net.sol.out.bias.fill_(30.0)                     # saturate SOL-Net: the case's peak reaches the floor
            with torch.autocast("cpu", dtype=dtype):
                pred = net(batch["data"][:1], part="case")
        assert torch.isfinite(pred).all() and net.last_centres[0][2][1:] == (1.0, True)


def test_epoch_loss_is_finite_when_an_ae_batch_has_no_small_organ(folders):
    with one_thread():
        torch.manual_seed(0)
        tr = make_trainer()
        set_phase(tr, "ae")
        outs = [tr.train_step(make_batch(4)), tr.train_step(make_batch(5, small=False))]
    assert outs[1]["focusnet_trained"] is False and outs[0]["focusnet_trained"] is True
    tr.on_train_epoch_end(outs)
    logged = tr.logger.get_value("train_losses", step=-1)
    assert np.isfinite(logged) and logged == pytest.approx(float(outs[0]["loss"]))


def _epoch(tr, dice: float) -> None:
    """One nnU-Net epoch's bookkeeping around no training (a given pseudo Dice)."""
    tr.on_epoch_start()
    tr.on_train_epoch_start()
    tr.logger.log("train_losses", 1.0, tr.current_epoch)
    tr.logger.log("val_losses", 1.0, tr.current_epoch)
    tr.logger.log("mean_fg_dice", dice, tr.current_epoch)
    tr.logger.log("dice_per_class_or_region", [dice, dice], tr.current_epoch)
    tr.on_epoch_end()


def test_checkpoint_best_comes_from_the_last_phase_and_records_what_is_trained(folders):
    from pathlib import Path

    with one_thread():
        torch.manual_seed(0)
        tr = make_trainer()
        tr.save_every = 1
        folder = Path(tr.output_folder)
        dice = {"snet": 0.9, "sol": 0.8, "ae": 0.7, "sos": 0.3, "joint": 0.2}     # S-Net "best" by far
        latest_after = {}
        for phase, _ in tr.schedule:
            _epoch(tr, dice[phase])
            latest_after[phase] = torch.load(folder / "checkpoint_latest.pth", weights_only=False) \
                if (folder / "checkpoint_latest.pth").is_file() else None
        best = torch.load(folder / "checkpoint_best.pth", weights_only=False)
    assert best["current_epoch"] == len(SCHEDULE)                       # the joint epoch, not the S-Net one
    record = best["init_args"]["plans"]["configurations"][CONFIG][O.PLANS_KEY]["fold_record"]
    assert record["phases_reached"] == list(O.ALL_PHASES)
    assert record["trained_parts"] == ["shape_ae", "snet", "sol", "sos"]
    assert bool(best["network_weights"]["sos_trained"])
    early = latest_after["snet"]
    assert early is not None and not bool(early["network_weights"]["sos_trained"])
    early_record = early["init_args"]["plans"]["configurations"][CONFIG][O.PLANS_KEY]["fold_record"]
    assert early_record["phases_reached"] == ["snet"] and early_record["trained_parts"] == ["snet"]
    log = open(tr.log_file).read()
    assert log.count("New best EMA pseudo Dice") == 1 and "checkpoint_best.pth tracked from here on (phase joint)" in log
    # prediction from the S-Net-phase checkpoint: no paste, and it says so; its floor was never calibrated
    net = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 3)
    net.load_state_dict(early["network_weights"])
    net.eval()
    assert early["network_weights"]["heat_floor"].isinf().all()
    x = make_batch(6)["data"][:1]
    with pytest.warns(UserWarning, match="untrained"):
        pred = net(x, part="case")
    assert torch.equal(pred, net.segment(x)[0])


def test_sos_rois_sit_where_inference_puts_them_offsets_and_negatives(folders):
    """SOS-Net's training ROIs (``_sos_centres``): an absent organ gets a negative ROI at SOL-Net's peak (its target
    is empty); a present organ's ROI is at SOL-Net's peak or at the ground-truth centre moved by at most
    max(centre_jitter, ROI // 4) per axis; both kinds occur."""
    with one_thread():
        tr = make_trainer()
    batch = make_batch(3)
    target = batch["target"][0].clone()
    target[1][target[1] == 2] = 0                                   # sample 1 without the Chiasm
    heat = torch.zeros(2, 1, *PATCH)
    heat[:, 0, 6, 20, 3] = 0.9                                      # SOL-Net points far from the organ
    truth = tuple(int(v) for v in torch.nonzero(target[0, 0] == 2).float().mean(0).round())
    reach = [max(tr.centre_jitter, r // 4) for r in tr.focus_settings["roi_size"]]
    kinds = set()
    torch.manual_seed(0)
    for _ in range(40):
        c = tr._sos_centres(target, heat)
        assert c[1][0] == (6, 20, 3)                                # negative ROI at the peak
        if c[0][0] == (6, 20, 3):
            kinds.add("predicted")
        else:
            assert all(abs(a - b) <= m for a, b, m in zip(c[0][0], truth, reach)), (c[0][0], truth)
            kinds.add("offset")
    assert kinds == {"predicted", "offset"}
    start = roi_start((6, 20, 3), tr.focus_settings["roi_size"])
    assert not crop_roi((target[1] == 2).float(), start, tr.focus_settings["roi_size"]).any()
    # the step trains on them: finite loss with a sample whose organ is absent
    set_phase(tr, "sos")
    out = tr.train_step({"data": batch["data"], "target": [target], "keys": batch["keys"]})
    assert out["focusnet_trained"] and np.isfinite(out["loss"])


def test_trainer_log_warns_when_the_patch_cuts_the_papers_roi_and_gives_the_roi_organ_ratio(folders):
    """The plan's patch (8 x 24 x 24 at 2.5 x 1 x 1 mm) cannot hold the paper's 24 x 64 x 64 mm (10 x 64 x 64
    voxels): the log says so as a WARNING and gives ROI voxels per organ voxel (4 x 16 x 16 = 1024 over the
    Chiasm's 30 mm^3 / 2.5 mm^3 = 12 voxels: 85.3)."""
    with one_thread(), pytest.warns(UserWarning, match="cannot hold the paper's ROI"):
        tr = make_trainer()
    log = open(tr.log_file).read()
    assert "FocusNet WARNING: the plan's patch [8, 24, 24] cannot hold the paper's ROI [10, 64, 64] voxels" in log
    assert "ROI voxels per organ voxel: {'Chiasm': 85.3}" in log


@pytest.mark.parametrize("variant", ["NoConcat", "OriginAE"])
def test_table6_ablation_trainers_build_their_variant_and_train_every_phase(folders, variant):
    """The two FocusNetv2 ablations of Table 6 against FocusNetv2 itself, in process (their stock-command
    runs are FocusNetv2's, tests/e2e/test_focusnet_e2e.py): "no concat" feeds SOS-Net the S-Net features
    without the image; "origin AE" has no discriminator step, so the autoencoder trained in ``ae`` stays as
    it is through ``sos`` and ``joint`` while FocusNetv2's changes there."""
    from organmtl.nnunet_trainers.focusnet import trainers as T

    cls = getattr(T, f"nnUNetTrainerOMTLFocusNetV2{variant}_Tiny")
    # a new model: options only, so the network keys come from the trainer class (not a stored entry)
    entry = {"options": {"small_organs": ["Chiasm"], "roi": [4, 16, 16], "width": 0.125, "heat_threshold": 0.5},
             "fold_record": ENTRY["fold_record"]}
    (folders / "nnUNet_preprocessed" / "Dataset997_FNSteps" / "splits_final.json").write_text(
        json.dumps([{"train": ["case_000"], "val": ["case_000"]}]))
    with one_thread():
        ae_moved = {}
        for name, klass in (("v2", nnUNetTrainerOMTLFocusNetV2_Tiny), (variant, cls)):
            torch.manual_seed(0)
            plans = tiny_plans()
            plans["configurations"][CONFIG][O.PLANS_KEY] = copy.deepcopy(entry)
            tr = klass(plans, CONFIG, 0, copy.deepcopy(DATASET_JSON), torch.device("cpu"))
            tr.initialize()
            net = tr._module()
            first = {k: v.detach().clone() for k, v in net.shape_ae.named_parameters()}
            batch = make_batch(5)
            for phase in O.ALL_PHASES:
                set_phase(tr, phase)
                if phase == "sos":
                    first = {k: v.detach().clone() for k, v in net.shape_ae.named_parameters()}
                out = tr.train_step(batch)
                assert np.isfinite(out["loss"]), (name, phase, out)
            # weights only (its norm layers' running statistics follow every forward)
            ae_moved[name] = any(not torch.equal(first[k], v) for k, v in net.shape_ae.named_parameters())
            sos_in = next(net.sos[0].parameters()).shape[1]
            features = net.snet.feature_channels
            if name == "v2" or variant == "OriginAE":
                assert net.concat_image and sos_in == features + 1, (name, sos_in, features)
            else:
                assert not net.concat_image and sos_in == features, (name, sos_in, features)
            assert tr.focus_settings["concat_image"] == net.concat_image
    assert ae_moved["v2"]
    assert ae_moved[variant] == (variant != "OriginAE")
