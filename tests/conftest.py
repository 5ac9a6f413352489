"""Shared fixtures: demo phantoms generated once per session, nnU-Net folders, one torch thread.
Plain helpers (``run_cli``, rotations, strategies, ...) are in ``tests/helpers.py``."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import nnunet_env_vars, one_thread, run_cli  # noqa: F401  (run_cli: old import path)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """All demo families written once (small case counts)."""
    from organmtl.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo_data(root, seed=0, n_cases=6)
    return root


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch) -> dict:
    """Fresh nnU-Net raw/preprocessed/results folders, exported for this test and its subprocesses."""
    env = nnunet_env_vars(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    with one_thread():
        yield
