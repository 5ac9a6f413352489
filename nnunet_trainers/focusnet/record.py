"""FocusNet trainers: the settings stored with the model, the phase schedule and the checkpoint record
(docs/focusnetv2.md "Options", "Phase schedule"); a mixin of :class:`~.trainer.FocusNetTrainerBase`.

The options and the network they imply go into the configuration entry ``organmtl_focusnet`` of the plans
(nnU-Net saves it as the model's ``plans.json`` and, as ``init_args``, in every checkpoint), read and written
with the shared helpers of :mod:`organmtl.nnunet_trainers.settings`; what one fold derives for itself (organ
sizes of its training cases, phase schedule, phases reached) goes into the checkpoint's copy only. The phase
is a function of the epoch, so nnU-Net's own checkpoints carry it.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from organmtl.nnunet_trainers.focusnet import options as O
from organmtl.nnunet_trainers.settings import (plan_width_factor, resolve, set_plans_value, stored_plans_entry,
                                               to_stored)

#: parameters each phase may update (the others get no update even when they received gradients)
PHASE_PARAMETERS = {"snet": ("snet",), "sol": ("sol",), "ae": ("shape_ae",), "sos": ("sos",),
                    "joint": ("snet", "sol", "sos")}
#: keys of the plans entry that define the network (what ``build_network_architecture`` reads)
NETWORK_KEYS = ("small_organs", "small_labels", "roi_size", "use_sos", "concat_image", "use_ae",
                "heat_threshold", "width")
#: key, inside the checkpoint's copy of the entry, of what this fold derived for itself
FOLD_KEY = "fold_record"


class FocusNetRecordMixin:
    """Settings (stored > environment > defaults), phase schedule, per-phase checkpoints and the fold record."""

    # ------------------------------------------------------------------------------ settings
    def _model_entry(self) -> tuple[dict | None, str]:
        """The FocusNet entry stored with this model before this run (:func:`~..settings.stored_plans_entry`:
        the plans' own configuration entry, else the model folder's ``plans.json``), only where that folder
        already has another fold: all folds of a model are one network (nnU-Net's predictor loads every fold
        into one network), and a folder without folds has nothing trained to agree with."""
        entry, source = stored_plans_entry(self, O.PLANS_KEY)
        if not entry or source == "the plans' configuration entry":
            return entry, source
        base = Path(self.output_folder_base)
        others = sorted(d.name for d in base.glob("fold_*") if d.is_dir() and d.name != f"fold_{self.fold}")
        return (entry, f"{source}, shared with {others}") if others else (None, "")

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
                "heat_threshold": float(opts.heat_threshold), "width": float(width)}

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
        # plans.json and this run's plans get the model's entry; the checkpoint's copy (init_args) also this fold's
        # record, so that no fold rewrites what another fold's checkpoint needs
        self.my_init_kwargs["plans"] = copy.deepcopy(self.plans_manager.plans)
        set_plans_value(self, O.PLANS_KEY, entry)
        self.my_init_kwargs["plans"]["configurations"][self.configuration_name][O.PLANS_KEY][FOLD_KEY] = {
            "fold": self.fold, "organ_sizes_mm3": {str(k): v for k, v in self.organ_sizes_mm3.items()},
            "schedule": [list(p) for p in self.schedule]}
        return network


    # ------------------------------------------------------------------------------ phases
    @property
    def current_phase(self) -> str:
        return O.phase_at(self.schedule, self.current_epoch)

    @property
    def last_phase_start(self) -> int:
        """First epoch of the last phase (the only phase whose epochs may give ``checkpoint_best.pth``)."""
        return sum(n for _, n in self.schedule[:-1])


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

