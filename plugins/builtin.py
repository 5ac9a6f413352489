"""Manifests of the built-in methods and of the converter collection (declared as entry points in organmtl's pyproject.toml).

A manifest lists only what exists and is tested; ``organmtl list --check`` resolves every entry.
"""
import importlib.util
from pathlib import Path

from organmtl.plugins.registry import Plugin

_D2 = "organmtl.detectron_heads"


def _yaml_configs(folder: str) -> tuple[str, ...]:
    """Every ``*.yaml`` under ``folder`` of organmtl.detectron_heads as ``"package:folder/...yaml"``,
    read from the folder (finding the package imports only ``organmtl``, not Detectron2)."""
    root = Path(importlib.util.find_spec(_D2).submodule_search_locations[0])
    return tuple(f"{_D2}:{p.relative_to(root).as_posix()}" for p in sorted((root / folder).rglob("*.yaml")))


HMRNET = Plugin(
    name="hmrnet",
    description="HMR-Net: Detectron2 shape-regression ROI heads with manifold loss (holistic multitask regression network)",
    detectron_modules=(f"{_D2}.hmrnet",),
    # the generic base + Mask R-CNN baselines (detectron_heads/configs) and HMR-Net's own configs
    detectron_configs=_yaml_configs("configs") + _yaml_configs("hmrnet/configs"),
    converters={"to-coco": "organmtl.converters:COCO", "volumes": "organmtl.converters:VOLUMES"},
    docs="docs/hmrnet.md",
)

_TRAINERS = "organmtl.nnunet_trainers"   # one tuple of trainer classes per family, built from the classes

FOCUSNETV2 = Plugin(
    name="focusnetv2",
    description="FocusNetv2: S-Net, small-organ localisation/segmentation, adversarial shape AE",
    nnunet_trainer_sets=(f"{_TRAINERS}:BASELINE", f"{_TRAINERS}:FOCUSNET"),
    converters={"pddca": "organmtl.converters:PDDCA"},
    docs="docs/focusnetv2.md",
)

LANDMARK_UNET = Plugin(
    name="landmark_unet",
    description="Landmark U-Nets: landmarks as auxiliary task or as input (two theses)",
    nnunet_trainer_sets=(f"{_TRAINERS}:BASELINE", f"{_TRAINERS}:LANDMARKS"),
    converters={"volumes": "organmtl.converters:VOLUMES", "visceral": "organmtl.converters.visceral:CONVERTER"},
    docs="docs/landmark_unets.md",
)

MULTITASK_CNN = Plugin(
    name="multitask_cnn",
    description="Multi-task multi-modality CNN of Moeskops et al., one network for several datasets",
    nnunet_trainer_sets=(f"{_TRAINERS}:MULTITASK", f"{_TRAINERS}:BASELINE"),
    converters={"volumes": "organmtl.converters:VOLUMES", "merge": "organmtl.converters.merge:CONVERTER"},
    docs="docs/multitask_cnn.md",
)

CONVERTERS = Plugin(
    name="converters",
    description="Dataset converters: PDDCA, CHAOS, VISCERAL, DICOM CT + RTSTRUCT, volume folders, merging -> nnU-Net / COCO",
    converters={
        "pddca": "organmtl.converters:PDDCA",
        "volumes": "organmtl.converters:VOLUMES",
        "to-coco": "organmtl.converters:COCO",
        "chaos": "organmtl.converters.chaos:CONVERTER",
        "dicom-rt": "organmtl.converters.dicom_rt:CONVERTER",
        "visceral": "organmtl.converters.visceral:CONVERTER",
        "merge": "organmtl.converters.merge:CONVERTER",
    },
    docs="docs/converters.md",
)
