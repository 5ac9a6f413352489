"""FocusNetv2 losses (FocusNetv2 paper §3.2-3.3).

- :class:`WeightedFocalLoss` Eq. 1, :func:`generalised_dice_loss` Eq. 2, :class:`SegmentationLoss` Eq. 3;
- :func:`heatmap_l2_loss` (§3.1.2, L2 between SOL-Net heatmaps and Gaussian targets);
- :func:`reconstruction_loss` Eq. 4, :func:`shape_loss` Eq. 5, :func:`generator_loss` Eq. 7,
  :func:`discriminator_loss` Eq. 8 (the maximisation of Eq. 8 written as a minimisation).

Reductions (the paper writes sums without normalisation): focal = mean over voxels, Dice terms
summed over classes as Eq. 2, L2 terms = mean squared error. Every loss is computed in fp32 (inputs
from an autocast forward are cast up). See docs/focusnetv2.md.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def alpha_from_sizes(sizes: Sequence[float]) -> torch.Tensor:
    """Class weights of Eq. 1: alpha_t inversely proportional to each class' mean size, normalised to
    sum to 1. A class never seen (size 0) gets the weight of the smallest seen class."""
    s = torch.as_tensor([float(v) for v in sizes], dtype=torch.float64)
    if (s <= 0).all():
        raise ValueError("alpha_from_sizes: every class has size 0")
    s = torch.where(s > 0, s, s[s > 0].min())
    inv = 1.0 / s
    return (inv / inv.sum()).float()


def focal_class_weights(sizes: Sequence[float]) -> torch.Tensor:
    """S-Net's class weights alpha_t of Eq. 1: inversely proportional to each class' mean size (the
    background included), scaled so that their voxel-frequency-weighted mean is 1,
    ``sum_c f_c alpha_c = 1`` with ``f_c = s_c / sum(s)``, i.e. ``alpha_c = sum(s) / (C s_c)``.

    The paper fixes only the proportionality; weights summing to 1 (:func:`alpha_from_sizes`) give the
    background ~1e-4 and, at initialisation, a focal term ~1e-4 of the generalised Dice term with
    a ~40x smaller gradient, so Eq. 3 would train on Dice alone. With a mean weight of 1 the focal term at a uniform prediction
    equals the unweighted focal loss. A class never seen (size 0) gets the weight of the smallest seen
    class (docs/focusnetv2.md "Losses")."""
    s = torch.as_tensor([float(v) for v in sizes], dtype=torch.float64)
    if (s <= 0).all():
        raise ValueError("focal_class_weights: every class has size 0")
    s = torch.where(s > 0, s, s[s > 0].min())
    return (s.sum() / (len(s) * s)).float()


def _valid_mask(target: torch.Tensor, ignore_label: int | None):
    if ignore_label is None:
        return None
    return (target != ignore_label)


class WeightedFocalLoss(nn.Module):
    """Eq. 1: mean over voxels of -alpha_t (1 - p_t)^gamma log p_t, t = the voxel's true class.

    ``logits`` ``(B, C, *spatial)``, ``target`` ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer labels;
    voxels labelled ``ignore_label`` do not count.
    """

    def __init__(self, alpha: Sequence[float] | torch.Tensor, gamma: float = 2.0, ignore_label: int | None = None):
        super().__init__()
        self.register_buffer("alpha", torch.as_tensor(alpha, dtype=torch.float32).clone())
        self.gamma = float(gamma)
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target[:, 0] if target.ndim == logits.ndim else target
        t = t.long()
        valid = _valid_mask(t, self.ignore_label)
        if valid is not None:
            t = torch.where(valid, t, torch.zeros_like(t))
        logp = F.log_softmax(logits.float(), 1).gather(1, t[:, None])[:, 0]
        pt = logp.exp()
        loss = -self.alpha.to(logits.device)[t] * (1 - pt) ** self.gamma * logp
        if valid is not None:
            return (loss * valid).sum() / valid.sum().clamp_min(1)
        return loss.mean()


def generalised_dice_loss(probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor | None = None,
                          smooth: float = 1e-5) -> torch.Tensor:
    """Eq. 2: sum over classes t of 1 - 2 sum(y_t p_t) / (sum y_t + sum p_t), sums over the batch and
    all voxels (``probs``, ``onehot``: ``(B, C, *spatial)``; ``valid``: ``(B, *spatial)`` or None)."""
    if valid is not None:
        v = valid[:, None].to(probs.dtype)
        probs, onehot = probs * v, onehot * v
    axes = [0] + list(range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    return (1 - (2 * inter + smooth) / (denom + smooth)).sum()


class SegmentationLoss(nn.Module):
    """Eq. 3: L_seg = L_focal + lambda L_dice (lambda = 1), on multi-class logits and label maps.
    Works as nnU-Net's ``self.loss(output, target)``."""

    def __init__(self, alpha, gamma: float = 2.0, dice_weight: float = 1.0, ignore_label: int | None = None):
        super().__init__()
        self.focal = WeightedFocalLoss(alpha, gamma, ignore_label)
        self.dice_weight = float(dice_weight)
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = (target[:, 0] if target.ndim == logits.ndim else target).long()
        valid = _valid_mask(t, self.ignore_label)
        t0 = t if valid is None else torch.where(valid, t, torch.zeros_like(t))
        onehot = F.one_hot(t0, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
        dice = generalised_dice_loss(torch.softmax(logits.float(), 1), onehot.float(), valid)
        return self.focal(logits, target) + self.dice_weight * dice


def binary_segmentation_loss(prob: torch.Tensor, mask: torch.Tensor, alpha_fg: float, gamma: float = 2.0,
                             dice_weight: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 3 for one SOS-Net output (two classes: organ / ROI background) from the sigmoid
    probability ``prob`` and the binary ``mask`` (same shape); ``alpha_fg`` is the organ's focal
    weight (the background gets 1 - alpha_fg)."""
    prob = prob.float().clamp(eps, 1 - eps)
    m = mask.float()
    pt = torch.where(m > 0.5, prob, 1 - prob)
    at = torch.where(m > 0.5, torch.full_like(prob, alpha_fg), torch.full_like(prob, 1 - alpha_fg))
    focal = (-at * (1 - pt) ** gamma * torch.log(pt)).mean()
    probs = torch.stack([1 - prob, prob], 1)
    onehot = torch.stack([1 - m, m], 1)
    return focal + dice_weight * generalised_dice_loss(probs, onehot)


def heatmap_l2_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """§3.1.2: L2 loss between SOL-Net heatmaps and the Gaussian centre targets (mean over voxels)."""
    return F.mse_loss(pred.float(), target.float())


def reconstruction_loss(rec_gt: torch.Tensor, gt: torch.Tensor, rec_pred: torch.Tensor | None = None,
                        pred: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4: ||D(y) - y||^2 + ||D(G(x)) - G(x)||^2 (each term a mean squared error; the second is
    left out when no prediction is given, i.e. the autoencoder pre-training on ground truth)."""
    loss = F.mse_loss(rec_gt.float(), gt.float())
    if rec_pred is not None:
        loss = loss + F.mse_loss(rec_pred.float(), pred.float())
    return loss


#: added to the denominator of :func:`shape_loss` (guards a scale whose features are all zero)
SHAPE_EPS = 1e-6


def shape_loss(features_gt: Sequence[torch.Tensor], features_pred: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 5, made invariant to the scale of each feature map: per scale a (ground truth) and b
    (prediction) of D_latent (the latent code and the multi-scale decoder features), the squared distance
    divided by the squared magnitudes of both, ``mean((a - b)^2) / (mean(a^2) + mean(b^2) + SHAPE_EPS)``
    (= 1 - 2 a.b / (|a|^2 + |b|^2), in [0, 2], 0 only at b = a), summed over the scales.

    Deviation from the paper's plain squared distance (docs/focusnetv2.md "Shape loss scale"): every
    scale of Table 9's autoencoder can be multiplied by any s > 0 at no cost in L_rec (the latent code
    through the FC layers, the ReLU features through the batch norm or the linear layer after them), so
    the D step of Eq. 8, which maximises lambda2 L_shape, grows the plain distance without bound and
    lambda1 L_shape of Eq. 7 with it. The ratio does not change when a and b are scaled together, so
    its gradient has no component along such a rescaling, and it is bounded. Nothing is detached here
    (a detached denominator would leave D the numerator's push along the scale; dividing by the ground
    truth's magnitude alone lets D shrink it below the prediction's without bound); the G step passes
    detached ground-truth features, and for G the minimum is still b = a."""
    total = 0.0
    for a, b in zip(features_gt, features_pred):
        a, b = a.float(), b.float()
        total = total + F.mse_loss(a, b) / (a.pow(2).mean() + b.pow(2).mean() + SHAPE_EPS)
    return total


def generator_loss(seg_loss: torch.Tensor, l_shape: torch.Tensor, lambda1: float = 5.0) -> torch.Tensor:
    """Eq. 7: L_G = L_seg + lambda1 L_shape (lambda1 = 5)."""
    return seg_loss + lambda1 * l_shape


def discriminator_loss(l_rec: torch.Tensor, l_shape: torch.Tensor, lambda2: float = 0.001) -> torch.Tensor:
    """Eq. 8 as a minimisation: max_D (-L_rec + lambda2 L_shape) == min_D (L_rec - lambda2 L_shape)."""
    return l_rec - lambda2 * l_shape
