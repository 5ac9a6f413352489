"""FocusNet trainers: the training step of every phase on nnU-Net's AMP path (docs/focusnetv2.md "Phase
schedule", "Training step cost", "Mixed precision, multi-GPU and checkpoints"); a mixin of
:class:`~.trainer.FocusNetTrainerBase`.

``snet``: Eq. 3 on S-Net. ``sol``: L2 to the Gaussian centre maps. ``ae``: Eq. 4 on ground-truth ROI masks.
``sos``/``joint``: SOS-Net on the ROIs it meets at inference (SOL-Net's peak, offset centres, negatives), the
G step of Eq. 7 and the D step of Eq. 8 from one autoencoder forward. Every rank runs the same forwards,
backwards and optimizer steps whatever its batch holds (DDP).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from organmtl.nnunet_trainers.amp import any_rank
from organmtl.nnunet_trainers.focusnet import losses as L
from organmtl.nnunet_trainers.focusnet.record import PHASE_PARAMETERS
from organmtl.nnunet_trainers.focusnet.roi import crop_roi, gaussian_heatmap, heatmap_peak, mask_centre, roi_start

#: key of a train_step output: False when the step had nothing to learn from (an ``ae`` step whose batch,
#: on every rank, has no small organ); such steps are left out of the epoch's logged mean loss
TRAINED_KEY = "focusnet_trained"


class FocusNetStepsMixin:
    """``train_step`` of every phase, the SOS/autoencoder terms and nnU-Net's backward/step path."""

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """nnU-Net's mean train loss over the steps that trained something: an ``ae`` step whose batch had no
        small organ on any rank (:data:`TRAINED_KEY` False) is left out (the skip is decided on all ranks
        together, so every rank keeps the same steps). An epoch without any such step logs the mean of its
        zero-valued steps, with a log line."""
        kept = [o for o in train_outputs if o.get(TRAINED_KEY, True)]
        if not kept and train_outputs:
            self.print_to_log_file("FocusNet: no batch of this epoch had a small organ; its train loss is 0")
        super().on_train_epoch_end(kept or train_outputs)


    def _small_centres(self, target: torch.Tensor, jitter: int = 0) -> list[list[tuple | None]]:
        """Per sample, per small organ: the organ's centre of mass in the patch (None when absent),
        optionally moved by up to ``jitter`` voxels per axis (stands in for SOL-Net's error)."""
        labels = self.focus_settings["small_labels"]
        out = []
        for b in range(target.shape[0]):
            row = []
            for lab in labels:
                c = mask_centre(target[b, 0] == lab)
                if c is not None and jitter > 0:
                    shift = torch.randint(-jitter, jitter + 1, (len(c),)).tolist()
                    c = tuple(int(min(max(ci + si, 0), n - 1)) for ci, si, n in zip(c, shift, target.shape[2:]))
                row.append(c)
            out.append(row)
        return out

    def _sos_centres(self, target: torch.Tensor, heat: torch.Tensor | None) -> list[list[tuple | None]]:
        """Per sample, per small organ: the centre of the ROI SOS-Net trains on, what it meets at inference.

        Organ in the patch: with probability 1/2 SOL-Net's peak (``heat``, the ROI inference would paste),
        else the ground-truth centre moved by up to ``max(centre_jitter, ROI // 4)`` voxels per axis (SOL-Net's
        error; Table 8 goes up to 9 mm). Organ absent from the patch: a negative ROI at SOL-Net's peak (at the
        patch centre without ``heat``), whose target is empty. The loss target is always the ground truth
        cropped at the ROI, whatever part of the organ it holds."""
        labels = self.focus_settings["small_labels"]
        roi = self.focus_settings["roi_size"]
        spatial = target.shape[2:]
        reach = [max(int(self.centre_jitter), int(r) // 4) for r in roi]
        out = []
        for b in range(target.shape[0]):
            row = []
            for k, lab in enumerate(labels):
                c = mask_centre(target[b, 0] == lab)
                predicted = heatmap_peak(heat[b, k].detach())[0] if heat is not None else None
                if c is None:
                    c = predicted if predicted is not None else tuple(int(n) // 2 for n in spatial)
                elif predicted is not None and float(torch.rand(())) < 0.5:
                    c = predicted
                else:
                    shift = [int(torch.randint(-m, m + 1, ())) if m > 0 else 0 for m in reach]
                    c = tuple(int(min(max(ci + si, 0), n - 1)) for ci, si, n in zip(c, shift, spatial))
                row.append(tuple(int(v) for v in c))
            out.append(row)
        return out

    def _heatmap_targets(self, target: torch.Tensor) -> torch.Tensor:
        centres = self._small_centres(target)
        return torch.stack([torch.stack([gaussian_heatmap(target.shape[2:], c, self.heatmap_sigma, target.device)
                                         for c in row]) for row in centres])

    def _gt_rois(self, target, centres):
        """Ground-truth ROI masks per small organ: list of ``(N, 1, *roi)`` (None when no sample has it)."""
        roi = self.focus_settings["roi_size"]
        out = []
        for k, lab in enumerate(self.focus_settings["small_labels"]):
            crops = [crop_roi((target[b] == lab).float(), roi_start(row[k], roi), roi)
                     for b, row in enumerate(centres) if row[k] is not None]
            out.append(torch.stack(crops) if crops else None)
        return out

    def _sos_alpha(self, label: int) -> float:
        """Two-class alpha of Eq. 1 for SOS-Net: organ vs the rest of its ROI (voxel counts)."""
        voxel = float(np.prod(self.configuration_manager.spacing))
        organ = max(self.organ_sizes_mm3.get(label, 0.0) / voxel, 1.0)
        rest = max(float(np.prod(self.focus_settings["roi_size"])) - organ, 1.0)
        return float(L.alpha_from_sizes([rest, organ])[1])

    def _empty_masks(self) -> torch.Tensor:
        """A batch of 0 ROI masks: a rank without small organs runs the autoencoder (and its batch-norm sync)
        on it while the other ranks run theirs."""
        return torch.zeros((0, 1, *self.focus_settings["roi_size"]), device=self.device)

    def _apply(self, loss: torch.Tensor, parts) -> None:
        """nnU-Net's backward/step (``self.grad_scaler`` on CUDA: scale, backward, unscale before clipping,
        step, update), dropping the gradients of every parameter outside ``parts`` before the step.
        Nothing when the loss has no gradient (single process only: under DDP every step has one)."""
        if not loss.requires_grad:
            return
        scaler = self.grad_scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        for name, p in self._module().named_parameters():
            if not name.startswith(tuple(f"{q}." for q in parts)):
                p.grad = None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    def train_step(self, batch: dict) -> dict:
        """One step of the current phase on nnU-Net's AMP path (forward and loss under autocast, losses in
        fp32, :meth:`_apply`). Collective-safe: every rank runs the same forwards, backwards and steps
        whatever its batch holds (a rank without small organs runs zero-weight terms)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = (target[0] if isinstance(target, list) else target).to(self.device, non_blocking=True)
        phase = self.current_phase
        self.optimizer.zero_grad(set_to_none=True)
        if phase == "snet":
            with self.autocast_context():
                loss = self.loss(self.network(data, part="snet").logits, target)
            self._apply(loss, PHASE_PARAMETERS[phase])
        elif phase == "sol":
            with self.autocast_context():
                out = self.network(data, part="heatmap", train_snet=False)
                loss = L.heatmap_l2_loss(out.heatmaps, self._heatmap_targets(target))
            self._apply(loss, PHASE_PARAMETERS[phase])
        elif phase == "ae":
            rois = self._gt_rois(target, self._small_centres(target, self.centre_jitter))
            if not any_rank(any(m is not None for m in rois), self.device):
                return {"loss": np.array(0.0, dtype=np.float32), TRAINED_KEY: False}
            if all(m is None for m in rois):
                rois[0] = self._empty_masks()
            with self.autocast_context():
                outs = self.network(part="ae", masks=rois)
                loss = sum(L.reconstruction_loss(o.reconstruction, m) if len(m) else 0.0 * o.reconstruction.sum()
                           for o, m in zip(outs, rois) if o is not None)
            self._apply(loss, PHASE_PARAMETERS[phase])
        else:
            loss = self._sos_step(data, target, joint=phase == "joint")
        return {"loss": loss.detach().float().cpu().numpy(), TRAINED_KEY: True}

    def _sos_step(self, data, target, joint: bool) -> torch.Tensor:
        """G step (Eq. 7: L_seg + lambda1 L_shape with the autoencoder fixed) and, for the adversarial
        variants, D step (Eq. 8: L_rec - lambda2 L_shape with the segmentation network fixed), both from one
        autoencoder forward over [ground truth; prediction]: the G gradients are taken for the segmentation
        parameters only and the D gradients for the autoencoder's only (:meth:`_apply_groups`), which is what
        the alternating steps compute (the D step's inputs are the G step's predictions and the G step
        leaves the autoencoder unchanged).

        SOS-Net's ROIs are those it meets at inference (:meth:`_sos_centres`: SOL-Net's peak, offset ground-
        truth centres, negative ROIs where its organ is absent, target empty), so SOL-Net runs in ``sos`` too
        (frozen). L_seg is the mean over all ROIs; the shape terms take the ROIs that hold their organ.
        Under DDP a rank without small organs runs a placeholder SOS-Net ROI and empty autoencoder batches,
        weight 0."""
        labels = self.focus_settings["small_labels"]
        roi = self.focus_settings["roi_size"]
        fused = self.use_ae
        sync = self.network.no_sync() if fused and isinstance(self.network, DDP) else contextlib.nullcontext()
        d_loss = None
        with sync, self.autocast_context():
            out = self.network(data, part="sos", centres=lambda heat: self._sos_centres(target, heat),
                               train_snet=joint, train_sol=joint, placeholder=self.is_ddp, heatmaps=True)
            records = [r for r in out.records if not r.placeholder]
            gts = [crop_roi((target[r.b] == labels[r.k]).float(), r.start, roi) for r in records]
            loss = out.logits.new_zeros(())
            if records:
                loss = sum(L.binary_segmentation_loss(r.prob, g, self._sos_alpha(labels[r.k]))
                           for r, g in zip(records, gts)) / len(records)
            for r in out.records:
                if r.placeholder:
                    loss = loss + 0.0 * r.prob.float().sum()
            if joint:
                loss = loss + self.loss(out.logits, target) + L.heatmap_l2_loss(out.heatmaps, self._heatmap_targets(target))
            shaped = [(r, g) for r, g in zip(records, gts) if bool(g.any())]
            per_organ = [([g for r, g in shaped if r.k == k], [r.prob for r, _ in shaped if r.k == k])
                         for k in range(len(labels))]
            with_ae = self.use_ae and any_rank(bool(shaped), self.device)
            if with_ae:
                loss, d_loss = self._shape_terms(loss, per_organ)
        parts = PHASE_PARAMETERS["joint" if joint else "sos"]
        if fused:
            self._apply_groups([(loss, parts), (d_loss, ("shape_ae",))])
        else:
            self._apply(loss, parts)
        return loss

    def _shape_terms(self, seg_loss, per_organ):
        """The autoencoder once over [ground truth; prediction] per organ (fp32, one batch, so its batch norm
        sees what both alternating steps saw): ``(L_G, L_D)`` of Eq. 7 and Eq. 8; ``L_D`` is None for the
        variants without a D step ("origin AE"), whose autoencoder then runs without a graph for its weights.

        L_shape and L_rec are means over the (sample, small organ) ROIs, the reduction of SOS-Net's L_seg in
        ``seg_loss`` (the expectation of Eq. 5): organ k's terms (each a mean over its ``n_k`` ROIs) weigh
        ``n_k / N``, N = all ROIs. A sum over the organs would give every SOS-Net lambda1 x (number of small
        organs) instead of Eq. 7's lambda1 against its L_seg (docs/focusnetv2.md "Shape loss scale")."""
        n_rois = sum(len(g) for g, _ in per_organ)
        masks = self._ae_masks(per_organ, detach=False)
        ae_params = list(self._module().shape_ae.parameters())
        if not self.adversarial:
            for prm in ae_params:
                prm.requires_grad_(False)
        try:
            ae_out = self._module().run_autoencoder(masks)
        finally:
            for prm in ae_params:
                prm.requires_grad_(True)
        l_shape_g, l_rec, l_shape_d = 0.0, 0.0, 0.0
        for (g, _), m, o in zip(per_organ, masks, ae_out):
            if o is None:
                continue
            n = len(g)
            rec, feats = o.reconstruction, o.features
            if not n:                         # this rank's empty batch (DDP): weight 0, same backward
                l_rec = l_rec + 0.0 * rec.float().sum()
                continue
            w = n / n_rois
            # G: the ground-truth code is a fixed target; D: both halves, the prediction as a fixed input
            l_shape_g = l_shape_g + w * L.shape_loss([f[:n].detach() for f in feats], [f[n:] for f in feats])
            if self.adversarial:
                l_rec = l_rec + w * L.reconstruction_loss(rec[:n], m[:n], rec[n:], m[n:].detach())
                l_shape_d = l_shape_d + w * L.shape_loss([f[:n] for f in feats], [f[n:] for f in feats])
        d_loss = L.discriminator_loss(l_rec, l_shape_d, self.lambda2) if self.adversarial else None
        return L.generator_loss(seg_loss, l_shape_g, self.lambda1), d_loss

    def _apply_groups(self, terms) -> None:
        """Several losses from one forward, each differentiated for its own parameters only
        (``terms`` = [(loss or None, parts)]): ``torch.autograd.grad`` per term on the shared graph (no
        gradient of one term reaches the other's parameters), under DDP one all-reduce of all of them
        (the mean over the ranks, as DDP; a parameter without a gradient on every rank keeps none), then
        nnU-Net's clip at 12 per term (what separate steps clip) and one optimizer step through
        ``self.grad_scaler`` on CUDA (one unscale/step/update: a non-finite gradient in any term skips the
        whole step). Nothing when no loss has a gradient (single process only: under DDP every step has one)."""
        named = list(self._module().named_parameters())
        terms = [(loss, parts) for loss, parts in terms if loss is not None and loss.requires_grad]
        if not terms:
            return
        scaler = self.grad_scaler
        groups = []
        for i, (loss, parts) in enumerate(terms):
            params = [p for n, p in named if n.startswith(tuple(f"{q}." for q in parts)) and p.requires_grad]
            grads = torch.autograd.grad(scaler.scale(loss) if scaler is not None else loss, params,
                                        retain_graph=i < len(terms) - 1, allow_unused=True)
            groups.append((params, list(grads)))
        if self.is_ddp:
            self._all_reduce_grads(groups)
        for params, grads in groups:
            for p, g in zip(params, grads):
                p.grad = g
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        for params, _ in groups:
            torch.nn.utils.clip_grad_norm_(params, 12)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()

    @staticmethod
    def _all_reduce_grads(groups) -> None:
        """In place: every gradient of ``groups`` averaged over the ranks in one all-reduce; None where no
        rank has one (DDP's rule for parameters unused on every rank)."""
        flat = [(p, g) for params, grads in groups for p, g in zip(params, grads)]
        world = torch.distributed.get_world_size()
        ref = flat[0][0]
        vec = torch.cat([(g.reshape(-1).float() / world) if g is not None else ref.new_zeros(p.numel(), dtype=torch.float32)
                         for p, g in flat] + [torch.tensor([float(g is not None) for _, g in flat], device=ref.device)])
        torch.distributed.all_reduce(vec)
        i, n_flat = 0, sum(p.numel() for p, _ in flat)
        flags = vec[n_flat:]
        out = []
        for j, (p, _) in enumerate(flat):
            out.append(vec[i:i + p.numel()].view_as(p).to(p.dtype).clone() if flags[j] > 0 else None)
            i += p.numel()
        k = 0
        for params, grads in groups:
            for j in range(len(grads)):
                grads[j] = out[k]
                k += 1

    def _ae_masks(self, per_organ, detach: bool) -> list:
        """Autoencoder input per organ: [ground truth; prediction] (None: organ absent; all absent on this
        rank while another rank has some: an empty batch for organ 0)."""
        masks = [torch.cat([torch.stack(g), torch.stack(p).detach() if detach else torch.stack(p)]) if g else None
                 for g, p in per_organ]
        if all(m is None for m in masks):
            masks[0] = self._empty_masks()
        return masks

