"""nnU-Net v2 trainers of the multi-task multi-modality CNN (Moeskops et al., "Deep learning for multi-task medical image segmentation in multiple modalities"; docs/multitask_cnn.md).

- ``nnUNetTrainerOMTLTriplanar``: the paper's triplanar network (§3.1) trained with mini-batches
  balanced over tasks and classes (§3.2), Adam and cross-entropy (§3.2).
- ``nnUNetTrainerOMTLMultiTaskUNet``: nnU-Net's own U-Net (its planned architecture, SGD schedule,
  deep supervision) on the merged dataset with the same balanced batches and cross-entropy.
- ``...DiceCE`` variants add nnU-Net's soft Dice term to the cross-entropy (the Dice option).
- ``..._Tiny``: the CPU schedule of :class:`~organmtl.nnunet_trainers.budget.CPUBudgetMixin` and
  nothing else (docs/trainers.md). The triplanar network's size follows the plan configuration
  (:meth:`TriplanarNetworkMixin.triplanar_size`): on ``organmtl plan-tiny``'s 3d_tiny (8 first-stage
  features, patch <= 32^3) 15 conv layers of 8 kernels and FC layers of 48 nodes, about a second per
  CPU step (docs/multitask_cnn.md); on nnU-Net's 3d_fullres the paper's 25 x 32 and 192.

Training steps are nnU-Net's, through :class:`~organmtl.nnunet_trainers.amp.AMPTrainStepMixin`
(autocast + ``GradScaler`` on CUDA). Each DDP rank draws its own task-balanced batch; a rank whose
batch holds no sample of some task still runs the same loss (cross-entropy over all union classes)
and backward as the others, so no collective depends on the batch content.

Per-task output masking and the Dice-optimal threshold are applied to the saved probabilities
(:mod:`organmtl.nnunet_trainers.multitask.evaluation`), so stock ``nnUNetv2_predict`` output stays
unmasked and both can be measured.
"""
from __future__ import annotations

import torch
from torch import distributed as dist

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from organmtl.nnunet_trainers.amp import AMPTrainStepMixin
from organmtl.nnunet_trainers.budget import CPUBudgetMixin
from organmtl.nnunet_trainers.gpu_memory import GPUMemoryPlanMixin
from organmtl.nnunet_trainers.laterality import LateralityAwareMirroringMixin
from organmtl.nnunet_trainers.multitask.sampler import TaskBalancedDataLoader
from organmtl.nnunet_trainers.multitask.tasks import TaskTable
from organmtl.nnunet_trainers.multitask.triplanar import TriplanarCNN
from organmtl.nnunet_trainers.settings import plan_width_factor


