"""The organmtl command: --help everywhere, exit codes 0/1/2, doctor."""
import pytest

from tests.conftest import run_cli

SUBCOMMANDS = ["list", "doctor", "install-hooks", "demo-data", "convert", "plan-tiny", "evaluate", "report", "demo", "multitask-experiments"]


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(sub):
    r = run_cli(sub, "--help")
    assert r.returncode == 0
    assert "usage: organmtl" in r.stdout


@pytest.mark.parametrize("source", ["pddca", "volumes", "to-coco"])
def test_convert_help(source):
    r = run_cli("convert", source, "--help")
    assert r.returncode == 0 and "--overwrite" in r.stdout


def test_usage_error_exit_2():
    assert run_cli("no-such-command").returncode == 2
    assert run_cli("convert", "pddca").returncode == 2          # missing SRC and --dataset-id


def test_doctor_reports_everything_and_exits_0():
    r = run_cli("doctor")
    assert r.returncode == 0, r.stdout + r.stderr
    for key in ("torch", "nnunetv2", "detectron2", "detectron2._C", "nnUNet_extTrainer", "start-up hook"):
        assert key in r.stdout
    assert "found organmtl.nnunet_trainers" in r.stdout


def test_startup_hook_sets_ext_trainer_without_importing_organmtl():
    import subprocess
    import sys

    code = "import os, sys; print(os.environ.get('nnUNet_extTrainer', '')); print('organmtl' in sys.modules)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.split()
    assert out[0].endswith("ext_shim") and out[1] == "False"
