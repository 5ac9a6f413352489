"""Segmentation *and* landmark coordinates from a trained auxiliary-task model (thesis §2.3, §2.6).

nnU-Net's stock ``nnUNetv2_predict`` runs these models unchanged and writes the segmentation: the
network's default output is the segmentation tail. Its sliding-window aggregation, however, only
holds as many channels as there are segmentation outputs and it offers no hook for a second output,
so landmark coordinates come from :class:`LandmarkPredictor`, an ``nnUNetPredictor`` subclass run
by ``organmtl predict-landmarks`` (:func:`run`; same options as ``nnUNetv2_predict``; also
``python -m organmtl.nnunet_trainers.landmarks.predict``)::

    organmtl predict-landmarks -i IN -o OUT -d 601 -c 3d_tiny -f 0 \\
        -tr nnUNetTrainerOMTLLandmarkJoint_Tiny -device cpu

For each case it writes ``OUT/<case>.nii.gz`` (nnU-Net's export, untouched) and ``OUT/<case>.json``
next to it in the converters' landmark format (``landmarks[].name/lps_mm/voxel_xyz``; see
docs/converters.md), which ``organmtl.evaluation.landmarks.evaluate_landmark_folders`` compares
with the dataset's ``landmarks/`` folder. The heatmaps are predicted with nnU-Net's own Gaussian-
weighted sliding window, resampled back with the configuration's probability resampling, put back
into the uncropped image and transposed back, then located: the argmax of each per-landmark channel,
or for a merged map the strongest separated local maxima (as many as the dataset has landmarks;
their identities are unknown, so they are named ``<channel> peak <k>``). Input folders need the
image channels only (``_0000`` ...); landmark channels, if present, are ignored by the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from nnunetv2.utilities.file_path_utilities import get_output_folder

from organmtl.nnunet_trainers.landmarks.channels import LandmarkChannels
from organmtl.nnunet_trainers.landmarks.localisation import argmax_index, local_peaks
from organmtl.nnunet_trainers.landmarks.networks import LandmarkTailUNet


class LandmarkPredictionError(ValueError):
    """Bad input for landmark prediction (one line; ``organmtl`` exits 2)."""


def voxel_to_lps(index_xyz, spacing, origin, direction) -> list[float]:
    """Physical (LPS mm) position of a continuous voxel index, as SimpleITK's
    ``TransformContinuousIndexToPhysicalPoint``: ``origin + D @ (index * spacing)``."""
    d = np.asarray(direction, dtype=float).reshape(len(spacing), len(spacing))
    return (np.asarray(origin, float) + d @ (np.asarray(index_xyz, float) * np.asarray(spacing, float))).tolist()


class LandmarkPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` that also writes ``<case>.json`` landmark coordinates next to each segmentation."""

    def _landmark_module(self) -> LandmarkTailUNet:
        net = getattr(self.network, "_orig_mod", self.network)
        if not isinstance(net, LandmarkTailUNet):
            raise TypeError(f"trainer {self.trainer_name} has no landmark tail; landmark prediction needs an "
                            f"auxiliary-task trainer (nnUNetTrainerOMTLLandmarkJoint/Alternate/Uncertainty...)")
        return net

    def predict_heatmaps(self, data: torch.Tensor) -> torch.Tensor:
        """(K, *preprocessed shape) heatmaps: nnU-Net's sliding window (Gaussian weighting, TTA if enabled,
        fold ensembling) run on the landmark tail instead of the segmentation tail."""
        net = self._landmark_module()
        lc = LandmarkChannels.from_configuration(self.configuration_manager.configuration)
        label_manager = self.label_manager
        self.label_manager = SimpleNamespace(num_segmentation_heads=lc.n_landmark)   # channels to aggregate
        net.outputs = "landmarks"
        try:
            return self.predict_logits_from_preprocessed_data(data).float()
        finally:
            net.outputs = "segmentation"
            self.label_manager = label_manager

    def heatmaps_in_image_space(self, heatmaps: torch.Tensor, properties: dict) -> np.ndarray:
        """Undo nnU-Net's preprocessing geometry (resampling, cropping, transposition) on the heatmaps,
        as nnU-Net's export does for probabilities; returns (K, *original array shape)."""
        pm, cm = self.plans_manager, self.configuration_manager
        spacing_t = [properties["spacing"][i] for i in pm.transpose_forward]
        shape = properties["shape_after_cropping_and_before_resampling"]
        current = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
        resampled = cm.resampling_fn_probabilities(heatmaps, shape, current, spacing_t)
        resampled = resampled.cpu().numpy() if isinstance(resampled, torch.Tensor) else np.asarray(resampled)
        full = np.zeros((resampled.shape[0], *properties["shape_before_cropping"]), dtype=np.float32)
        for k in range(resampled.shape[0]):
            full[k] = insert_crop_into_image(full[k], resampled[k], properties["bbox_used_for_cropping"])
        return full.transpose([0] + [i + 1 for i in pm.transpose_backward])

    def landmark_record(self, heatmaps: np.ndarray, properties: dict, case: str) -> dict:
        """Landmarks in the converters' JSON format from image-space heatmaps."""
        lc = LandmarkChannels.from_configuration(self.configuration_manager.configuration)
        geo = properties["sitk_stuff"]
        ndim = len(geo["spacing"])
        found = []
        for name, channel in zip(lc.channel_names, heatmaps):
            t = torch.from_numpy(np.ascontiguousarray(channel))
            if lc.merged:
                sep = 2.0 * float(lc.sigma_mm or 1.0) / float(min(geo["spacing"]))
                peaks = local_peaks(t, threshold=-np.inf, max_peaks=len(lc.landmarks), min_separation_vox=sep)
                found += [(f"{name} peak {k}", p, float(channel[tuple(p.astype(int))])) for k, p in enumerate(peaks)]
            else:
                p = argmax_index(t)
                found.append((name, p, float(channel[tuple(p.astype(int))])))
        landmarks = []
        for name, index_zyx, value in found:
            index_xyz = list(index_zyx[::-1][:ndim])
            landmarks.append({"name": name, "lps_mm": voxel_to_lps(index_xyz, geo["spacing"], geo["origin"],
                                                                   geo["direction"]),
                              "voxel_xyz": [float(v) for v in index_xyz], "heatmap_peak": value})
        return {"case": case, "coordinate_system": "LPS", "source": f"predicted by {self.trainer_name}",
                "merged_map": lc.merged, "landmarks": landmarks}

    def write_landmarks(self, item: dict) -> Path:
        """Predict, locate and write ``<ofile>.json`` for one preprocessed case of the data iterator."""
        data = item["data"]
        if isinstance(data, str):          # nnU-Net passes large cases as .npy files (it deletes them later)
            data = torch.from_numpy(np.load(data))
        heatmaps = self.heatmaps_in_image_space(self.predict_heatmaps(data), item["data_properties"])
        out = Path(item["ofile"] + ".json")
        out.write_text(json.dumps(self.landmark_record(heatmaps, item["data_properties"], out.stem), indent=2))
        return out

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = default_num_processes):
        """nnU-Net's loop (segmentation export included), with each case's landmarks written first."""
        def with_landmarks(items):
            for item in items:
                if item["ofile"] is not None:
                    print(f"landmarks -> {self.write_landmarks(item)}")
                yield item

        result = super().predict_from_data_iterator(with_landmarks(data_iterator), save_probabilities,
                                                    num_processes_segmentation_export)
        if isinstance(data_iterator, MultiThreadedAugmenter):
            data_iterator._finish()
        return result