class TaskBalancedSamplingMixin:
    """Training and validation batches from :class:`TaskBalancedDataLoader` (§3.2); the rest of
    nnU-Net's ``get_dataloaders`` (transforms, augmenters, workers) is unchanged."""

    def task_table(self, identifiers=None) -> TaskTable:
        """The merged dataset's tasks (``organmtl_tasks`` of dataset.json, see ``convert merge``)."""
        return TaskTable.from_dataset_json(self.dataset_json, source=f"{self.plans_manager.dataset_name}/dataset.json",
                                           identifiers=identifiers)

    def _ddp_rank_and_world(self) -> tuple[int, int]:
        if self.is_ddp and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def get_dataloaders(self):
        if self.dataset_class is None:
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        patch_size = self.configuration_manager.patch_size
        deep_supervision_scales = self._get_deep_supervision_scales()
        rotation_for_DA, do_dummy_2d_data_aug, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        lm = self.label_manager
        regions = lm.foreground_regions if lm.has_regions else None
        tr_transforms = self.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels, regions=regions, ignore_label=lm.ignore_label)
        val_transforms = self.get_validation_transforms(deep_supervision_scales, is_cascaded=self.is_cascaded,
                                                        foreground_labels=lm.foreground_labels, regions=regions,
                                                        ignore_label=lm.ignore_label)
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        rank, world = self._ddp_rank_and_world()
        workers = get_allowed_n_proc_DA()
        table = self.task_table(list(dataset_tr.identifiers) + list(dataset_val.identifiers))
        dl_tr = TaskBalancedDataLoader(dataset_tr, self.batch_size, initial_patch_size, patch_size, lm, table,
                                       rank=rank, world_size=world, num_workers=workers, transforms=tr_transforms)
        dl_val = TaskBalancedDataLoader(dataset_val, self.batch_size, patch_size, patch_size, lm, table,
                                        rank=rank, world_size=world, num_workers=max(1, workers // 2),
                                        transforms=val_transforms)
        self.print_to_log_file(f"task-balanced batches over {dl_tr.active_tasks} (rank {rank} of {world})")
        if workers == 0:
            mt_gen_train, mt_gen_val = SingleThreadedAugmenter(dl_tr, None), SingleThreadedAugmenter(dl_val, None)
        else:
            pin = self.device.type == "cuda"
            mt_gen_train = NonDetMultiThreadedAugmenter(data_loader=dl_tr, transform=None, num_processes=workers,
                                                        num_cached=max(6, workers // 2), seeds=None,
                                                        pin_memory=pin, wait_time=0.002)
            mt_gen_val = NonDetMultiThreadedAugmenter(data_loader=dl_val, transform=None,
                                                      num_processes=max(1, workers // 2),
                                                      num_cached=max(3, workers // 4), seeds=None,
                                                      pin_memory=pin, wait_time=0.002)
        _ = next(mt_gen_train)
        _ = next(mt_gen_val)
        return mt_gen_train, mt_gen_val


class CrossEntropyLossMixin:
    """Loss of §3.2: categorical cross-entropy. Set ``dice_weight = 1.0`` for nnU-Net's Dice + CE.

    nnU-Net's own compound loss (ignore label, deep-supervision weighting) is built and its Dice
    weight set, so the cross-entropy is nnU-Net's ``RobustCrossEntropyLoss``."""

    dice_weight = 0.0

    def _build_loss(self):
        loss = super()._build_loss()
        inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
        if not isinstance(inner, DC_and_CE_loss):
            raise TypeError(f"{type(self).__name__}: expected nnU-Net's DC_and_CE_loss (label, not region, "
                            f"training), got {type(inner).__name__}")
        inner.weight_dice = float(self.dice_weight)
        return loss


class TriplanarNetworkMixin:
    """The triplanar network (§3.1) in place of nnU-Net's U-Net; Adam (§3.2); no deep supervision.

    The class attributes are the paper's sizes; :meth:`triplanar_size` scales them to the plan."""

    triplanar_num_conv = 25
    triplanar_features = 32
    triplanar_fc_features = 192
    triplanar_dropout = 0.5
    adam_lr = 1e-3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
        self.initial_lr = self.adam_lr

    @classmethod
    def triplanar_size(cls, configuration_manager) -> tuple[int, int, int]:
        """``(num_conv, features, fc_features)`` for a configuration: the paper's widths times the plan's
        first-stage features over 32 (nnU-Net's default and the paper's conv width), and at most as many
        layers as keep the receptive field (``2 * num_conv + 1``) inside the smallest patch edge: beyond
        the patch a training voxel's field sees only zero padding. Derived from the plans alone, so
        ``nnUNetv2_predict`` builds the same network."""
        w = plan_width_factor(configuration_manager, cls.triplanar_features)
        edge = min(int(p) for p in configuration_manager.patch_size)
        num_conv = max(1, min(cls.triplanar_num_conv, (edge - 1) // 2))
        return num_conv, max(1, round(cls.triplanar_features * w)), max(1, round(cls.triplanar_fc_features * w))

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        """nnU-Net's hook, also used by ``nnUNetv2_predict``: a :class:`TriplanarCNN` of
        :meth:`triplanar_size` for the configuration's dimensionality."""
        num_conv, features, fc_features = cls.triplanar_size(configuration_manager)
        return TriplanarCNN(num_input_channels, num_output_channels, num_conv=num_conv, features=features,
                            fc_features=fc_features, dropout=cls.triplanar_dropout,
                            ndim=len(configuration_manager.patch_size))

    def gpu_memory_min_patch(self) -> tuple[int, ...]:
        """The GPU memory plan keeps every edge >= the receptive field ``2 * num_conv + 1`` (rounded up to
        the pooling step), so the predictor's :meth:`triplanar_size` of the chosen patch is this network."""
        rf = 2 * self.triplanar_size(self.configuration_manager)[0] + 1
        return tuple(max(rf, int(s)) for s in super().gpu_memory_min_patch())

    def set_deep_supervision_enabled(self, enabled: bool):
        """The triplanar network has a single output: nothing to switch."""

    def configure_optimizers(self):
        """Adam (§3.2; the paper gives no learning rate: 1e-3, Adam's default) with nnU-Net's poly decay."""
        optimizer = torch.optim.Adam(self.network.parameters(), self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)


# ---------------------------------------------------------------- the trainers

class nnUNetTrainerOMTLTriplanar(LateralityAwareMirroringMixin, AMPTrainStepMixin, TriplanarNetworkMixin,
                                 CrossEntropyLossMixin, TaskBalancedSamplingMixin, GPUMemoryPlanMixin, nnUNetTrainer):
    """Moeskops et al.'s multi-task triplanar CNN (§3.1-3.2): 25 shared 3x3 conv layers per plane,
    96 features, 2 x 192 FC (at nnU-Net's default width, see :meth:`TriplanarNetworkMixin.triplanar_size`), softmax over the union classes; task/class-balanced batches; Adam; CE."""


class nnUNetTrainerOMTLTriplanar_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLTriplanar):
    """CPU variant of :class:`nnUNetTrainerOMTLTriplanar` (the CPU schedule; network size from the plan)."""


class nnUNetTrainerOMTLTriplanarDiceCE(nnUNetTrainerOMTLTriplanar):
    """Triplanar network with nnU-Net's soft Dice + cross-entropy (the Dice option)."""

    dice_weight = 1.0


class nnUNetTrainerOMTLTriplanarDiceCE_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLTriplanarDiceCE):
    """CPU variant of :class:`nnUNetTrainerOMTLTriplanarDiceCE`."""


class nnUNetTrainerOMTLMultiTaskUNet(LateralityAwareMirroringMixin, AMPTrainStepMixin, CrossEntropyLossMixin,
                                     TaskBalancedSamplingMixin, GPUMemoryPlanMixin, nnUNetTrainer):
    """nnU-Net's planned U-Net on the merged dataset with task/class-balanced batches and CE (§3.2)."""


class nnUNetTrainerOMTLMultiTaskUNet_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLMultiTaskUNet):
    """CPU variant of :class:`nnUNetTrainerOMTLMultiTaskUNet`."""


class nnUNetTrainerOMTLMultiTaskUNetDiceCE(nnUNetTrainerOMTLMultiTaskUNet):
    """nnU-Net's U-Net, balanced batches, nnU-Net's Dice + CE loss."""

    dice_weight = 1.0


class nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLMultiTaskUNetDiceCE):
    """CPU variant of :class:`nnUNetTrainerOMTLMultiTaskUNetDiceCE`."""

