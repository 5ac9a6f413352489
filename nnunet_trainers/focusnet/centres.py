"""SOL-Net centres of a whole volume, in millimetres, exported as JSON next to the predictions
(FocusNetv2 paper §3.1.2, Table 7 metrics).

nnU-Net's predictor offers no hook to write extra files, so the segmentation goes through the
stock sliding window (the network pastes SOS-Net masks inside each window) and the centres come
from this module: the SOL-Net heatmaps are aggregated over the same sliding windows with nnU-Net's
own Gaussian weighting, the argmax of each small organ's map is its centre, mapped back through
nnU-Net's preprocessing (resampling, cropping, transposition) to the physical coordinates of the
original image. Used by the trainers' final validation (``validation/<case>_centres.json``) and by
(:func:`export_folder`; also ``python -m organmtl.nnunet_trainers.focusnet.centres``)

    organmtl predict-centres -i IMAGES -o OUT -m MODEL_FOLDER [-f 0]

which writes ``OUT/<case>_centres.json`` for the images of a folder (e.g. ``nnUNetv2_predict``'s output).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from organmtl.nnunet_trainers.focusnet.options import PLANS_KEY


class CentresError(ValueError):
    """Bad input for the centre export (one line; ``organmtl`` exits 2)."""


@torch.no_grad()
def sliding_window_heatmaps(network, data: torch.Tensor, patch_size, step: float = 0.5) -> torch.Tensor:
    """SOL-Net heatmaps ``(n_small, *spatial)`` of a preprocessed case ``(C, *spatial)``: windows and
    Gaussian weights exactly as nnU-Net's predictor (``compute_steps_for_sliding_window``, ``compute_gaussian``)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    network.eval()
    device = next(network.parameters()).device
    padded, revert = pad_nd_image(data, patch_size, "constant", {"value": 0}, True, None)
    n_small = len(network.small_labels)
    acc = torch.zeros((n_small, *padded.shape[1:]), dtype=torch.float32)
    weight = torch.zeros(padded.shape[1:], dtype=torch.float32)
    gauss = compute_gaussian(tuple(patch_size), sigma_scale=1. / 8, value_scaling_factor=10, dtype=torch.float32,
                             device=torch.device("cpu"))
    steps = compute_steps_for_sliding_window(padded.shape[1:], patch_size, step)
    for sz in steps[0]:
        for sy in steps[1]:
            for sx in steps[2]:
                sl = tuple(slice(s, s + p) for s, p in zip((sz, sy, sx), patch_size))
                window = padded[(slice(None), *sl)][None].to(device)
                feats = network.segment(window)[1]
                acc[(slice(None), *sl)] += network.sol(feats)[0].float().cpu() * gauss
                weight[sl] += gauss
    heat = torch.where(weight > 0, acc / torch.where(weight > 0, weight, torch.ones_like(weight)), acc)
    return heat[(slice(None), *revert[1:])]


def preprocessed_to_world(voxel, properties: dict, plans_manager, preprocessed_shape) -> list[float]:
    """Physical point (x, y, z in mm, the image's own frame) of a voxel of nnU-Net's preprocessed array:
    undo the resampling (voxel centres), the crop to non-zero and the axis transposition, then apply
    the original image's origin, spacing and direction (``sitk_stuff`` of nnU-Net's SimpleITK reader)."""
    after_crop = np.asarray(properties["shape_after_cropping_and_before_resampling"], dtype=float)
    scale = after_crop / np.asarray(preprocessed_shape, dtype=float)
    idx = (np.asarray(voxel, dtype=float) + 0.5) * scale - 0.5
    idx = idx + np.asarray([b[0] for b in properties["bbox_used_for_cropping"]], dtype=float)
    idx = idx[list(plans_manager.transpose_backward)]          # array order of the original image (z, y, x)
    st = properties.get("sitk_stuff")
    if st is None:
        spacing = np.asarray(properties["spacing"], dtype=float)
        return (idx * spacing).tolist()[::-1]
    ijk = idx[::-1]                                             # SimpleITK index order (x, y, z)
    direction = np.asarray(st["direction"], dtype=float).reshape(3, 3)
    return (np.asarray(st["origin"]) + direction @ (ijk * np.asarray(st["spacing"]))).tolist()


def centres_record(heatmaps: torch.Tensor, names, labels, properties, plans_manager) -> dict:
    """JSON-ready ``{name: {label, voxel_preprocessed, world_mm, peak}}`` from aggregated heatmaps."""
    from organmtl.nnunet_trainers.focusnet.roi import heatmap_peak

    out = {}
    for k, (name, label) in enumerate(zip(names, labels)):
        voxel, peak = heatmap_peak(heatmaps[k])
        out[name] = {"label": int(label), "voxel_preprocessed": list(voxel), "peak": peak,
                     "world_mm": preprocessed_to_world(voxel, properties, plans_manager, heatmaps.shape[1:])}
    return out


def write_centres(path: Path, record: dict) -> Path:
    """Write one case's centres (``<case>_centres.json``)."""
    path = Path(path)
    path.write_text(json.dumps({"format": "organmtl.focusnet.centres/1", "coordinates": "world_mm is (x, y, z) "
                                "in the image's physical frame", "centres": record}, indent=2) + "\n")
    return path


def export_folder(images: Path, out: Path, model_folder: Path, fold="0", checkpoint: str = "checkpoint_final.pth",
                  device: str = "cpu") -> list[Path]:
    """Centres JSON for every case of an nnU-Net-style image folder (``<case>_0000.nii.gz``...)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    predictor = nnUNetPredictor(device=torch.device(device), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), checkpoint)
    net = predictor.network
    if not getattr(net, "use_sos", False):
        raise CentresError(f"{model_folder}: this model has no SOL-Net (S-Net only), there are no centres to export")
    settings = predictor.configuration_manager.configuration[PLANS_KEY]
    lists = create_lists_from_splitted_dataset_folder(str(images), predictor.dataset_json["file_ending"])
    if not lists:
        raise CentresError(f"{images}: no images ending in {predictor.dataset_json['file_ending']}")
    pre = predictor.configuration_manager.preprocessor_class(verbose=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for files in tqdm(lists, desc="SOL-Net centres"):
        data, _, props = pre.run_case(files, None, predictor.plans_manager, predictor.configuration_manager,
                                      predictor.dataset_json)
        heat = sliding_window_heatmaps(net.to(device), torch.from_numpy(data).float(),
                                       predictor.configuration_manager.patch_size)
        case = Path(files[0]).name[:-len(predictor.dataset_json["file_ending"]) - 5]
        rec = centres_record(heat, settings["small_organs"], settings["small_labels"], props, predictor.plans_manager)
        written.append(write_centres(out / f"{case}_centres.json", rec))
    return written


def main(argv=None) -> int:
    """``python -m organmtl.nnunet_trainers.focusnet.centres ARGS``: the same as ``organmtl predict-centres ARGS``."""
    import sys

    from organmtl.cli import main as organmtl_main

    return organmtl_main(["predict-centres", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
