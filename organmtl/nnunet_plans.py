"""Tiny CPU configurations added to nnU-Net's own plans (``organmtl plan-tiny``).

Runs nnU-Net's fingerprint extraction and default experiment planner through its Python API,
then adds configurations ``3d_tiny`` / ``2d_tiny`` to ``nnUNetPlans.json`` that inherit from
``3d_fullres`` / ``2d`` (same spacing, normalisation and preprocessed data) and shrink only the
patch (at most 32^3 or 64^2 voxels, aspect ratio kept), the batch and the U-Net width (8 -> 64 features); the
pooling topology is recomputed for the smaller patch with nnU-Net's ``get_pool_and_conv_props``.
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


def shrink_patch(patch, max_voxels: int, multiple: int = 8) -> list[int]:
    """Scale ``patch`` uniformly to at most ``max_voxels`` voxels, keeping its aspect ratio, each
    edge a multiple of ``multiple`` (or the original edge when that is smaller)."""
    patch = [int(p) for p in patch]
    if np.prod(patch) <= max_voxels:
        return patch
    factor = (max_voxels / float(np.prod(patch))) ** (1.0 / len(patch))
    out = [min(p, max(multiple, int(p * factor) // multiple * multiple)) for p in patch]
    while np.prod(out) > max_voxels:
        i = int(np.argmax(out))
        out[i] -= multiple
    return out


def tiny_configuration(parent: dict, max_voxels: int, max_features: int = 64, base_features: int = 8,
                       batch_size: int = 2) -> dict:
    """Configuration dict inheriting ``parent`` with a patch of <= ``max_voxels`` and a narrow U-Net."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = parent["spacing"]
    wanted = shrink_patch(parent["patch_size"], max_voxels)
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


def add_tiny_configurations(plans_file: Path, configurations=("3d_tiny",), max_features: int = 64,
                            batch_size: int = 2) -> dict:
    """Add the tiny configurations to a plans file in place; return the new configuration dicts."""
    plans = json.loads(Path(plans_file).read_text())
    added = {}
    for name in configurations:
        parent_name, max_voxels = TINY[name]
        if parent_name not in plans["configurations"]:
            raise ValueError(f"{plans_file}: no {parent_name!r} configuration to derive {name!r} from")
        parent = {**plans["configurations"][parent_name], "_name": parent_name}
        added[name] = tiny_configuration(parent, max_voxels, max_features=max_features, batch_size=batch_size)
        plans["configurations"][name] = added[name]
    Path(plans_file).write_text(json.dumps(plans, indent=4) + "\n")
    return added


def plan_tiny(dataset_id: int, configurations=("3d_tiny",), num_processes: int = 2, max_features: int = 64,
              batch_size: int = 2, verify: bool = True) -> Path:
    """Fingerprint, plan and preprocess ``dataset_id`` with tiny configurations; return the plans file."""
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
    plans_file = Path(str(nnUNet_preprocessed)) / convert_id_to_dataset_name(dataset_id) / "nnUNetPlans.json"
    add_tiny_configurations(plans_file, configurations, max_features=max_features, batch_size=batch_size)
    preprocess([dataset_id], configurations=tuple(configurations), num_processes=[num_processes],
               show_progress_bar=False)
    return plans_file
