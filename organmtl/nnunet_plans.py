"""Tiny CPU configurations added to nnU-Net's own plans (``organmtl plan-tiny``).

Runs nnU-Net's fingerprint extraction and default experiment planner through its Python API,
then adds configurations ``3d_tiny`` / ``2d_tiny`` to ``nnUNetPlans.json`` that inherit from
``3d_fullres`` / ``2d`` (same spacing, normalisation and preprocessed data) and shrink only the
patch (at most 32^3 or 64^2 voxels, aspect ratio kept), the batch and the U-Net width (8 -> 64 features); the
pooling topology is recomputed for the smaller patch with nnU-Net's ``get_pool_and_conv_props``.

When the labels come in left/right pairs (``Parotid_L``/``Parotid_R``, ``kidney_left``/``kidney_right``),
mirroring is off (:mod:`nnunet_trainers.laterality`) and the network must tell the sides apart from what a
patch shows. A uniformly shrunk patch centred on the demo's parotid (about 24 mm from the midline) ends 20 mm
from its centre, short of the midline, and the stock U-Net then labelled both parotids as one side
(docs/demo.md). So for such datasets the training labels are read: when a patch of the uniform shrink, centred
on a lateral organ, cannot reach the midline (half the left-right distance between the pair's centroids, median
over cases, exceeds half the patch's left-right edge), the patch keeps the parent's whole left-right edge (the
array axis whose direction is closest to the patient's x axis, read from one training image's header) and only
the other edges shrink, the finest-spaced first filled back up to the voxel budget. Where the uniform patch
already reaches the midline (the demo's kidneys, 36 mm from it in a 140 mm wide patch) it is kept: a wider
patch costs depth and iterations.
Finally the tiny configurations are preprocessed. Train with
``nnUNetv2_train ID 3d_tiny FOLD -tr <trainer> -device cpu``.
"""
from __future__ import annotations

import json
import os
from copy import deepcopy
from pathlib import Path

import numpy as np

TINY = {"3d_tiny": ("3d_fullres", 32 ** 3), "2d_tiny": ("2d", 64 ** 2)}


class PlanError(ValueError):
    """Bad input to ``organmtl plan-tiny``: one line naming the problem (CLI exit code 2)."""


def check_dataset(dataset_id: int) -> Path:
    """The raw dataset folder of ``dataset_id``; PlanError when ``nnUNet_raw``/``nnUNet_preprocessed`` are
    unset or no ``DatasetXXX_*`` folder of that id is in ``nnUNet_raw``."""
    unset = [v for v in ("nnUNet_raw", "nnUNet_preprocessed") if not os.environ.get(v)]
    if unset:
        raise PlanError(f"{' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set: export "
                        "nnUNet_raw, nnUNet_preprocessed and nnUNet_results (organmtl doctor shows them)")
    raw = Path(os.environ["nnUNet_raw"])
    found = sorted(p for p in raw.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir()) if raw.is_dir() else []
    if not found:
        raise PlanError(f"{raw}: no dataset with id {dataset_id} (no Dataset{dataset_id:03d}_* folder; "
                        "organmtl convert writes one)")
    if len(found) > 1:
        raise PlanError(f"{raw}: dataset id {dataset_id} is used by {found[0].name} and {found[1].name}")
    if not (found[0] / "dataset.json").is_file():
        raise PlanError(f"{found[0]}: no dataset.json")
    return found[0]


