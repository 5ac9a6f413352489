"""Losses of the two theses on top of nnU-Net's segmentation loss.

- :func:`heatmap_mse` — thesis §2.6 Eq. 3 trains the landmark tail with the (R)MSE between predicted
  and target Gaussian maps; we minimise the MSE (same minimiser, smooth gradient at 0).
- :class:`UncertaintyWeighting` — thesis Appendix A.7.4 Eq. 9 (Kendall et al. 2018).
- :class:`PerOrganBCELoss` — landmark-input U-Net §3.4.3: the sum over organs of one binary
  cross-entropy per organ (independent sigmoid outputs), plus nnU-Net's soft Dice as an option.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from organmtl.nnunet_trainers.amp import float32_region


def heatmap_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and target landmark heatmaps (thesis Eq. 3 squared)."""
    if pred.shape != target.shape:
        raise ValueError(f"landmark prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(pred.float(), target.float())


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty task weighting, thesis Eq. 9:
    ``L = sum_t L_t / (C_t s_t^2) + log s_t`` with ``C_t = 1`` for classification (segmentation) and
    ``C_t = 2`` for regression (landmark heatmaps).

    The learned parameters are the log-variances ``v_t = log s_t^2`` (numerically stable, unconstrained),
    so each term is ``exp(-v_t) / C_t * L_t + v_t / 2``. They live in the network module, so nnU-Net's
    checkpoints save them, ``--c`` restores them and DDP all-reduces their gradients.
    """

    def __init__(self, task_names=("segmentation", "landmarks"), task_constants=(1.0, 2.0)):
        super().__init__()
        if len(task_names) != len(task_constants):
            raise ValueError("one constant C_t per task is needed")
        self.task_names = tuple(task_names)
        self.log_vars = nn.Parameter(torch.zeros(len(task_names)))
        self.register_buffer("task_constants", torch.tensor(task_constants, dtype=torch.float32), persistent=False)

    def forward(self, losses) -> torch.Tensor:
        """The weighted sum, always in fp32 (autocast off: ``exp(-v_t)`` of a large log-variance
        overflows fp16)."""
        with float32_region(self.log_vars.device.type):
            losses = torch.stack([torch.as_tensor(l).float() for l in losses]).to(self.log_vars.device)
            return (torch.exp(-self.log_vars.float()) / self.task_constants * losses + 0.5 * self.log_vars.float()).sum()

    def as_dict(self) -> dict:
        """``{task: log variance}`` for logging."""
        return {n: float(v) for n, v in zip(self.task_names, self.log_vars.detach().cpu())}


class PerOrganBCELoss(nn.Module):
    """``sum_k BCE(sigmoid(logit_k), y_k)`` over the organ channels (landmark-input U-Net §3.4.3; each BCE
    is the mean over voxels of one organ), plus ``weight_dice * sum_k (1 - softDice_k)`` with nnU-Net's
    ``MemoryEfficientSoftDiceLoss`` when ``weight_dice > 0``. Targets: one binary channel per organ
    (nnU-Net's region targets). Computed in fp32 (the logits are cast). ``ddp``: nnU-Net's flag of
    the same name (batch Dice gathered over the DDP ranks); must be False outside DDP."""

    def __init__(self, weight_dice: float = 0.0, batch_dice: bool = False, ddp: bool = False):
        super().__init__()
        self.weight_dice = weight_dice
        self.dice = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, batch_dice=batch_dice, do_bg=True,
                                                smooth=1e-5, ddp=ddp) if weight_dice > 0 else None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"per-organ logits {tuple(logits.shape)} and targets {tuple(target.shape)} differ in shape")
        target = target.float()
        per_voxel = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        per_organ = per_voxel.transpose(0, 1).reshape(logits.shape[1], -1).mean(1)
        loss = per_organ.sum()
        if self.dice is not None:
            # nnU-Net's soft Dice loss returns -mean_k Dice_k; sum_k (1 - Dice_k) = K * (1 + loss)
            loss = loss + self.weight_dice * logits.shape[1] * (1 + self.dice(logits.float(), target))
        return loss
