"""Demo data sets converted and tiny-planned ONCE per test session, shared by the e2e modules.

Each fixture yields a :class:`tests.helpers.PlannedDataset` (``.env``, ``.dataset_id``, ``.raw``,
``.preprocessed``, ``.results``, ``.configuration``, ``.fold(trainer, fold)``). The raw and
preprocessed folders are shared: tests read them and never change them. Trainings share
``.results``: each module uses its own trainer names (or its own fold, or ``.with_results(tmp_path)``),
so no test depends on another or on the order they run in.
"""
from __future__ import annotations

import pytest

from tests.helpers import PlannedDataset, plan_dataset

HAN_ID, ABDOMEN_ID = 401, 611


@pytest.fixture(scope="session")
def han_dataset(demo_root, tmp_path_factory) -> PlannedDataset:
    """The demo head-and-neck phantoms (``organmtl convert pddca``, CT with the PDDCA organs)
    planned with ``organmtl plan-tiny`` (``3d_tiny``): Dataset401_HaN in its own nnU-Net folders.
    ``splits_final.json`` is nnU-Net's own (written by the first training, the same every time)."""
    return plan_dataset(tmp_path_factory.mktemp("han"), "pddca", demo_root / "han_pddca", HAN_ID, "HaN")


@pytest.fixture(scope="session")
def abdomen_dataset(demo_root, tmp_path_factory) -> PlannedDataset:
    """The demo abdominal fat/water MR (``organmtl convert volumes``, two channels) with one heatmap
    channel per hip-joint landmark (``--landmark-channels heatmap --one-channel-per-landmark``),
    planned ``3d_tiny`` and ``2d_tiny``: Dataset611_LmAbdomen. Fold 0 validates on one case
    (``splits_final.json`` with one fold: the first case validates, the others train)."""
    return plan_dataset(tmp_path_factory.mktemp("abdomen"), "volumes", demo_root / "abdomen_mr", ABDOMEN_ID,
                        "LmAbdomen", "--landmark-channels", "heatmap", "--one-channel-per-landmark",
                        configurations=("3d_tiny", "2d_tiny"), one_validation_case=True)
