"""Landmarks as input (landmark-input U-Net paper §3.4-3.6).

Datasets come from ``organmtl convert ... --landmark-channels distance`` (the paper's normalised
inverse Manhattan map; ``heatmap`` works too), which appends the map(s) as ``noNorm`` channels.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from organmtl.nnunet_trainers.budget import CPUBudgetMixin
from organmtl.nnunet_trainers.landmarks.base import LandmarkChannelsTrainer
from organmtl.nnunet_trainers.landmarks.channels import LandmarkChannels
from organmtl.nnunet_trainers.landmarks.losses import PerOrganBCELoss
from organmtl.nnunet_trainers.landmarks.networks import ImageChannelsUNet, LateFusionUNet, MultiTaskBlockUNet


def _stock_unet(plans_manager, configuration_manager, n_in, n_out, deep_supervision):
    return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, n_in, n_out, deep_supervision)


class nnUNetTrainerOMTLLandmarkEarlyFusion(LandmarkChannelsTrainer):
    """Early fusion (§3.6, Fig. 6): the landmark map is one more input channel of nnU-Net's U-Net.
    Unlike the stock trainer on the same dataset, the map follows the patch through the spatial
    augmentation but never through the intensity augmentation (nor normalisation: ``noNorm``)."""


class nnUNetTrainerOMTLLandmarkLateFusion(LandmarkChannelsTrainer):
    """Late fusion (§3.6, Fig. 6): the map bypasses the encoder and is concatenated to the last decoder
    features before the segmentation layer (:class:`~.networks.LateFusionUNet`)."""

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        lc = LandmarkChannels.from_configuration(configuration_manager.configuration)
        unet = _stock_unet(plans_manager, configuration_manager, lc.n_image, num_output_channels, enable_deep_supervision)
        return LateFusionUNet(unet, lc.n_image, lc.n_landmark)


class nnUNetTrainerOMTLLandmarkImageOnly(LandmarkChannelsTrainer):
    """No-landmark baseline on a dataset that carries landmark channels: the network sees the image
    channels only (the stock trainer on the same images converted without ``--landmark-channels``)."""

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        lc = LandmarkChannels.from_configuration(configuration_manager.configuration)
        unet = _stock_unet(plans_manager, configuration_manager, lc.n_image, num_output_channels, enable_deep_supervision)
        return ImageChannelsUNet(unet, lc.n_image)


def region_dataset_json(dataset_json: dict) -> dict:
    """``dataset.json`` with every organ label turned into its own nnU-Net region, in label order:
    nnU-Net then trains one sigmoid output per organ and exports label maps by thresholding each at
    0.5 in ``regions_class_order``. The region is written ``[k, k]`` because nnU-Net's LabelManager
    only treats lists of more than one label as regions (a one-organ region means the same)."""
    labels = dataset_json["labels"]
    if "ignore" in labels:
        raise ValueError("dataset.json: the multi-task block has no ignore-label handling; drop the 'ignore' label")
    if "regions_class_order" in dataset_json:
        return dataset_json
    organs = sorted(((n, v) for n, v in labels.items() if v != 0), key=lambda kv: kv[1])
    out = dict(dataset_json)
    out["labels"] = {"background": 0, **{n: [int(v), int(v)] for n, v in organs}}
    out["regions_class_order"] = [int(v) for _, v in organs]
    return out


class nnUNetTrainerOMTLMultiTaskBlock(LandmarkChannelsTrainer):
    """Multi-organ "multi-task block" (§3.4.1, Fig. 2): one double-conv + 1x1 head per organ with an
    independent sigmoid output, trained with the sum of the per-organ BCE losses (§3.4.3). Landmark
    maps, when the dataset has them, are early-fusion input channels."""

    landmark_channels_required = False
    weight_dice = 0.0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, region_dataset_json(dataset_json), device)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        unet = _stock_unet(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                           enable_deep_supervision)
        return MultiTaskBlockUNet(unet, num_input_channels, num_output_channels)

    def _build_loss(self):
        """nnU-Net's region loss with its deep-supervision weighting, the per-output loss replaced by
        :class:`~.losses.PerOrganBCELoss`."""
        loss = super()._build_loss()
        organ_loss = PerOrganBCELoss(self.weight_dice, batch_dice=self.configuration_manager.batch_dice,
                                     ddp=self.is_ddp)
        if hasattr(loss, "weight_factors"):
            loss.loss = organ_loss
            return loss
        return organ_loss


class nnUNetTrainerOMTLMultiTaskBlockDice(nnUNetTrainerOMTLMultiTaskBlock):
    """Multi-task block with ``sum_k (BCE_k + (1 - softDice_k))`` (the Dice option)."""

    weight_dice = 1.0


class nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkEarlyFusion):
    """:class:`nnUNetTrainerOMTLLandmarkEarlyFusion` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkLateFusion_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkLateFusion):
    """:class:`nnUNetTrainerOMTLLandmarkLateFusion` on the CPU budget schedule."""


class nnUNetTrainerOMTLLandmarkImageOnly_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLLandmarkImageOnly):
    """:class:`nnUNetTrainerOMTLLandmarkImageOnly` on the CPU budget schedule."""


class nnUNetTrainerOMTLMultiTaskBlock_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLMultiTaskBlock):
    """:class:`nnUNetTrainerOMTLMultiTaskBlock` on the CPU budget schedule."""


class nnUNetTrainerOMTLMultiTaskBlockDice_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLMultiTaskBlockDice):
    """:class:`nnUNetTrainerOMTLMultiTaskBlockDice` on the CPU budget schedule."""
