"""Landmarks as an auxiliary task (landmark multi-task U-Net thesis §2.3-2.6, Appendix A.7).

Datasets come from ``organmtl convert ... --landmark-channels heatmap`` (Gaussian blobs, sigma in mm,
max-merged or ``--one-channel-per-landmark``): nnU-Net preprocesses the heatmaps with the image,
:mod:`.transforms` keeps them aligned under spatial augmentation and away from intensity
augmentation, and the trainers split them off the input as the landmark tail's targets.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from torch import distributed as dist

from organmtl.nnunet_trainers.amp import float32_region
from organmtl.nnunet_trainers.budget import CPUBudgetMixin
from organmtl.nnunet_trainers.landmarks.base import LandmarkChannelsTrainer
from organmtl.nnunet_trainers.landmarks.channels import LandmarkChannels
from organmtl.nnunet_trainers.landmarks.localisation import patch_landmark_errors
from organmtl.nnunet_trainers.landmarks.losses import UncertaintyWeighting, heatmap_mse
from organmtl.nnunet_trainers.landmarks.networks import LandmarkTailUNet, ThesisCTWindow
from organmtl.nnunet_trainers.landmarks.progress import LandmarkProgressLogger, nanmean_or_nan


class nnUNetTrainerOMTLLandmarkJoint(LandmarkChannelsTrainer):
    """Joint training (thesis §2.5.1, Eq. 1): ``L = L_seg + lambda_landmarks * MSE(heatmaps)`` on every
    batch; ``L_seg`` is nnU-Net's Dice + CE with deep supervision, the landmark tail has no deep
    supervision. ``lambda_landmarks`` = 1 here; the thesis' variants 3, 5 and 10 are subclasses.

    Validation adds the landmark error in mm (argmax vs truth, :mod:`.localisation`) and the heatmap
    RMSE (thesis Eq. 3) to nnU-Net's log and ``progress.png``.
    """

    landmark_encodings = ("heatmap",)
    lambda_landmarks = 1.0
    thesis_ct_window = False       # thesis §2.2 CT window (clamp [-1024, 1024] HU, / 500) in the network
    landmark_tail_features = None  # None: nnU-Net's full-resolution width (the thesis' 64 for its U-Net)
    landmark_tail_width = 1.0      # factor on that width (the "Lite" variant: 0.25)
    extra_log_keys: tuple = ()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = LandmarkProgressLogger(self.extra_log_keys)
        self.landmark_spacing = list(self.configuration_manager.spacing)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        lc = LandmarkChannels.from_configuration(configuration_manager.configuration)
        unet = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, lc.n_image,
                                                        num_output_channels, enable_deep_supervision)
        window = ThesisCTWindow.from_plans(plans_manager, configuration_manager) if cls.thesis_ct_window else None
        return LandmarkTailUNet(unet, lc.n_image, lc.n_landmark, cls.landmark_tail_features, window,
                                tail_width=cls.landmark_tail_width)

    # ------------------------------------------------------------------ losses

    def combine_losses(self, seg_loss: torch.Tensor, landmark_loss: torch.Tensor) -> torch.Tensor:
        """Thesis Eq. 1 with lambda_segmentation = 1."""
        return seg_loss + self.lambda_landmarks * landmark_loss

    def landmark_losses(self, data: torch.Tensor, target) -> tuple[torch.Tensor, dict]:
        """Forward pass and ``combine_losses`` of one batch (run under autocast by ``amp_step``).

        The segmentation loss is nnU-Net's (its Dice and CE cast to fp32 themselves); the heatmap MSE
        and the combination (uncertainty weighting's ``exp(-log_var)``) run in fp32 outside autocast.
        Every term is computed on every batch, also one whose patches hold no landmark (an all-zero
        target): each DDP rank runs the same graph and backward."""
        seg, heatmaps = self.network(data)
        seg_loss = self.loss(seg, target)
        with float32_region(self.device.type):
            landmark_loss = heatmap_mse(heatmaps.float(), data[:, self.landmark_channels.n_image:].float())
            loss = self.combine_losses(seg_loss.float(), landmark_loss)
        return loss, {"seg_loss": seg_loss, "landmark_loss": landmark_loss}

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train step (same optimiser, AMP and ``GradScaler``, gradient clipping at 12;
        :meth:`~organmtl.nnunet_trainers.amp.AMPTrainStepMixin.amp_step`) on ``combine_losses``."""
        data, target = self.batch_to_device(batch)
        self._module().outputs = "both"
        try:
            loss, parts = self.amp_step(lambda: self.landmark_losses(data, target))
        finally:
            self._module().outputs = "segmentation"
        return {"loss": loss.detach().cpu().numpy(), "seg_loss": float(parts["seg_loss"].detach()),
                "landmark_loss": float(parts["landmark_loss"].detach())}

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        out = collate_outputs(train_outputs)
        self.print_to_log_file(f"train segmentation loss {np.mean(out['seg_loss']):.4f}, "
                               f"landmark MSE {np.mean(out['landmark_loss']):.5f}")

    # ------------------------------------------------------------------ validation

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (segmentation loss, pseudo Dice) plus landmark numbers of the batch."""
        net = self._module()
        net.keep_landmarks = True
        try:
            result = super().validation_step(batch)
            heatmaps = net.last_landmarks
        finally:
            net.keep_landmarks, net.last_landmarks = False, None
        target = batch["data"][:, self.landmark_channels.n_image:].to(heatmaps.device)
        sq = ((heatmaps.float() - target.float()) ** 2)
        errors = patch_landmark_errors(heatmaps, target, self.landmark_spacing, self.landmark_channels.merged)
        result.update({"heatmap_sq_sum": float(sq.sum()), "heatmap_voxels": int(sq.numel()),
                       "landmark_errors_mm": [float(e) for e in errors]})
        return result

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        out = collate_outputs(val_outputs)
        numbers = (float(np.sum(out["heatmap_sq_sum"])), int(np.sum(out["heatmap_voxels"])), out["landmark_errors_mm"])
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, numbers)
        else:
            gathered = [numbers]
        sq_sum = sum(g[0] for g in gathered)
        voxels = sum(g[1] for g in gathered)
        errors = [e for g in gathered for e in g[2]]
        rmse = float(np.sqrt(sq_sum / voxels)) if voxels else float("nan")
        error_mm = nanmean_or_nan(errors)
        self.logger.log("heatmap_rmse", rmse, self.current_epoch)
        self.logger.log("landmark_error_mm", error_mm, self.current_epoch)
        self.print_to_log_file(f"landmark error {error_mm:.2f} mm over {len(errors)} landmarks in validation "
                               f"patches, heatmap RMSE {rmse:.4f}")


class nnUNetTrainerOMTLLandmarkJointL3(nnUNetTrainerOMTLLandmarkJoint):
    """Joint training with lambda_landmarks = 3 (thesis §2.8, Table 8)."""

    lambda_landmarks = 3.0


class nnUNetTrainerOMTLLandmarkJointL5(nnUNetTrainerOMTLLandmarkJoint):
    """Joint training with lambda_landmarks = 5 (thesis §2.8, Table 8)."""

    lambda_landmarks = 5.0


class nnUNetTrainerOMTLLandmarkJointL10(nnUNetTrainerOMTLLandmarkJoint):
    """Joint training with lambda_landmarks = 10 (thesis §2.8, Table 8)."""

    lambda_landmarks = 10.0


class nnUNetTrainerOMTLLandmarkJointLite(nnUNetTrainerOMTLLandmarkJoint):
    """Joint training with a landmark tail a quarter as wide (not in the thesis; a speed option).

    The thesis' tail (2 convs + 1x1 at full resolution, as wide as the last decoder stage) repeats the
    most expensive stage of the U-Net: +38-40% FLOPs per training step on nnU-Net's 3d_fullres and
    tiny plans (docs/landmark_unets.md). At a quarter of the width: +7% on a 3d_fullres-like plan.
    """

    landmark_tail_width = 0.25


class nnUNetTrainerOMTLLandmarkJointThesisCT(nnUNetTrainerOMTLLandmarkJoint):
    """Joint training with the thesis' CT preprocessing (§2.2: clamp [-1024, 1024] HU, divide by 500)."""

    thesis_ct_window = True


class nnUNetTrainerOMTLLandmarkAlternate(nnUNetTrainerOMTLLandmarkJoint):
    """Alternate training (thesis §2.5.2): each batch optimises one task's loss, tasks in turn
    (even global iterations: segmentation, odd: landmarks).

    The other task's loss enters with weight 0, so its tail gets zero gradients (not none): DDP
    without ``find_unused_parameters`` needs a gradient for every parameter on every step. The turn is
    ``epoch * iterations_per_epoch + iteration``, the same on every DDP rank and after ``--c``.
    """

    tasks = ("segmentation", "landmarks")

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.global_iteration = self.current_epoch * self.num_iterations_per_epoch

    def current_task(self) -> str:
        """The task whose loss the current iteration optimises."""
        return self.tasks[getattr(self, "global_iteration", 0) % len(self.tasks)]

    def combine_losses(self, seg_loss, landmark_loss):
        if self.current_task() == "segmentation":
            return seg_loss + 0.0 * landmark_loss
        return 0.0 * seg_loss + landmark_loss

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        result["task"] = self.current_task()
        self.global_iteration = getattr(self, "global_iteration", 0) + 1
        return result

    def on_train_epoch_end(self, train_outputs):
        # nnU-Net's 'train_losses' mixes both tasks here; log each task's mean over its own iterations
        LandmarkChannelsTrainer.on_train_epoch_end(self, train_outputs)
        out = collate_outputs(train_outputs)
        seg = [l for l, t in zip(out["seg_loss"], out["task"]) if t == "segmentation"]
        lm = [l for l, t in zip(out["landmark_loss"], out["task"]) if t == "landmarks"]
        self.print_to_log_file(f"alternate: {len(seg)} segmentation iterations (loss {nanmean_or_nan(seg):.4f}), "
                               f"{len(lm)} landmark iterations (MSE {nanmean_or_nan(lm):.5f})")


class nnUNetTrainerOMTLLandmarkUncertainty(nnUNetTrainerOMTLLandmarkJoint):
    """Uncertainty-weighted joint training (thesis Appendix A.7.4, Eq. 9; Kendall et al. 2018).

    The log-variances are parameters of the network module (``task_weighting.log_vars``), optimised
    with it, saved in every checkpoint and restored by ``nnUNetv2_train ... --c``; they are logged per
    epoch (``log_var_segmentation``, ``log_var_landmarks`` in the log and ``progress.png``).
    """

    extra_log_keys = ("log_var_segmentation", "log_var_landmarks")

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        net = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                 num_output_channels, enable_deep_supervision)
        net.task_weighting = UncertaintyWeighting(("segmentation", "landmarks"), (1.0, 2.0))
        return net

    def combine_losses(self, seg_loss, landmark_loss):
        return self._module().task_weighting([seg_loss, landmark_loss])

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"uncertainty weighting log variances at start: {self._module().task_weighting.as_dict()}")

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        log_vars = self._module().task_weighting.as_dict()
        for task, value in log_vars.items():
            self.logger.log(f"log_var_{task}", value, self.current_epoch)
        self.print_to_log_file(f"uncertainty weighting log variances: {log_vars}")


class nnUNetTrainerOMTLLandmarkJoint_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkJoint):
    """:class:`nnUNetTrainerOMTLLandmarkJoint` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkJointL3_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkJointL3):
    """:class:`nnUNetTrainerOMTLLandmarkJointL3` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkJointL5_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkJointL5):
    """:class:`nnUNetTrainerOMTLLandmarkJointL5` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkJointL10_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkJointL10):
    """:class:`nnUNetTrainerOMTLLandmarkJointL10` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkJointLite_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkJointLite):
    """:class:`nnUNetTrainerOMTLLandmarkJointLite` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkJointThesisCT_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkJointThesisCT):
    """:class:`nnUNetTrainerOMTLLandmarkJointThesisCT` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkAlternate_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkAlternate):
    """:class:`nnUNetTrainerOMTLLandmarkAlternate` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkUncertainty_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkUncertainty):
    """:class:`nnUNetTrainerOMTLLandmarkUncertainty` on the CPU budget schedule."""
