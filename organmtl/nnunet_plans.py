"""Tiny CPU configurations added to nnU-Net's own plans (``organmtl plan-tiny``).

Runs nnU-Net's fingerprint extraction and default experiment planner through its Python API,
then adds configurations ``3d_tiny`` / ``2d_tiny`` to ``nnUNetPlans.json`` that inherit from
``3d_fullres`` / ``2d`` (same spacing, normalisation and preprocessed data) and shrink only the
patch (<= 32^3 or 64^2 by default), the batch and the U-Net width (8 -> 64 features); the
pooling topology is recomputed for the smaller patch with nnU-Net's ``get_pool_and_conv_props``.
Finally the tiny configurations are preprocessed. Train with
``nnUNetv2_train ID 3d_tiny FOLD -tr <trainer> -device cpu``.
"""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

TINY = {"3d_tiny": ("3d_fullres", 32), "2d_tiny": ("2d", 64)}


def tiny_configuration(parent: dict, max_edge: int, max_features: int = 64, base_features: int = 8,
                       batch_size: int = 2) -> dict:
    """Configuration dict inheriting ``parent`` with a patch <= ``max_edge`` per axis and a narrow U-Net."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    spacing = parent["spacing"]
    wanted = [min(int(s), max_edge) for s in parent["patch_size"]]
    _, pools, kernels, patch, _ = get_pool_and_conv_props(spacing, wanted, 4, 999999)
    # get_pool_and_conv_props may round the patch up to a multiple of the pooling; keep <= max_edge
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
        parent_name, max_edge = TINY[name]
        if parent_name not in plans["configurations"]:
            raise ValueError(f"{plans_file}: no {parent_name!r} configuration to derive {name!r} from")
        parent = {**plans["configurations"][parent_name], "_name": parent_name}
        added[name] = tiny_configuration(parent, max_edge, max_features=max_features, batch_size=batch_size)
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
    plan_experiments([dataset_id])
    plans_file = Path(str(nnUNet_preprocessed)) / convert_id_to_dataset_name(dataset_id) / "nnUNetPlans.json"
    add_tiny_configurations(plans_file, configurations, max_features=max_features, batch_size=batch_size)
    preprocess([dataset_id], configurations=tuple(configurations), num_processes=[num_processes],
               show_progress_bar=False)
    return plans_file
