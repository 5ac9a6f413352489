"""Shared fixtures: demo phantoms generated once per session, CLI runners, nnU-Net folders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``organmtl ARGS`` as a user would (console script of this interpreter's venv)."""
    exe = Path(sys.executable).parent / "organmtl"
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


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
    env = {"nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
           "nnUNet_results": str(tmp_path / "res"), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
