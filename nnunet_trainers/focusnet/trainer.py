"""FocusNetv2 as nnU-Net v2 trainers (FocusNetv2 paper §3-4; docs/focusnetv2.md).

One ``nnUNetv2_train`` call runs the staged schedule of §4.2 as phases (epoch budgets from
``ORGANMTL_FOCUSNET_PHASE_EPOCHS``, see :mod:`.options`): ``snet`` (S-Net, L_seg) -> ``sol`` (SOL-Net,
S-Net frozen, L2 heatmap loss) -> ``ae`` (shape autoencoder pre-trained on ground-truth ROI masks,
Eq. 4 on y only) -> ``sos`` (SOS-Nets, S-Net and SOL-Net frozen, alternating with the autoencoder:
Eq. 7 / Eq. 8) -> ``joint`` (everything fine-tuned together, autoencoder still alternating). The phase
is a function of the epoch, so ``--c`` resumes inside any phase from nnU-Net's own checkpoints
(the autoencoder's Adam state is a second parameter group of the one optimizer nnU-Net saves).

Settings that travel with the model (docs/focusnetv2.md "Options"): :class:`~.options.FocusNetOptions`
and the network they imply (small organs, ROI, width, variant switches) go into the configuration
entry ``organmtl_focusnet`` of the plans, which nnU-Net saves as the model's ``plans.json`` and, as
``init_args``, inside every checkpoint; what one fold derives for itself (organ sizes of its training
cases, phase schedule) is added to the checkpoint's copy only. ``--c``/``--val`` read them back from
the checkpoint, a new fold of a model folder that already has folds from its ``plans.json``, and
``nnUNetv2_predict`` builds the network from ``plans.json``. The small organs chosen by volume are
measured on all cases of the dataset (like nnU-Net's fingerprint), so every fold builds the same
network: nnU-Net's predictor loads every fold into one network.

Deep supervision is off: S-Net has one full-resolution output (the paper uses none).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from organmtl.nnunet_trainers.amp import AMPTrainStepMixin, any_rank
from organmtl.nnunet_trainers.focusnet import losses as L
from organmtl.nnunet_trainers.focusnet import options as O
from organmtl.nnunet_trainers.focusnet.network import FocusNet
from organmtl.nnunet_trainers.focusnet.sampler import WholeSmallOrganDataLoader
from organmtl.nnunet_trainers.focusnet.roi import crop_roi, gaussian_heatmap, mask_centre, roi_start
from organmtl.nnunet_trainers.gpu_memory import GPUMemoryPlanMixin
from organmtl.nnunet_trainers.laterality import LateralityAwareMirroringMixin
from organmtl.nnunet_trainers.settings import plan_width_factor, resolve, to_stored

#: parameters each phase may update (the others get no update even when they received gradients)
PHASE_PARAMETERS = {"snet": ("snet",), "sol": ("sol",), "ae": ("shape_ae",), "sos": ("sos",),
                    "joint": ("snet", "sol", "sos")}
#: keys of the plans entry that define the network (what ``build_network_architecture`` reads)
NETWORK_KEYS = ("small_organs", "small_labels", "roi_size", "use_sos", "concat_image", "use_ae",
                "heat_threshold", "width")
#: key, inside the checkpoint's copy of the entry, of what this fold derived for itself
FOLD_KEY = "fold_record"
#: phases whose training patches hold every small organ whole (:mod:`.sampler`)
WHOLE_ORGAN_PHASES = ("ae", "sos", "joint")
#: key of a train_step output: False when the step had nothing to learn from (an ``ae`` step whose batch,
#: on every rank, has no small organ); such steps are left out of the epoch's logged mean loss
TRAINED_KEY = "focusnet_trained"


def _finish(augmenter) -> None:
    """Stop an nnU-Net augmenter's worker processes (what ``on_train_end`` does)."""
    if isinstance(augmenter, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
        augmenter._finish()


class FocusNetTrainerBase(LateralityAwareMirroringMixin, AMPTrainStepMixin, GPUMemoryPlanMixin, nnUNetTrainer):
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

    # ------------------------------------------------------------------------------ settings
    def _model_entry(self) -> tuple[dict | None, str]:
        """The FocusNet entry stored with this model before this run: the plans' own configuration
        entry, else (a new fold of a model folder that has other folds) the folder's ``plans.json``."""
        entry = self.configuration_manager.configuration.get(O.PLANS_KEY)
        if entry:
            return entry, "the plans' configuration entry"
        base = Path(self.output_folder_base) if self.output_folder_base else None
        if base is None or not (base / "plans.json").is_file():
            return None, ""
        others = [d.name for d in base.glob("fold_*") if d.is_dir() and d.name != f"fold_{self.fold}"]
        if not others:
            return None, ""
        stored = json.loads((base / "plans.json").read_text())["configurations"].get(self.configuration_name, {})
        entry = stored.get(O.PLANS_KEY)
        return (entry, f"{base / 'plans.json'}, shared with {sorted(others)}") if entry else (None, "")

    def _adopt(self, entry: dict | None, source: str) -> None:
        """Options from ``entry`` (stored values win), else the environment, else the defaults;
        the log names every stored value that won over a different environment value."""
        resolved = resolve(O.FocusNetOptions, (entry or {}).get("options"), source)
        self.options = resolved.options
        self.initial_lr = self.options.lr                # §4.2: Adam, lr 0.0005
        self.centre_jitter = self.options.centre_jitter
        self._stored = copy.deepcopy(entry) if entry else None
        for note in resolved.notes:
            self.print_to_log_file(f"FocusNet setting {note}")
        if entry:
            self.print_to_log_file(f"FocusNet settings read from {source}")

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        """nnU-Net's ``load_checkpoint`` (``--c``, ``--val``), after adopting the FocusNet entry the
        checkpoint carries (its ``init_args`` plans): the network is built from it, not from the shell."""
        ckpt = filename_or_checkpoint
        if isinstance(ckpt, str):
            ckpt = torch.load(ckpt, map_location="cpu", weights_only=False)
        source = f"checkpoint {filename_or_checkpoint}" if isinstance(filename_or_checkpoint, str) else "the checkpoint"
        args = ckpt.get("init_args", {})
        entry = args.get("plans", {}).get("configurations", {}).get(args.get("configuration"), {}).get(O.PLANS_KEY)
        if entry:
            if self.was_initialized:
                mine = {k: self.focus_settings.get(k) for k in NETWORK_KEYS}
                if {k: entry.get(k) for k in NETWORK_KEYS} != mine:
                    raise ValueError(f"{source}: FocusNet network {({k: entry.get(k) for k in NETWORK_KEYS})} differs "
                                     f"from this initialised trainer's {mine}")
            else:
                self._adopt(entry, source)
        super().load_checkpoint(filename_or_checkpoint)

    def _training_seg_files(self, keys) -> list[Path]:
        folder = Path(self.preprocessed_dataset_folder_base) / "gt_segmentations"
        files = [folder / f"{k}{self.dataset_json['file_ending']}" for k in keys]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"FocusNet: ground-truth segmentations missing (run preprocessing): {missing[:3]}")
        return files

    def _measure_sizes(self, keys) -> dict[int, float]:
        labels = self.dataset_json["labels"]
        fg = sorted(int(v) for k, v in labels.items() if isinstance(v, int) and v > 0 and k != "ignore")
        return O.measure_organ_sizes(self._training_seg_files(keys), self.plans_manager.image_reader_writer_class(),
                                     [0] + [v for v in fg if v != self.label_manager.ignore_label])

    def _derive_network(self) -> dict:
        """Small organs, ROI, width and variant switches from the options, the dataset and the plan;
        the same for every fold (small organs by volume are measured on all cases)."""
        labels = self.dataset_json["labels"]
        opts = self.options
        small = []
        if self.use_sos:
            named = opts.small_organs is not None or O.SMALL_ORGANS_KEY in self.dataset_json
            tr, val = self.do_split()
            sizes = None if named else self._measure_sizes(sorted(set(tr) | set(val)))
            small = O.choose_small_organs(labels, self.dataset_json, sizes, opts)
        cm = self.configuration_manager
        width = opts.width if opts.width is not None else plan_width_factor(cm, O.PAPER_FIRST_STAGE)
        return {"small_organs": small, "small_labels": [int(labels[n]) for n in small],
                "roi_size": O.roi_size(cm.spacing, cm.patch_size, opts.roi), "use_sos": self.use_sos and bool(small),
                "concat_image": self.concat_image, "use_ae": self.use_ae,
                "heat_threshold": float(opts.heat_threshold), "width": float(width),
                "heat_relative": None if opts.heat_relative is None else float(opts.heat_relative)}

    def _resolve_settings(self) -> dict:
        """The network entry (stored, else derived), this fold's organ sizes and phase schedule, all
        written into the plans (network + options) and the checkpoint's ``init_args`` (+ fold record)."""
        if self.label_manager.has_regions:
            raise ValueError("FocusNet trainers need label maps (softmax classes), not region-based training")
        cm = self.configuration_manager
        if len(cm.patch_size) != 3:
            raise ValueError(f"FocusNet is a 3D network; configuration {self.configuration_name!r} has patch {cm.patch_size}")
        self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        stored = self._stored or {}
        record = stored.get(FOLD_KEY) if stored.get(FOLD_KEY, {}).get("fold") == self.fold else None
        if all(k in stored for k in NETWORK_KEYS):
            network = {k: stored[k] for k in NETWORK_KEYS}
            network["heat_relative"] = stored.get("heat_relative")      # absent before the option: None
        else:
            network = self._derive_network()
        if record is not None:
            self.organ_sizes_mm3 = {int(k): float(v) for k, v in record["organ_sizes_mm3"].items()}
        else:
            self.organ_sizes_mm3 = self._measure_sizes(self.do_split()[0])
        phases = self.phases if network["use_sos"] else ("snet",)
        derived = O.phase_schedule(phases, self.num_epochs, self.options.explicit_phase_epochs(phases))
        if record is not None:
            self.schedule = [(str(p), int(n)) for p, n in record["schedule"]]
            if self.schedule != derived:
                self.print_to_log_file(f"FocusNet setting schedule={self.schedule} stored with the model wins over "
                                       f"{derived} from this run's budget")
        else:
            self.schedule = derived
        self.num_epochs = sum(n for _, n in self.schedule)
        entry = {"options": to_stored(self.options), **network}
        cm.configuration[O.PLANS_KEY] = entry
        self.plans_manager.plans["configurations"][self.configuration_name][O.PLANS_KEY] = entry
        mine = copy.deepcopy(self.plans_manager.plans)
        mine["configurations"][self.configuration_name][O.PLANS_KEY] = {**entry, FOLD_KEY: {
            "fold": self.fold, "organ_sizes_mm3": {str(k): v for k, v in self.organ_sizes_mm3.items()},
            "schedule": [list(p) for p in self.schedule]}}
        self.my_init_kwargs["plans"] = mine
        return network

    def initialize(self):
        if not self.was_initialized:
            self.focus_settings = self._resolve_settings()
            self.print_to_log_file(f"FocusNet options: {to_stored(self.options)}")
            self.print_to_log_file(f"FocusNet settings: {self.focus_settings}")
            self.print_to_log_file(f"FocusNet phases (epochs): {self.schedule}; organ sizes (mm^3): "
                                   f"{ {k: round(v, 1) for k, v in self.organ_sizes_mm3.items()} }")
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

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> FocusNet:
        """FocusNet from the settings stored in the configuration (see :meth:`_resolve_settings`)."""
        s = configuration_manager.configuration.get(O.PLANS_KEY)
        if s is None:
            raise ValueError(f"plans configuration has no {O.PLANS_KEY!r} entry: it was not trained with a FocusNet trainer")
        return FocusNet(num_input_channels, num_output_channels, s["small_labels"], s["roi_size"],
                        use_sos=s["use_sos"], concat_image=s["concat_image"], use_ae=s["use_ae"],
                        heat_threshold=s["heat_threshold"], heat_relative=s.get("heat_relative"),
                        width=s.get("width", 1.0))

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

    # ------------------------------------------------------------------------------ phases
    @property
    def current_phase(self) -> str:
        return O.phase_at(self.schedule, self.current_epoch)

    @property
    def last_phase_start(self) -> int:
        """First epoch of the last phase (the only phase whose epochs may give ``checkpoint_best.pth``)."""
        return sum(n for _, n in self.schedule[:-1])

    # ------------------------------------------------------------------------------ sampling
    def _whole_organ_sampling(self, phase: str | None = None) -> bool:
        """Whether ``phase`` (default: the current one) trains on :class:`~.sampler.WholeSmallOrganDataLoader`
        patches (the phases that train SOS-Net or the autoencoder), else on nnU-Net's sampler."""
        return bool(self.focus_settings.get("use_sos")) and (phase or self.current_phase) in WHOLE_ORGAN_PHASES

    def _training_loader(self, whole_organs: bool):
        """nnU-Net's training loader and augmenter (its transforms, workers), with the whole-small-organ
        sampler when ``whole_organs``."""
        cm, lm = self.configuration_manager, self.label_manager
        rotation, dummy_2d, initial_patch_size, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            cm.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels, regions=None, ignore_label=lm.ignore_label)
        dataset_tr, _ = self.get_tr_and_val_datasets()
        if whole_organs:
            loader = WholeSmallOrganDataLoader(dataset_tr, self.batch_size, initial_patch_size, cm.patch_size, lm,
                                               self.focus_settings["small_labels"], transforms=transforms)
            note = (f"; small organs larger than the patch in {len(loader.cases_not_fitting)} case(s), centred instead: "
                    f"{loader.cases_not_fitting[:5]}" if loader.cases_not_fitting else "")
            self.print_to_log_file(f"FocusNet: patches holding every small organ whole ({len(loader.indices)} of "
                                   f"{len(dataset_tr.identifiers)} training cases){note}")
        else:
            loader = nnUNetDataLoader(dataset_tr, self.batch_size, initial_patch_size, cm.patch_size, lm,
                                      oversample_foreground_percent=self.oversample_foreground_percent,
                                      sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                      probabilistic_oversampling=self.probabilistic_oversampling)
        workers = get_allowed_n_proc_DA()
        if workers == 0:
            gen = SingleThreadedAugmenter(loader, None)
        else:
            gen = NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=workers,
                                               num_cached=max(6, workers // 2), seeds=None,
                                               pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(gen)
        return gen

    def get_dataloaders(self):
        """nnU-Net's loaders; in the ``ae``/``sos``/``joint`` phases the training batches come from the
        whole-small-organ sampler (validation stays nnU-Net's: its loss and pseudo Dice measure S-Net)."""
        train, val = super().get_dataloaders()
        self._loader_whole = False
        if self._whole_organ_sampling():
            _finish(train)
            train, self._loader_whole = self._training_loader(True), True
        return train, val

    def _switch_sampler(self) -> None:
        """At a phase start: rebuild the training loader when the phase samples differently."""
        want = self._whole_organ_sampling()
        if self.dataloader_train is None or want == getattr(self, "_loader_whole", False):
            return
        _finish(self.dataloader_train)
        self.dataloader_train, self._loader_whole = self._training_loader(want), want

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

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """nnU-Net's mean train loss over the steps that trained something: an ``ae`` step whose batch had no
        small organ on any rank (:data:`TRAINED_KEY` False) is left out (the skip is decided on all ranks
        together, so every rank keeps the same steps). An epoch without any such step logs the mean of its
        zero-valued steps, with a log line."""
        kept = [o for o in train_outputs if o.get(TRAINED_KEY, True)]
        if not kept and train_outputs:
            self.print_to_log_file("FocusNet: no batch of this epoch had a small organ; its train loss is 0")
        super().on_train_epoch_end(kept or train_outputs)

    def on_epoch_end(self):
        """nnU-Net's epoch end, plus ``checkpoint_latest.pth`` at the end of every phase so that ``--c``
        resumes at the start of the next phase; before the last phase no epoch is "best" (an S-Net-phase
        checkpoint_best would have untrained SOL/SOS weights)."""
        ep = self.current_epoch
        phase = O.phase_at(self.schedule, ep)
        if O.phase_at(self.schedule, ep + 1) != phase and ep != self.num_epochs - 1:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
            self.print_to_log_file(f"FocusNet: phase {phase} done, checkpoint_latest.pth written")
        if ep < self.last_phase_start:
            self._best_ema = math.inf         # nnU-Net saves checkpoint_best when the EMA Dice beats this
        super().on_epoch_end()

    def phases_reached(self, epoch: int | None = None) -> list[str]:
        """The phases that have trained up to (and including) ``epoch`` (default: the current epoch)."""
        ep = self.current_epoch if epoch is None else epoch
        out, acc = [], 0
        for name, n in self.schedule:
            if ep >= acc:
                out.append(name)
            acc += n
        return out

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint; its copy of the plans (``init_args``) records the phases reached and which
        parts are trained (the network's ``sos_trained`` buffer goes with the weights)."""
        record = self.my_init_kwargs["plans"]["configurations"][self.configuration_name][O.PLANS_KEY].get(FOLD_KEY)
        if record is not None:
            reached = self.phases_reached(min(self.current_epoch, self.num_epochs - 1))
            record["phases_reached"] = reached
            record["trained_parts"] = sorted({p for ph in reached for p in PHASE_PARAMETERS[ph]} |
                                             ({"shape_ae"} if self.use_ae and set(reached) & {"ae", "sos", "joint"}
                                              else set()))
        super().save_checkpoint(filename)

    def on_train_end(self):
        self._module().paste_small_organs = self._module().use_sos
        super().on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation (segmentations through the stock predictor, SOS-Net pasted in
        each window), then the SOL-Net centres of each validation case as
        ``validation/<case>_centres.json`` (mm, see :mod:`.centres`)."""
        net = self._module()
        if net.use_sos and not bool(net.sos_trained):
            self.print_to_log_file("FocusNet: SOL-Net/SOS-Net of these weights are untrained (checkpoint from before "
                                   "the sos phase): validation predicts with S-Net only, no small organ pasted")
        super().perform_actual_validation(save_probabilities)
        if not net.use_sos:
            return
        from organmtl.nnunet_trainers.focusnet.centres import centres_record, sliding_window_heatmaps, write_centres

        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::torch.distributed.get_world_size()]
        ds = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        folder = Path(self.output_folder) / "validation"
        for k in ds.identifiers:
            data, _, _, props = ds.load_case(k)
            heat = sliding_window_heatmaps(net, torch.from_numpy(np.asarray(data[:], dtype=np.float32)),
                                           self.configuration_manager.patch_size)
            rec = centres_record(heat, self.focus_settings["small_organs"], self.focus_settings["small_labels"],
                                 props, self.plans_manager)
            write_centres(folder / f"{k}_centres.json", rec)
        self.print_to_log_file(f"FocusNet: SOL-Net centres written for {len(ds.identifiers)} validation cases")

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
        leaves the autoencoder unchanged). In the ``sos`` phase SOL-Net is not run (its heatmaps are unused).
        Under DDP a rank without small organs runs a placeholder SOS-Net ROI and empty autoencoder batches,
        weight 0."""
        centres = self._small_centres(target, self.centre_jitter)
        labels = self.focus_settings["small_labels"]
        roi = self.focus_settings["roi_size"]
        fused = self.use_ae
        sync = self.network.no_sync() if fused and isinstance(self.network, DDP) else contextlib.nullcontext()
        d_loss, with_ae = None, False
        with sync, self.autocast_context():
            out = self.network(data, part="sos", centres=centres, train_snet=joint, train_sol=joint,
                               placeholder=self.is_ddp, heatmaps=joint)
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
            per_organ = [([g for r, g in zip(records, gts) if r.k == k], [r.prob for r in records if r.k == k])
                         for k in range(len(labels))]
            with_ae = self.use_ae and any_rank(bool(records), self.device)
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
