"""Partially labelled datasets in one network: the loss of each case counts only the classes its
source annotated (docs/partial_labels.md).

``organmtl convert merge`` of datasets whose anatomies overlap (one annotator labelled liver and
kidneys, another spleen, pancreas and bladder on the same kind of scans) gives every case a label
map in which the organs its source never labelled are background. The shared-background trainers
then teach the network that those organs are background. The trainers here read, per case, which
merged labels its source annotated (``organmtl_annotated_labels`` of dataset.json, written by
``convert merge``; else the case's task in ``organmtl_tasks``; else every label) and offer the two
known formulations (:class:`PartialLabelOptions`, stored with the model):

- ``marginal`` (default): Shi et al., "Marginal loss and exclusion loss for partially supervised
  multi-organ segmentation" (MedIA 2021), §2.2: one softmax over the union of the classes; for a
  case, the probabilities of the classes it did not annotate are added to its background before
  nnU-Net's cross-entropy and soft Dice (:func:`marginal_logits`, :class:`MarginalDCandCELoss`).
  The loss sees only ``p_background + p_unannotated``, so moving probability between them is free.
- ``sigmoid``: MultiTalent (Ulrich et al., "MultiTalent: a multi-dataset approach to medical image
  segmentation", MICCAI 2023, §2): one sigmoid output per foreground class, binary cross-entropy and
  soft Dice masked to the case's annotated classes (:class:`MaskedSigmoidLoss`): an unannotated
  class gets exactly zero gradient from that case. The network (:class:`ZeroBackgroundLogit`)
  prepends a constant zero logit for the background, so the stock predictor's softmax + argmax
  gives the label map "background where every sigmoid is below 0.5, else the most probable class"
  and ``nnUNetv2_predict`` needs no hook beyond ``build_network_architecture``.

Everything else is the multi-task U-Net trainer's: nnU-Net's planned U-Net with deep supervision
(the loss is called per scale by nnU-Net's ``DeepSupervisionWrapper`` with the case mask as a
third argument), the task- and class-balanced loader, nnU-Net's SGD, the AMP step of
:mod:`organmtl.nnunet_trainers.amp`, the GPU memory plan. Under DDP every rank computes the same
loss terms whatever its batch holds; the batch Dice sums (``batch_dice`` plans) and their masks are
all-gathered as nnU-Net's own Dice does, so the set of classes averaged is the same on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.ddp_allgather import AllGatherGrad

from organmtl.converters.merge import ANNOTATED_KEY
from organmtl.nnunet_trainers.amp import AMPTrainStepMixin, float32_region
from organmtl.nnunet_trainers.budget import CPUBudgetMixin
from organmtl.nnunet_trainers.gpu_memory import GPUMemoryPlanMixin
from organmtl.nnunet_trainers.laterality import LateralityAwareMirroringMixin
from organmtl.nnunet_trainers.multitask.tasks import SINGLE_TASK, TaskTable
from organmtl.nnunet_trainers.multitask.trainers import TaskBalancedSamplingMixin
from organmtl.nnunet_trainers.settings import (parse_choice, resolve, set_plans_value, setting, stored_plans_entry,
                                               to_stored)

#: key of the partial-label settings inside the nnU-Net configuration of plans.json
PLANS_KEY = "organmtl_partial_labels"
FORMULATIONS = ("marginal", "sigmoid")
#: nnU-Net's soft Dice smoothing (``nnUNetTrainer._build_loss``)
SMOOTH = 1e-5


def _parse_formulation(name: str, raw: str) -> str:
    return parse_choice(name, raw, FORMULATIONS)


@dataclass(frozen=True)
class PartialLabelOptions:
    """What a user may set; resolved once (stored > environment > default) and stored with the model."""

    formulation: str = setting("marginal", "ORGANMTL_PARTIAL_LOSS", _parse_formulation, str,
                               "marginal (Shi et al.: unannotated softmax probabilities merged into background) "
                               "or sigmoid (MultiTalent: per-class sigmoid, loss masked to annotated classes)")


# ---------------------------------------------------------------------------------- which classes a case annotated
class AnnotatedLabels:
    """Per case, the merged label values (foreground) its source annotated, as ``(B, C)`` masks.

    Read from dataset.json: ``organmtl_annotated_labels`` (``convert merge``) when present (every
    case must be listed), else the case's task in ``organmtl_tasks``, else every label."""

    def __init__(self, table: dict[str, frozenset[int]] | None, num_classes: int, source: str = "dataset.json",
                 task_table: TaskTable | None = None):
        self.table, self.num_classes, self.source, self.task_table = table, int(num_classes), source, task_table

    @classmethod
    def from_dataset_json(cls, meta: dict, num_classes: int, source: str = "dataset.json") -> "AnnotatedLabels":
        fg = {int(v) for k, v in meta.get("labels", {}).items()
              if k not in ("background", "ignore") and not isinstance(v, (list, tuple)) and int(v) > 0}
        raw = meta.get(ANNOTATED_KEY)
        if raw is not None:
            if not isinstance(raw, dict):
                raise ValueError(f"{source}: {ANNOTATED_KEY!r} must map case ids to lists of label values")
            table = {}
            for case, values in raw.items():
                try:
                    vals = frozenset(int(v) for v in values)
                except (TypeError, ValueError):
                    raise ValueError(f"{source}: {ANNOTATED_KEY}[{case!r}] is not a list of label values") from None
                unknown = sorted(vals - fg)
                if unknown:
                    raise ValueError(f"{source}: {ANNOTATED_KEY}[{case!r}] lists value(s) {unknown} that are not "
                                     f"foreground labels of 'labels'")
                table[case] = vals
            return cls(table, num_classes, source)
        tasks = TaskTable.from_dataset_json(meta, source)
        return cls(None, num_classes, source, tasks)

    def of(self, case: str) -> frozenset[int]:
        """Foreground label values ``case`` was annotated for."""
        if self.table is not None:
            try:
                return self.table[case]
            except KeyError:
                raise KeyError(f"{self.source}: case {case!r} is not listed in {ANNOTATED_KEY}") from None
        task = self.task_table.task_of_prediction(case)
        if task == SINGLE_TASK:
            return frozenset(range(1, self.num_classes))
        return frozenset(self.task_table.tasks[task].label_values)

    def mask(self, cases, device=None) -> torch.Tensor:
        """``(len(cases), num_classes)`` bool: background and the annotated classes of each case."""
        m = torch.zeros(len(cases), self.num_classes, dtype=torch.bool)
        m[:, 0] = True
        for i, case in enumerate(cases):
            for v in self.of(str(case)):
                if v < self.num_classes:
                    m[i, v] = True
        return m if device is None else m.to(device)

    def cases(self) -> list[str]:
        if self.table is not None:
            return list(self.table)
        return [c for t in self.task_table.tasks.values() for c in t.cases]

    def never_together(self, cases=None) -> list[tuple[int, int]]:
        """Pairs of foreground classes no case of ``cases`` (default: all listed) annotated together."""
        sets = [self.of(c) for c in (cases if cases is not None else self.cases())]
        seen = sorted(set().union(*sets)) if sets else []
        return [(a, b) for i, a in enumerate(seen) for b in seen[i + 1:] if not any(a in s and b in s for s in sets)]