def run(args) -> None:
    """Predict ``args.i`` into ``args.o`` with the options of ``organmtl predict-landmarks`` (``-d/--dataset-id -c -f -tr
    -p -chk -step_size --disable_tta -npp -nps -device``, as ``nnUNetv2_predict``)."""
    if args.npp < 1 or args.nps < 1:
        raise LandmarkPredictionError("-npp and -nps must be >= 1")
    model = get_output_folder(maybe_convert_to_dataset_name(args.dataset_id), args.tr, args.p, args.c)
    if not os.path.isdir(model):
        raise LandmarkPredictionError(f"{model}: no trained model (train it with nnUNetv2_train first)")
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    predictor = LandmarkPredictor(tile_step_size=args.step_size, use_gaussian=True, use_mirroring=not args.disable_tta,
                                  perform_everything_on_device=args.device == "cuda", device=torch.device(args.device),
                                  allow_tqdm=True)
    folds = [f if f == "all" else int(f) for f in args.f]
    predictor.initialize_from_trained_model_folder(model, folds, checkpoint_name=args.chk)
    predictor.predict_from_files(args.i, args.o, save_probabilities=False, overwrite=True,
                                 num_processes_preprocessing=args.npp, num_processes_segmentation_export=args.nps)


def main(argv=None) -> int:
    """``python -m organmtl.nnunet_trainers.landmarks.predict ARGS``: the same as ``organmtl predict-landmarks ARGS``."""
    import sys

    from organmtl.cli import main as organmtl_main

    return organmtl_main(["predict-landmarks", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
