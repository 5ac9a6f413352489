"""FocusNet trainers: validation, the calibrated paste floor and the final validation with one paste per
case (docs/focusnetv2.md "Inference: one paste per case"); a mixin of :class:`~.trainer.FocusNetTrainerBase`.

- Every validation epoch (nnU-Net's ``validation_step``, its loss and pseudo Dice) runs the network on each
  validation patch as on a whole case (:meth:`~.network.FocusNet.paste_case`): from the ``sos`` phase on the
  pseudo Dice measures the pasted output, not S-Net alone. From the ``sol`` phase on, the same patches
  calibrate the paste floor (:mod:`.paste`), which goes into the network's ``heat_floor`` buffer at the end of
  the epoch and so into every checkpoint written after it.
- The final validation predicts each validation case with :class:`~.predict.FocusNetPredictor` (nnU-Net's
  sliding window, then each small organ pasted once at the case's SOL-Net peak), exports it with nnU-Net's
  ``export_prediction_from_logits``, scores it with ``compute_metrics_on_folder`` and writes the SOL-Net centres
  (``validation/<case>_centres.json``) from the same aggregated maps.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

from organmtl.nnunet_trainers.focusnet import paste as P
from organmtl.nnunet_trainers.focusnet.centres import centres_record, write_centres
from organmtl.nnunet_trainers.focusnet.predict import FocusNetPredictor, describe_pastes


class FocusNetValidationMixin:
    """Validation epochs on the pasted output, floor calibration, final validation with one paste per case."""

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        net = self._module()
        self._floor_stats = None
        self._calibrating = net.use_sos and self.current_phase != "snet"
        net.eval_call = "case"

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (the network's eval call is :meth:`~.network.FocusNet.paste_case` during
        validation epochs), plus the floor statistics of the batch's SOL-Net maps."""
        out = super().validation_step(batch)
        net = self._module()
        heat = getattr(net, "last_heatmaps", None)
        if self._calibrating and heat is not None:
            target = batch["target"]
            target = (target[0] if isinstance(target, list) else target).to(heat.device)
            stats = P.floor_statistics(heat, target, self.focus_settings["small_labels"],
                                       self.focus_settings["roi_size"])
            self._floor_stats = stats if self._floor_stats is None else P.merge(self._floor_stats, stats)
        return out

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        net = self._module()
        net.eval_call = "window"
        if not self._calibrating:
            return
        stats = self._floor_stats if self._floor_stats is not None else \
            torch.tensor([P.EMPTY] * len(net.small_labels), dtype=torch.float64)
        if self.is_ddp:
            extremes = torch.stack([-stats[:, 0], stats[:, 1]], 1).to(self.device)
            counts = stats[:, 2:].clone().to(self.device)
            torch.distributed.all_reduce(extremes, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(counts)
            stats = torch.stack([-extremes[:, 0].cpu(), extremes[:, 1].cpu(), counts[:, 0].cpu(), counts[:, 1].cpu()], 1)
        floors, notes = P.calibrated_floors(stats, net.heat_floor.tolist())
        net.heat_floor.copy_(torch.tensor(floors, dtype=net.heat_floor.dtype))
        names = self.focus_settings["small_organs"]
        self.print_to_log_file("FocusNet paste floor (validation patches): " +
                               "; ".join(f"{n} {t}" for n, t in zip(names, notes)))

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation (predict, export, ``summary.json``), each case by
        :class:`~.predict.FocusNetPredictor`; S-Net-only models keep nnU-Net's own."""
        net = self._module()
        if not net.use_sos:
            return super().perform_actual_validation(save_probabilities)
        if not bool(net.sos_trained):
            self.print_to_log_file("FocusNet: SOL-Net/SOS-Net of these weights are untrained (checkpoint from before "
                                   "the sos phase): validation predicts with S-Net only, no small organ pasted")
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        net.eval_call = "window"
        predictor = FocusNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                      perform_everything_on_device=True, device=self.device, verbose=False,
                                      verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        predictor.quiet = True
        folder = Path(self.output_folder) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::torch.distributed.get_world_size()]
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        settings = self.focus_settings
        for k in dataset_val.identifiers:
            data, _, _, properties = dataset_val.load_case(k)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = torch.from_numpy(np.asarray(data[:]))
            logits = predictor.predict_sliding_window_return_logits(data).cpu()
            self.print_to_log_file(f"predicting {k}: {describe_pastes(net, predictor.last_centres)}")
            export_prediction_from_logits(logits, properties, self.configuration_manager, self.plans_manager,
                                          self.dataset_json, str(folder / k), save_probabilities)
            write_centres(folder / f"{k}_centres.json",
                          centres_record(predictor.last_heatmaps, settings["small_organs"], settings["small_labels"],
                                         properties, self.plans_manager))
        self.print_to_log_file(f"FocusNet: SOL-Net centres written for {len(dataset_val.identifiers)} validation cases")
        if self.is_ddp:
            torch.distributed.barrier()
        if self.local_rank == 0:
            lm = self.label_manager
            metrics = compute_metrics_on_folder(str(Path(self.preprocessed_dataset_folder_base) / "gt_segmentations"),
                                                str(folder), str(folder / "summary.json"),
                                                self.plans_manager.image_reader_writer_class(),
                                                self.dataset_json["file_ending"], lm.foreground_labels,
                                                lm.ignore_label, chill=True, num_processes=1)
            for label in metrics["mean"]:
                self.logger.log_summary(f"final_val/class_{label}_dice", metrics["mean"][label]["Dice"])
            self.logger.log_summary("final_val/foreground_dice", metrics["foreground_mean"]["Dice"])
            self.print_to_log_file("Validation complete", also_print_to_console=True)
            self.print_to_log_file("Mean Validation Dice: ", (metrics["foreground_mean"]["Dice"]),
                                   also_print_to_console=True)
        self.set_deep_supervision_enabled(True)
        compute_gaussian.cache_clear()
