"""Shared fixtures: the demo phantoms and the demo spine slices as COCO, each generated once per
session, and one torch thread. Plain helpers (``run_cli``, rotations, strategies, ...) are in
``tests/helpers.py``; the converted + planned e2e data sets in ``tests/e2e/conftest.py``."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import one_thread, write_spine_coco


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """All demo families written once (small case counts)."""
    from organmtl.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo_data(root, seed=0, n_cases=6)
    return root


@pytest.fixture(scope="session")
def spine_coco(tmp_path_factory) -> Path:
    """The demo spine slices (spine family only, 6 cases, seed 0) converted once to COCO with the
    converter's default contour points (100 for these 128 px slices); tests only read it."""
    from organmtl.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("spine")
    write_demo_data(root / "demo", seed=0, families=["spine"], n_cases=6)
    return write_spine_coco(root / "demo", root / "coco")


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    with one_thread():
        yield