def shrink_patch(patch, max_voxels: int, multiple: int = 8, keep_axis: int | None = None,
                 spacing=None) -> list[int]:
    """Scale ``patch`` uniformly to at most ``max_voxels`` voxels, keeping its aspect ratio, each
    edge a multiple of ``multiple`` (or the original edge when that is smaller).

    With ``keep_axis`` that edge stays whole (as far as the other edges can keep ``multiple`` voxels),
    the others shrink together, and are then grown back one ``multiple`` at a time, finest ``spacing``
    first, while the patch fits ``max_voxels``: flooring two edges can otherwise lose half the budget."""
    patch = [int(p) for p in patch]
    if np.prod(patch) <= max_voxels:
        return patch
    if keep_axis is not None:
        others = [i for i in range(len(patch)) if i != keep_axis]
        floor = int(np.prod([min(multiple, patch[i]) for i in others]))
        kept = min(patch[keep_axis], max(multiple, max_voxels // floor // multiple * multiple))
        rest = shrink_patch([patch[i] for i in others], max_voxels // kept, multiple)
        out = list(patch)
        out[keep_axis] = kept
        for i, r in zip(others, rest):
            out[i] = r
        order = sorted(others, key=lambda i: (float(spacing[i]) if spacing is not None else 1.0, i))
        grown = True
        while grown:
            grown = False
            for i in order:
                if out[i] + multiple <= patch[i] and np.prod(out) // out[i] * (out[i] + multiple) <= max_voxels:
                    out[i] += multiple
                    grown = True
                    break
        return out
    factor = (max_voxels / float(np.prod(patch))) ** (1.0 / len(patch))
    out = [min(p, max(multiple, int(p * factor) // multiple * multiple)) for p in patch]
    while np.prod(out) > max_voxels:
        i = int(np.argmax(out))
        out[i] -= multiple
    return out


def tiny_configuration(parent: dict, max_voxels: int, max_features: int = 64, base_features: int = 8,
                       batch_size: int = 2, keep_axis: int | None = None) -> dict:
    """Configuration dict inheriting ``parent`` with a patch of <= ``max_voxels`` and a narrow U-Net;
    ``keep_axis`` (an axis of the parent's patch) keeps its whole edge (:func:`shrink_patch`)."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = parent["spacing"]
    wanted = shrink_patch(parent["patch_size"], max_voxels, keep_axis=keep_axis, spacing=spacing)
    _, pools, kernels, patch, _ = get_pool_and_conv_props(spacing, wanted, 4, 999999)
    n_stages = len(pools)
    arch = deepcopy(parent["architecture"])
    kw = arch["arch_kwargs"]
    kw["n_stages"] = n_stages
    kw["features_per_stage"] = [min(base_features * 2 ** i, max_features) for i in range(n_stages)]
    kw["kernel_sizes"] = [list(k) for k in kernels]
    kw["strides"] = [list(p) for p in pools]
    kw["n_conv_per_stage"] = [2] * n_stages
    kw["n_conv_per_stage_decoder"] = [2] * (n_stages - 1)
    return {"inherits_from": parent["_name"], "patch_size": [int(p) for p in patch], "batch_size": batch_size,
            "architecture": arch}


def left_right_axis(image_file: Path, transpose_forward) -> int:
    """Axis of nnU-Net's preprocessed (transposed) array that runs left-right in ``image_file``: the image
    axis whose direction cosine along the patient's x axis (LPS, as SimpleITK reads it) is largest."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(image_file))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = lines[-1].removeprefix("sitk::ERROR: ") if lines else "unreadable"
        raise PlanError(f"{image_file}: cannot read the image header to find its left-right axis ({reason})") from None
    dim = reader.GetDimension()
    direction = np.array(reader.GetDirection()).reshape(dim, dim)
    image_axis = int(np.argmax(np.abs(direction[0])))            # column j = direction of image index axis j
    array_axis = dim - 1 - image_axis                             # SimpleITK arrays are (z, y, x)
    return int(list(transpose_forward).index(array_axis))


def lateral_offset_mm(label_files, labels: dict, pairs, max_cases: int = 10) -> float | None:
    """How far the lateral organs lie from the midline: for each left/right pair, half the patient-x distance
    (mm) between the two organs' centroids, median over the cases that contain both; the largest over the pairs.
    Reads at most ``max_cases`` label files (evenly spread); None when no case holds both organs of a pair."""
    import SimpleITK as sitk

    files = list(label_files)
    if len(files) > max_cases:
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, max_cases).round()]
    per_pair: dict[tuple, list[float]] = {tuple(p): [] for p in pairs}
    for f in files:
        image = sitk.ReadImage(str(f))
        arr = sitk.GetArrayViewFromImage(image)

        def centre_x(name):
            value = labels[name]
            idx = np.argwhere(np.isin(arr, value if isinstance(value, (list, tuple)) else [value]))
            if not len(idx):
                return None
            return image.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx.mean(0)[::-1]])[0]

        for pair in per_pair:
            xs = [centre_x(name) for name in pair]
            if None not in xs:
                per_pair[pair].append(abs(xs[0] - xs[1]) / 2)
    medians = [float(np.median(v)) for v in per_pair.values() if v]
    return max(medians) if medians else None


def add_tiny_configurations(plans_file: Path, configurations=("3d_tiny",), max_features: int = 64,
                            batch_size: int = 2, left_right: int | None = None,
                            lateral_offset: float | None = None) -> dict:
    """Add the tiny configurations to a plans file in place; return the new configuration dicts.

    ``left_right``: the preprocessed array's left-right axis (:func:`left_right_axis`) when the labels come in
    left/right pairs, else None. ``lateral_offset``: :func:`lateral_offset_mm`. The patch keeps its whole
    left-right edge when a uniformly shrunk one centred on a lateral organ would not reach the midline
    (offset > half its left-right edge in mm), or when the offset is unknown (None)."""
    plans = json.loads(Path(plans_file).read_text())
    added = {}
    for name in configurations:
        parent_name, max_voxels = TINY[name]
        if parent_name not in plans["configurations"]:
            raise ValueError(f"{plans_file}: no {parent_name!r} configuration to derive {name!r} from")
        parent = {**plans["configurations"][parent_name], "_name": parent_name}
        config = tiny_configuration(parent, max_voxels, max_features=max_features, batch_size=batch_size)
        if left_right is not None:                               # a 2D patch holds the array's last two axes
            keep = left_right - (3 - len(parent["patch_size"]))
            if keep >= 0:
                half = config["patch_size"][keep] * float(parent["spacing"][keep]) / 2
                if lateral_offset is None or lateral_offset > half:
                    config = tiny_configuration(parent, max_voxels, max_features=max_features,
                                                batch_size=batch_size, keep_axis=keep)
                    why = "unknown" if lateral_offset is None else f"{lateral_offset:.0f} mm > {half:.0f} mm"
                    print(f"{name}: lateral organs' offset from the midline {why} (half the uniform patch): "
                          f"keeping the whole left-right edge, patch {config['patch_size']}")
                else:
                    print(f"{name}: lateral organs {lateral_offset:.0f} mm from the midline, within half the "
                          f"uniform patch ({half:.0f} mm): patch {config['patch_size']}")
        added[name] = config
        plans["configurations"][name] = config
    Path(plans_file).write_text(json.dumps(plans, indent=4) + "\n")
    return added


def plan_tiny(dataset_id: int, configurations=("3d_tiny",), num_processes: int = 2, max_features: int = 64,
              batch_size: int = 2, verify: bool = True) -> Path:
    """Fingerprint, plan and preprocess ``dataset_id`` with tiny configurations; return the plans file."""
    check_dataset(dataset_id)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=verify,
                         show_progress_bar=False)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for the value 0
    # that CPU users set to run augmentation in the main process; plan with 1 in that case.
    saved = os.environ.get("nnUNet_n_proc_DA")
    if saved == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        plan_experiments([dataset_id])
    finally:
        if saved is not None:
            os.environ["nnUNet_n_proc_DA"] = saved
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from organmtl.nnunet_trainers.laterality import lateral_pairs

    name = convert_id_to_dataset_name(dataset_id)
    plans_file = Path(str(nnUNet_preprocessed)) / name / "nnUNetPlans.json"
    raw = Path(str(nnUNet_raw)) / name
    dataset_json = json.loads((raw / "dataset.json").read_text())
    left_right = offset = None
    pairs = lateral_pairs(dataset_json["labels"])
    if pairs:
        cases = list(get_filenames_of_train_images_and_targets(str(raw), dataset_json).values())
        left_right = left_right_axis(Path(cases[0]["images"][0]), json.loads(plans_file.read_text())["transpose_forward"])
        offset = lateral_offset_mm([c["label"] for c in cases], dataset_json["labels"], pairs)
    add_tiny_configurations(plans_file, configurations, max_features=max_features, batch_size=batch_size,
                            left_right=left_right, lateral_offset=offset)
    preprocess([dataset_id], configurations=tuple(configurations), num_processes=[num_processes],
               show_progress_bar=False)
    return plans_file
