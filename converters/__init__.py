"""Dataset converters: sources -> nnU-Net v2 raw format, and nnU-Net datasets -> COCO.

Each source is a :class:`SourceConverter`; plugins name them in their manifests
(``converters = {"pddca": "organmtl.converters:PDDCA"}``) and ``organmtl convert <source>`` runs
them through :func:`run_conversion`, which owns the common options, the atomic output folder and
the dataset.json.
"""
from organmtl.converters.command import (COCO, PDDCA, VOLUMES, SourceConverter, add_common_arguments,
                                         run_conversion)
from organmtl.converters.common import ConversionError

__all__ = ["COCO", "PDDCA", "VOLUMES", "ConversionError", "SourceConverter", "add_common_arguments",
           "run_conversion"]