# ---------------------------------------------------------------------------------- losses
def _spatial(mask2d: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(B, C)`` -> ``(B, C, 1, ..., 1)`` for broadcasting over ``ndim - 2`` spatial axes."""
    return mask2d.view(*mask2d.shape, *([1] * (ndim - 2)))


def marginal_logits(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is Shi et al.'s marginal probabilities: channel 0 becomes
    ``log(exp(z_0) + sum_u exp(z_u))`` over the classes ``u`` the sample did not annotate, and those
    channels become ``-inf`` (probability 0). The normaliser is unchanged, so
    ``softmax(marginal_logits)[0] = p_0 + sum_u p_u`` and ``[a] = p_a`` for annotated ``a``."""
    keep = _spatial(annotated.to(logits.device), logits.ndim)              # (B, C, 1...)
    fg_keep = keep.clone()
    fg_keep[:, 0] = False
    neg_inf = torch.finfo(logits.dtype).min if logits.dtype != torch.float32 else float("-inf")
    merged_bg = torch.logsumexp(logits.masked_fill(fg_keep, neg_inf), dim=1, keepdim=True)
    out = logits.masked_fill(~keep, neg_inf)
    return torch.cat([merged_bg, out[:, 1:]], 1)


def masked_soft_dice(probs: torch.Tensor, onehot: torch.Tensor, include: torch.Tensor, valid: torch.Tensor | None,
                     batch_dice: bool, ddp: bool, smooth: float = SMOOTH) -> torch.Tensor:
    """Negative mean soft Dice (nnU-Net's ``MemoryEfficientSoftDiceLoss`` formula) over the
    ``(sample, class)`` pairs with ``include`` True (``probs``/``onehot``: ``(B, K, ...)``,
    ``include``: ``(B, K)``). ``batch_dice``: sums over the samples that include the class (over all
    DDP ranks when ``ddp``, gathered as nnU-Net does), then the mean over classes some sample
    included. Nothing included: 0 (still attached to the graph)."""
    axes = tuple(range(2, probs.ndim))
    if valid is not None:
        probs, onehot = probs * valid, onehot * valid
    inc = include.to(probs.dtype)
    tp = (probs * onehot).sum(axes) * inc
    sp = probs.sum(axes) * inc
    with torch.no_grad():
        sg = onehot.sum(axes) * inc
    if batch_dice:
        if ddp and dist.is_available() and dist.is_initialized():
            tp, sp = AllGatherGrad.apply(tp).flatten(0, 1), AllGatherGrad.apply(sp).flatten(0, 1)
            sg, inc = AllGatherGrad.apply(sg).flatten(0, 1), AllGatherGrad.apply(inc).flatten(0, 1)
        tp, sp, sg, inc = tp.sum(0), sp.sum(0), sg.sum(0), (inc.sum(0) > 0).to(probs.dtype)
    dc = (2 * tp + smooth) / torch.clip(sg + sp + smooth, 1e-8)
    n = inc.sum()
    if n == 0:
        return 0.0 * probs.sum()
    return -(dc * inc).sum() / n


class MarginalDCandCELoss(nn.Module):
    """Shi et al.'s marginal cross-entropy + marginal soft Dice on nnU-Net's terms: CE over the
    voxels (ignore label excluded) of the marginal probabilities, soft Dice over each sample's
    annotated foreground classes (nnU-Net's ``do_bg=False``). With every class annotated this is
    nnU-Net's ``DC_and_CE_loss`` (tested). A voxel labelled with a class the case does not count
    belongs to the merged background (``p_0 + sum_u p_u`` includes it)."""

    def __init__(self, batch_dice: bool, ddp: bool = False, weight_ce: float = 1.0, weight_dice: float = 1.0,
                 ignore_label: int | None = None):
        super().__init__()
        self.batch_dice, self.ddp = bool(batch_dice), bool(ddp)
        self.weight_ce, self.weight_dice, self.ignore_label = float(weight_ce), float(weight_dice), ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        with float32_region(logits.device.type):
            logits = logits.float()
            target = target[:, 0].long()
            valid = None
            if self.ignore_label is not None:
                valid = target != self.ignore_label
                target = torch.where(valid, target, torch.zeros_like(target))
            # a voxel labelled with a class the case does not count (an edited record) is in the merged background
            ann = annotated.to(logits.device)
            counted = torch.gather(ann, 1, target.flatten(1)).view_as(target)
            target = torch.where(counted, target, torch.zeros_like(target))
            z = marginal_logits(logits, annotated)
            ce = F.cross_entropy(z, target, reduction="none")
            if valid is not None:
                ce = (ce * valid).sum() / valid.sum().clamp_min(1)
            else:
                ce = ce.mean()
            probs = torch.softmax(z, 1)[:, 1:]
            onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
            dc = masked_soft_dice(probs, onehot, annotated[:, 1:].to(logits.device),
                                  None if valid is None else valid[:, None].to(probs.dtype), self.batch_dice, self.ddp)
            return self.weight_ce * ce + self.weight_dice * dc


class MaskedSigmoidLoss(nn.Module):
    """MultiTalent's loss: per foreground class a sigmoid output (channels ``1..K`` of the network's
    output; channel 0 is :class:`ZeroBackgroundLogit`'s constant), binary cross-entropy averaged over
    the annotated ``(sample, class, voxel)`` entries, plus soft Dice over the annotated
    ``(sample, class)`` pairs. Unannotated classes contribute nothing, so get zero gradient."""

    def __init__(self, batch_dice: bool, ddp: bool = False, weight_bce: float = 1.0, weight_dice: float = 1.0,
                 ignore_label: int | None = None):
        super().__init__()
        self.batch_dice, self.ddp = bool(batch_dice), bool(ddp)
        self.weight_bce, self.weight_dice, self.ignore_label = float(weight_bce), float(weight_dice), ignore_label

    def forward(self, output: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        with float32_region(output.device.type):
            logits = output[:, 1:].float()
            k = logits.shape[1]
            target = target[:, 0].long()
            valid = torch.ones_like(target, dtype=torch.bool)
            if self.ignore_label is not None:
                valid = target != self.ignore_label
                target = torch.where(valid, target, torch.zeros_like(target))
            onehot = F.one_hot(target.clamp_max(k), k + 1).movedim(-1, 1)[:, 1:].to(logits.dtype)
            include = annotated[:, 1:].to(logits.device)
            weight = _spatial(include, logits.ndim).to(logits.dtype) * valid[:, None].to(logits.dtype)
            bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
            n = weight.sum()
            bce = (bce * weight).sum() / n if n > 0 else 0.0 * logits.sum()
            dc = masked_soft_dice(torch.sigmoid(logits), onehot, include, valid[:, None].to(logits.dtype),
                                  self.batch_dice, self.ddp)
            return self.weight_bce * bce + self.weight_dice * dc


class ZeroBackgroundLogit(nn.Module):
    """The sigmoid formulation's network: nnU-Net's planned network with ``K`` outputs (one sigmoid
    logit per foreground class), a constant zero logit prepended as channel 0 of every
    (deep-supervision) output. Softmax + argmax of ``[0, l_1..l_K]`` (the stock predictor's rule) is
    background where every ``sigmoid(l_c) < 0.5``, else the class of the largest ``l_c``; with one
    class, ``softmax([0, l]) = [1 - sigmoid(l), sigmoid(l)]``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def decoder(self):
        """nnU-Net's ``set_deep_supervision_enabled`` switches ``network.decoder.deep_supervision``."""
        return self.net.decoder

    @staticmethod
    def _prepend(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x], 1)

    def forward(self, x):
        out = self.net(x)
        if isinstance(out, (list, tuple)):
            return [self._prepend(o) for o in out]
        return self._prepend(out)


# ---------------------------------------------------------------------------------- the trainer
class PartialLabelMixin:
    """Per-case annotated classes in the loss and the online pseudo-Dice; the formulation stored
    with the plans (configuration entry :data:`PLANS_KEY`) and the checkpoint (``init_args``)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net's DDP path sets cuda:rank; a gloo group of CPU processes keeps the CPU (no GradScaler there)
            self.device, self.grad_scaler = device, None
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__}: partial labels need label maps, not region-based training")
        entry, source = stored_plans_entry(self, PLANS_KEY)
        self._adopt_partial(entry, source)
        self.annotated = AnnotatedLabels.from_dataset_json(
            self.dataset_json, self.label_manager.num_segmentation_heads,
            f"{self.plans_manager.dataset_name}/dataset.json")

    # ------------------------------------------------------------------ settings
    def _adopt_partial(self, entry: dict | None, source: str) -> None:
        resolved = resolve(PartialLabelOptions, (entry or {}).get("options"), source or "the plans")
        self.partial_options = resolved.options
        for note in resolved.notes:
            self.print_to_log_file(f"partial-label setting {note}")
        stored = {"options": to_stored(self.partial_options)}
        set_plans_value(self, PLANS_KEY, stored)

    @property
    def formulation(self) -> str:
        return self.partial_options.formulation

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``load_checkpoint`` after adopting the formulation stored in the checkpoint's plans
        (``--c``/``--val``); a checkpoint of the other formulation for an initialised trainer is an error."""
        ckpt = filename_or_checkpoint
        if isinstance(ckpt, str):
            ckpt = torch.load(ckpt, map_location="cpu", weights_only=False)
        source = f"checkpoint {filename_or_checkpoint}" if isinstance(filename_or_checkpoint, str) else "the checkpoint"
        args = ckpt.get("init_args", {})
        entry = args.get("plans", {}).get("configurations", {}).get(args.get("configuration"), {}).get(PLANS_KEY)
        if entry:
            theirs = resolve(PartialLabelOptions, entry.get("options"), source).options
            if theirs != self.partial_options:
                if self.was_initialized:
                    raise ValueError(f"{source}: partial-label formulation {theirs.formulation!r} differs from this "
                                     f"initialised trainer's {self.formulation!r}")
                self._adopt_partial(entry, source)
        super().load_checkpoint(ckpt)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned network (also what ``nnUNetv2_predict`` calls): ``num_output_channels``
        softmax outputs (marginal), or ``num_output_channels - 1`` sigmoid logits behind
        :class:`ZeroBackgroundLogit` (sigmoid), as the configuration's stored entry says."""
        entry = configuration_manager.configuration.get(PLANS_KEY)
        if entry is None:
            raise ValueError(f"plans configuration has no {PLANS_KEY!r} entry: it was not trained with a "
                             f"partial-label trainer")
        formulation = _parse_formulation(PLANS_KEY, str(entry["options"]["formulation"]))
        if formulation == "sigmoid":
            return ZeroBackgroundLogit(nnUNetTrainer.build_network_architecture(
                plans_manager, configuration_manager, num_input_channels, num_output_channels - 1,
                enable_deep_supervision))
        return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)

    # ------------------------------------------------------------------ loss and steps
    def _build_loss(self):
        kwargs = {"batch_dice": self.configuration_manager.batch_dice, "ddp": self.is_ddp,
                  "ignore_label": self.label_manager.ignore_label}
        loss = MaskedSigmoidLoss(**kwargs) if self.formulation == "sigmoid" else MarginalDCandCELoss(**kwargs)
        if self.enable_deep_supervision:
            # nnU-Net's weighting (see nnUNetTrainer._build_loss): 1/2^i, the lowest scale 0 (1e-6 under DDP)
            import numpy as np
            weights = np.array([1 / (2 ** i) for i in range(len(self._get_deep_supervision_scales()))])
            weights[-1] = 1e-6 if self.is_ddp and not self._do_i_compile() else 0
            loss = DeepSupervisionWrapper(loss, weights / weights.sum())
        return loss

    def initialize(self):
        first = not self.was_initialized
        super().initialize()
        if first:
            names = {int(v): k for k, v in self.dataset_json["labels"].items() if isinstance(v, int)}
            pairs = self.annotated.never_together()
            self.print_to_log_file(f"partial labels: formulation {self.formulation} (stored with the plans); "
                                   f"{len(pairs)} class pair(s) never annotated together"
                                   + (f", e.g. {names.get(pairs[0][0])} + {names.get(pairs[0][1])}" if pairs else ""))

    def annotated_mask(self, batch: dict) -> torch.Tensor:
        if "keys" not in batch:
            raise KeyError(f"{type(self).__name__}: the batch has no 'keys' (case ids), so the annotated classes "
                           f"of its samples are unknown")
        return self.annotated.mask(list(batch["keys"]), self.device)

    def compute_loss(self, output, target, annotated: torch.Tensor) -> torch.Tensor:
        if isinstance(output, (list, tuple)):
            return self.loss(output, target, [annotated] * len(output))
        return self.loss(output, target, annotated)

    def train_step(self, batch: dict) -> dict:
        data, target = self.batch_to_device(batch)
        annotated = self.annotated_mask(batch)
        loss, _ = self.amp_step(lambda: (self.compute_loss(self.network(data), target, annotated), {}))
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (loss, hard TP/FP/FN for the pseudo-Dice) with the partial loss and
        TP/FP/FN summed only over the samples that annotated each class."""
        data, target = self.batch_to_device(batch)
        annotated = self.annotated_mask(batch)
        with torch.no_grad(), self.autocast_context():
            output = self.network(data)
            loss = self.compute_loss(output, target, annotated)
        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        seg = output.argmax(1)[:, None]
        onehot = torch.zeros(output.shape, device=output.device, dtype=torch.float32)
        onehot.scatter_(1, seg, 1)
        mask = None
        if self.label_manager.has_ignore_label:
            mask = (target != self.label_manager.ignore_label).float()
            target = torch.where(target == self.label_manager.ignore_label, torch.zeros_like(target), target)
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=list(range(2, output.ndim)), mask=mask)
        keep = annotated.to(tp.dtype)
        tp, fp, fn = ((x * keep).sum(0)[1:].detach().cpu().numpy() for x in (tp, fp, fn))
        return {"loss": loss.detach().cpu().numpy(), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}


class nnUNetTrainerOMTLPartialLabels(PartialLabelMixin, LateralityAwareMirroringMixin, AMPTrainStepMixin,
                                     TaskBalancedSamplingMixin, GPUMemoryPlanMixin, nnUNetTrainer):
    """nnU-Net's U-Net on a merged, partially labelled dataset: each case's loss counts only the classes
    its source annotated (``ORGANMTL_PARTIAL_LOSS``: ``marginal`` default, or ``sigmoid``; stored with
    the model); task/class-balanced batches; deep supervision; nnU-Net's SGD."""


class nnUNetTrainerOMTLPartialLabels_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLPartialLabels):
    """CPU variant of :class:`nnUNetTrainerOMTLPartialLabels` (the CPU schedule, nothing else)."""
