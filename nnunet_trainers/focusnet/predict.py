"""FocusNet prediction with the paper's paste rule: each small organ pasted at most once per case, at the
case's SOL-Net peak (FocusNetv2 paper §3.1.3; docs/focusnetv2.md "Inference").

nnU-Net's predictor calls the network once per sliding window and never shows it the case, so a rule
"once per case, at the case's peak" cannot live inside the network's window call (which therefore gives
S-Net's logits). :class:`FocusNetPredictor` is an ``nnUNetPredictor`` whose per-case sliding window
aggregates, with nnU-Net's own windows, Gaussian weights and mirroring, the S-Net logits *and* the SOL-Net
maps (the network's ``window_output = "logits+heatmaps"``), then pastes with
:meth:`~.network.FocusNet.paste_logits`: per small organ the argmax of its aggregated map, kept only when it
reaches the organ's calibrated floor, SOS-Net once on the ROI centred there (S-Net features from one
patch-sized window centred on the peak), overlaid on the aggregated logits inside that ROI only. Used by
the trainers' final validation and by ``organmtl predict-focusnet`` (:func:`run`; the options of
``nnUNetv2_predict``; also ``python -m organmtl.nnunet_trainers.focusnet.predict``)::

    organmtl predict-focusnet -i IN -o OUT -d 101 -c 3d_fullres -f 0 -tr nnUNetTrainerOMTLFocusNetV2

SOS-Net runs on the unmirrored image only (test-time mirroring averages S-Net's logits and the maps).
"""
from __future__ import annotations

import contextlib
import os

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.file_path_utilities import get_output_folder

from organmtl.devices import resolve_device
from organmtl.nnunet_trainers.focusnet.network import FocusNet


def _nothing():
    return contextlib.nullcontext()


class FocusNetPredictionError(ValueError):
    """Bad input for FocusNet prediction (one line; ``organmtl`` exits 2)."""


def describe_pastes(net: FocusNet, centres: dict) -> str:
    """One line per case: which small organs were pasted, their case-level SOL-Net peak and floor."""
    floors = net.floors()
    parts = []
    for k, label in enumerate(net.small_labels):
        voxel, value, pasted = centres[label]
        parts.append(f"label {label} peak {value:.3f} {'>=' if pasted else '<'} floor {floors[k]:.3f}"
                     + (f" at {tuple(int(v) for v in voxel)}" if pasted else ""))
    n = sum(1 for v in centres.values() if v[2])
    return f"FocusNet: {n} of {len(centres)} small organs pasted in this case (once per case; {'; '.join(parts)})"


def pastes_per_case(trainer: str) -> bool:
    """Whether ``trainer`` (a ``-tr`` name) is a FocusNet trainer: its small organs are pasted once per case
    by :class:`FocusNetPredictor`, which nnU-Net's per-window ``nnUNetv2_predict`` cannot do."""
    from organmtl.nnunet_trainers import FOCUSNET

    return trainer in {c.__name__ for c in FOCUSNET}


def predictor_class(trainer: str) -> type[nnUNetPredictor]:
    """The predictor that gives ``trainer``'s segmentation as its final validation scored it."""
    return FocusNetPredictor if pastes_per_case(trainer) else nnUNetPredictor


def predict_command(trainer: str) -> list[str]:
    """The command (before its ``nnUNetv2_predict`` options, which both take) that predicts with ``trainer``:
    ``organmtl predict-focusnet`` for FocusNet trainers, ``nnUNetv2_predict`` for the others."""
    from organmtl.procs import venv_bin

    return [venv_bin("organmtl"), "predict-focusnet"] if pastes_per_case(trainer) else [venv_bin("nnUNetv2_predict")]


class FocusNetPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that pastes the small organs once per case (see the module).

    ``last_heatmaps``: the aggregated SOL-Net maps ``(n_small, *preprocessed shape)`` of the last case and
    fold (the trainers write the SOL-Net centres from them); ``last_centres``: ``{label: (voxel, peak,
    pasted)}``; ``quiet``: no per-case line."""

    last_heatmaps = None
    last_centres: dict = {}
    quiet = False

    def focusnet(self) -> FocusNet:
        net = getattr(self.network, "_orig_mod", self.network)
        net = getattr(net, "module", net)
        if not isinstance(net, FocusNet):
            raise FocusNetPredictionError(f"trainer {self.trainer_name}: not a FocusNet model")
        return net

    @torch.inference_mode()
    def _logits_and_heatmaps(self, input_image: torch.Tensor, net: FocusNet) -> tuple[torch.Tensor, torch.Tensor]:
        """nnU-Net's sliding window (its padding, windows, Gaussian weights and mirroring, the logits accumulated
        in fp16 on the same device exactly as ``nnUNetPredictor`` does) over S-Net's logits and, alongside, the
        SOL-Net maps accumulated in fp32: a case's peak is compared across voxels, and fp16 sums of near-zero
        Gaussian weights at the volume's edges would give its corners ratios off by percents."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian

        device = self.device
        results = device if self.perform_everything_on_device else torch.device("cpu")
        data, revert = pad_nd_image(input_image, self.configuration_manager.patch_size, "constant", {"value": 0},
                                    True, None)
        slicers = self._internal_get_sliding_window_slicers(data.shape[1:])
        data = data.to(results)
        n_classes = self.label_manager.num_segmentation_heads
        logits = torch.zeros((n_classes, *data.shape[1:]), dtype=torch.half, device=results)
        weight = torch.zeros(data.shape[1:], dtype=torch.half, device=results)
        heat = torch.zeros((len(net.small_labels), *data.shape[1:]), dtype=torch.float32, device=results)
        weight32 = torch.zeros(data.shape[1:], dtype=torch.float32, device=results)
        patch = tuple(self.configuration_manager.patch_size)
        gauss = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=results)
        gauss32 = compute_gaussian(patch, sigma_scale=1. / 8, value_scaling_factor=10, device=results,
                                   dtype=torch.float32)
        net.window_output = "logits+heatmaps"
        try:
            with torch.autocast(device.type, enabled=True) if device.type == "cuda" else _nothing():
                for sl in slicers:
                    window = torch.clone(data[sl][None], memory_format=torch.contiguous_format).to(device)
                    both = self._internal_maybe_mirror_and_predict(window)[0].to(results)
                    pred, h = both[:n_classes], both[n_classes:].float()
                    pred *= gauss
                    logits[sl] += pred
                    weight[sl[1:]] += gauss
                    heat[sl] += h * gauss32
                    weight32[sl[1:]] += gauss32
        finally:
            net.window_output = "logits"
        torch.div(logits, weight, out=logits)
        heat /= weight32
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("FocusNet: inf in the aggregated logits (nnU-Net's fp16 accumulation)")
        keep = (slice(None), *revert[1:])
        return logits[keep], heat[keep]

    @torch.inference_mode()
    def predict_sliding_window_return_logits(self, input_image: torch.Tensor) -> torch.Tensor:
        net = self.focusnet()
        self.last_heatmaps, self.last_centres = None, {}
        if not net.use_sos:
            return super().predict_sliding_window_return_logits(input_image)
        assert input_image.ndim == 4, "input_image must be (c, x, y, z)"
        self.network = self.network.to(self.device)
        self.network.eval()
        logits, heat = self._logits_and_heatmaps(input_image, net)
        self.last_heatmaps = heat.cpu()
        device = next(net.parameters()).device
        with torch.autocast(device.type, enabled=True) if device.type == "cuda" else _nothing():
            pasted, centres = net.paste_logits(logits.to(device), heat.to(device), input_image.to(device).float(),
                                               patch_size=self.configuration_manager.patch_size)
        self.last_centres = centres
        if not self.quiet:
            print(describe_pastes(net, centres), flush=True)
        return pasted.to(logits.device)


def run(args) -> None:
    """Predict ``args.i`` into ``args.o`` with the options of ``organmtl predict-focusnet`` (``-d -c -f -tr -p
    -chk -step_size --disable_tta -npp -nps -device``, as ``nnUNetv2_predict``)."""
    if args.npp < 1 or args.nps < 1:
        raise FocusNetPredictionError("-npp and -nps must be >= 1")
    try:
        dataset = maybe_convert_to_dataset_name(args.dataset_id)
    except RuntimeError:
        raise FocusNetPredictionError(f"dataset {args.dataset_id}: not found under nnUNet_raw/nnUNet_preprocessed/"
                                      f"nnUNet_results") from None
    model = get_output_folder(dataset, args.tr, args.p, args.c)
    if not os.path.isdir(model):
        raise FocusNetPredictionError(f"{model}: no trained model (train it with nnUNetv2_train first)")
    device = torch.device(resolve_device(args.device))
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    predictor = FocusNetPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                                  perform_everything_on_device=device.type == "cuda", device=device,
                                  allow_tqdm=True)
    folds = [f if f == "all" else int(f) for f in args.f]
    predictor.initialize_from_trained_model_folder(model, folds, checkpoint_name=args.chk)
    predictor.focusnet()
    predictor.predict_from_files(args.i, args.o, save_probabilities=args.save_probabilities, overwrite=True,
                                 num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps)


def main(argv=None) -> int:
    """``python -m organmtl.nnunet_trainers.focusnet.predict ARGS``: the same as ``organmtl predict-focusnet ARGS``."""
    import sys

    from organmtl.cli import main as organmtl_main

    return organmtl_main(["predict-focusnet", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
