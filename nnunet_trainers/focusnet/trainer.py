"""FocusNetv2 as nnU-Net v2 trainers (FocusNetv2 paper §3-4; docs/focusnetv2.md).

One ``nnUNetv2_train`` call runs the staged schedule of §4.2 as phases (epoch budgets from
``ORGANMTL_FOCUSNET_PHASE_EPOCHS``, see :mod:`.options`): ``snet`` (S-Net, L_seg) -> ``sol`` (SOL-Net,
S-Net frozen, L2 heatmap loss) -> ``ae`` (shape autoencoder pre-trained on ground-truth ROI masks,
Eq. 4 on y only) -> ``sos`` (SOS-Nets, S-Net and SOL-Net frozen, alternating with the autoencoder:
Eq. 7 / Eq. 8) -> ``joint`` (everything fine-tuned together, autoencoder still alternating). The phase
is a function of the epoch, so ``--c`` resumes inside any phase from nnU-Net's own checkpoints
(the autoencoder's Adam state is a second parameter group of the one optimizer nnU-Net saves).

:class:`FocusNetTrainerBase` is nnU-Net's trainer plus one mixin per concern:

- :class:`~.record.FocusNetRecordMixin`: settings stored with the model, phase schedule, checkpoint record;
- :class:`~.loaders.FocusNetSamplingMixin`: the training patches of each phase;
- :class:`~.steps.FocusNetStepsMixin`: the training step of each phase (SOS-Net, autoencoder, AMP, DDP);
- :class:`~.validation.FocusNetValidationMixin`: validation on the pasted output, the calibrated paste floor,
  the final validation with one paste per case;

and here what builds the network, its loss and optimizer and switches phases.
Deep supervision is off: S-Net has one full-resolution output (the paper uses none).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from organmtl.nnunet_trainers.amp import AMPTrainStepMixin
from organmtl.nnunet_trainers.focusnet import losses as L
from organmtl.nnunet_trainers.focusnet import options as O
from organmtl.nnunet_trainers.focusnet.loaders import WHOLE_ORGAN_PHASES, FocusNetSamplingMixin
from organmtl.nnunet_trainers.focusnet.network import FocusNet
from organmtl.nnunet_trainers.focusnet.record import FOLD_KEY, NETWORK_KEYS, PHASE_PARAMETERS, FocusNetRecordMixin
from organmtl.nnunet_trainers.focusnet.steps import TRAINED_KEY, FocusNetStepsMixin
from organmtl.nnunet_trainers.focusnet.validation import FocusNetValidationMixin
from organmtl.nnunet_trainers.gpu_memory import GPUMemoryPlanMixin
from organmtl.nnunet_trainers.laterality import LateralityAwareMirroringMixin
from organmtl.nnunet_trainers.settings import to_stored

__all__ = ["FocusNetTrainerBase", "PHASE_PARAMETERS", "NETWORK_KEYS", "FOLD_KEY", "WHOLE_ORGAN_PHASES", "TRAINED_KEY"]


class FocusNetTrainerBase(FocusNetValidationMixin, FocusNetStepsMixin, FocusNetSamplingMixin, FocusNetRecordMixin,
                          LateralityAwareMirroringMixin, AMPTrainStepMixin, GPUMemoryPlanMixin, nnUNetTrainer):
    """Shared machinery of the FocusNet trainers; subclasses pick the variant (class attributes).

    Attributes:
        phases: the phases of §4.2 this variant runs.
        use_sos / concat_image / use_ae / adversarial: variant switches (Table 6 ablations).
        options: the :class:`~.options.FocusNetOptions` of this model (stored > environment > defaults).
    """

    phases: tuple[str, ...] = O.ALL_PHASES
    use_sos = True
    concat_image = True
    use_ae = True
    adversarial = True
    lambda1 = 5.0        # Eq. 7
    lambda2 = 0.001      # Eq. 8
    heatmap_sigma = 5.0  # §3.1.2, voxels

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net's DDP is CUDA-only (it sets cuda:rank); a gloo process group on CPU processes keeps the
            # CPU (the trainer-level DDP tests), without GradScaler as nnU-Net has none on the CPU
            self.device, self.grad_scaler = device, None
        self.weight_decay = 0.0
        self.enable_deep_supervision = False
        self.schedule: list[tuple[str, int]] = []
        self.focus_settings: dict = {}
        self.organ_sizes_mm3: dict[int, float] = {}
        self._stored: dict | None = None
        entry, source = self._model_entry()
        self._adopt(entry, source)

    def initialize(self):
        if not self.was_initialized:
            self.focus_settings = self._resolve_settings()
            self.print_to_log_file(f"FocusNet options: {to_stored(self.options)}")
            self.print_to_log_file(f"FocusNet settings: {self.focus_settings}")
            self.print_to_log_file(f"FocusNet phases (epochs): {self.schedule}; organ sizes (mm^3): "
                                   f"{ {k: round(v, 1) for k, v in self.organ_sizes_mm3.items()} }")
            if self.focus_settings.get("use_sos"):
                self._log_roi()
        if self.was_initialized:
            return
        cpu_ddp = self.is_ddp and self.device.type == "cpu"
        if cpu_ddp:
            # nnU-Net wraps the network in SyncBatchNorm + DDP(device_ids=[rank]), both CUDA-only: build it
            # single-process, then split the batch and wrap for CPU DDP here
            self.is_ddp = False
            try:
                super().initialize()
            finally:
                self.is_ddp = True
            self._set_batch_size_and_oversample()
        else:
            super().initialize()
        if self.device.type == "cpu":
            self._module().set_channels_last(True)     # faster oneDNN 3D convolutions (FocusNet.set_channels_last)
        if self.is_ddp:
            # phases leave parts of the network unused: DDP must look for them (rewrap the same module)
            inner = self.network if cpu_ddp else self.network.module
            self.network = DDP(inner, device_ids=None if cpu_ddp else [self.local_rank], find_unused_parameters=True)

    def gpu_memory_min_patch(self) -> tuple[int, ...]:
        """The GPU memory plan keeps the patch at least one ROI (and one pooling step) large."""
        return tuple(max(int(a), int(b)) for a, b in zip(super().gpu_memory_min_patch(), self.focus_settings["roi_size"]))

    def _module(self) -> FocusNet:
        mod = self.network.module if isinstance(self.network, DDP) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def _log_roi(self) -> None:
        """The ROI against the paper's 24 x 64 x 64 mm at this plan and the ROI/organ voxel ratio per small organ
        (the paper's: about 8 x 64 x 64 / the organ's voxels, e.g. ~137 for a 0.72 cm^3 optic nerve at 3 x 1 x
        1 mm); a loud warning when the plan's patch cannot hold the paper's ROI."""
        cm, roi = self.configuration_manager, self.focus_settings["roi_size"]
        paper = O.paper_roi_voxels(cm.spacing)
        voxel = float(np.prod(cm.spacing))
        ratios = {n: round(float(np.prod(roi)) / max(self.organ_sizes_mm3.get(lab, 0.0) / voxel, 1.0), 1)
                  for n, lab in zip(self.focus_settings["small_organs"], self.focus_settings["small_labels"])}
        self.print_to_log_file(f"FocusNet ROI {roi} voxels ({[round(r * s, 1) for r, s in zip(roi, cm.spacing)]} mm; "
                               f"the paper's 24 x 64 x 64 mm = {paper} voxels at this spacing); ROI voxels per organ "
                               f"voxel: {ratios}")
        if self.options.roi is None and list(roi) != list(paper):
            line = (f"FocusNet WARNING: the plan's patch {list(cm.patch_size)} cannot hold the paper's ROI {paper} "
                    f"voxels (24 x 64 x 64 mm at spacing {list(cm.spacing)}): the SOS-Net ROI is cut to {roi}. Plan a "
                    f"patch of at least {paper} (or set ORGANMTL_FOCUSNET_ROI) for the paper's ROI")
            self.print_to_log_file(line, also_print_to_console=True)
            warnings.warn(line)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> FocusNet:
        """FocusNet from the settings stored in the configuration (see :meth:`_resolve_settings`)."""
        s = configuration_manager.configuration.get(O.PLANS_KEY)
        if s is None:
            raise ValueError(f"plans configuration has no {O.PLANS_KEY!r} entry: it was not trained with a FocusNet trainer")
        return FocusNet(num_input_channels, num_output_channels, s["small_labels"], s["roi_size"],
                        use_sos=s["use_sos"], concat_image=s["concat_image"], use_ae=s["use_ae"],
                        heat_threshold=s["heat_threshold"], width=s.get("width", 1.0))

    def _class_alpha(self) -> torch.Tensor:
        n = self.label_manager.num_segmentation_heads
        return L.focal_class_weights([self.organ_sizes_mm3.get(c, 0.0) for c in range(n)])

    def _build_loss(self):
        """Eq. 3 with alpha_t from the organ sizes measured on the fold's training cases."""
        return L.SegmentationLoss(self._class_alpha(), gamma=2.0, dice_weight=1.0,
                                  ignore_label=self.label_manager.ignore_label)

    def configure_optimizers(self):
        """Adam, lr 5e-4, constant (§4.2); the shape autoencoder is a second parameter group so that
        nnU-Net's checkpoint carries their optimizer state too."""
        mod = self.network
        groups = [{"params": [p for n, p in mod.named_parameters() if not n.startswith("shape_ae.")]}]
        ae = [p for n, p in mod.named_parameters() if n.startswith("shape_ae.")]
        if ae:
            groups.append({"params": ae})
        optimizer = torch.optim.Adam(groups, lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs, exponent=0.0)

    def _do_i_compile(self):
        # data-dependent ROI crops: compile only when asked for explicitly
        return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t") and super()._do_i_compile()

    def set_deep_supervision_enabled(self, enabled: bool):
        """S-Net has a single output: nothing to switch."""


    def on_train_epoch_start(self):
        phase = self.current_phase
        self._switch_sampler()
        net = self._module()
        net.paste_small_organs = net.use_sos and phase in ("sos", "joint")
        if net.use_sos and phase in ("sos", "joint"):
            net.sos_trained.fill_(True)       # every checkpoint from now on holds trained SOL/SOS-Nets
        if self.current_epoch == self.last_phase_start:
            self._best_ema = None             # "best" is tracked in the last phase only (see on_epoch_end)
            self.print_to_log_file(f"FocusNet: checkpoint_best.pth tracked from here on (phase {phase})")
        super().on_train_epoch_start()
        self.print_to_log_file(f"FocusNet phase: {phase}")


    def on_train_end(self):
        self._module().paste_small_organs = self._module().use_sos
        super().on_train_end()

