"""Trainer plumbing shared by every landmark trainer: landmark channels found in ``dataset.json``,
recorded in the plans for the predictor, protected from intensity augmentation, and no mirroring when
the maps are one channel per landmark of a left/right pair."""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from organmtl.nnunet_trainers.amp import AMPTrainStepMixin
from organmtl.nnunet_trainers.landmarks.channels import LandmarkChannels, LandmarkChannelsError
from organmtl.nnunet_trainers.landmarks.transforms import protect_landmark_channels
from organmtl.nnunet_trainers.gpu_memory import GPUMemoryPlanMixin
from organmtl.nnunet_trainers.laterality import LateralityAwareMirroringMixin, lateral_pairs


class LandmarkChannelsTrainer(AMPTrainStepMixin, LateralityAwareMirroringMixin, GPUMemoryPlanMixin, nnUNetTrainer):
    """nnU-Net trainer for datasets whose last input channels are landmark maps.

    Training steps go through nnU-Net's AMP path (:class:`~organmtl.nnunet_trainers.amp.AMPTrainStepMixin`).

    ``landmark_encodings``: encodings this trainer accepts (``heatmap``, ``distance``);
    ``landmark_channels_required``: refuse datasets without landmark channels (else all channels are
    image channels).
    """

    landmark_encodings = ("heatmap", "distance")
    landmark_channels_required = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        name = self.plans_manager.dataset_name
        if "organmtl_landmark_channels" in dataset_json or self.landmark_channels_required:
            lc = LandmarkChannels.from_dataset_json(dataset_json, name)
            if lc.encoding not in self.landmark_encodings:
                raise LandmarkChannelsError(
                    f"{name}/dataset.json: landmark channels are {lc.encoding!r} maps but {type(self).__name__} "
                    f"needs {' or '.join(self.landmark_encodings)} (convert with --landmark-channels "
                    f"{self.landmark_encodings[0]})")
        else:
            n = len(dataset_json["channel_names"])
            lc = LandmarkChannels(n_image=n, n_landmark=0, encoding="none", channel_names=(), landmarks=())
        self.landmark_channels = lc
        lc.store_in_plans(self.plans_manager, self.configuration_manager, configuration)

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, *args, **kwargs):
        """nnU-Net's pipeline with the landmark maps moved by the spatial transforms only."""
        transforms = super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                                     do_dummy_2d_data_aug, *args, **kwargs)
        if self.landmark_channels.n_landmark == 0:
            return transforms
        return protect_landmark_channels(transforms, self.landmark_channels.n_image)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Also no mirroring when per-landmark channels come in left/right pairs (a flip swaps them)."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        pairs = lateral_pairs(self.landmark_channels.channel_names)
        if pairs and mirror_axes is not None:
            self.print_to_log_file(f"landmark channels come in left/right pairs {pairs}: mirroring disabled")
            mirror_axes = None
            self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, mirror_axes

    def _module(self):
        """The network module itself (unwrapped from DDP / torch.compile)."""
        net = self.network.module if self.is_ddp else self.network
        return getattr(net, "_orig_mod", net)
