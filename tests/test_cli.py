"""The organmtl command: every command listed and documented in --help, one dataset option, exit
codes 0/1/2, doctor, the module entry points of the two prediction commands."""
import argparse
import re
import subprocess
import sys

import pytest

from organmtl.cli import COMMANDS, build_parser
from tests.helpers import nnunet_env_vars, run_cli

SUBCOMMANDS = ["list", "doctor", "install-hooks", "demo-data", "convert", "plan-tiny", "predict-landmarks",
               "predict-centres", "evaluate", "report", "multitask-experiments", "demo"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{"plan-tiny": parser, "convert volumes": parser, ...}``: every command and sub-command."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return out


def test_help_lists_every_command_and_no_rest_markup():
    r = run_cli("--help")
    assert r.returncode == 0
    listed = re.findall(r"^    (\S+)", r.stdout, flags=re.M)
    assert listed == [n for n in _subparsers(build_parser()) if " " not in n]      # every registered command
    assert len(listed) == len(COMMANDS) and set(SUBCOMMANDS) <= set(listed)
    assert "``" not in r.stdout and ":mod:" not in r.stdout and "Exit codes: 0 success, 1 failure, 2 bad" in r.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(sub):
    r = run_cli(sub, "--help")
    assert r.returncode == 0
    assert f"usage: organmtl {sub}" in r.stdout


def test_every_option_of_every_command_has_help_text():
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, sub in _subparsers(build_parser()).items() for action in sub._actions
               if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert missing == []


def test_dataset_option_is_d_and_dataset_id_everywhere():
    commands = _subparsers(build_parser())
    with_dataset = {name for name, sub in commands.items() for a in sub._actions if a.dest == "dataset_id"}
    assert {"plan-tiny", "multitask-experiments", "predict-landmarks", "convert pddca", "convert volumes"} <= with_dataset
    for name in with_dataset:
        action = next(a for a in commands[name]._actions if a.dest == "dataset_id")
        assert {"-d", "--dataset-id"} <= set(action.option_strings), name
    parser = build_parser()
    for spelling in ("-d", "--dataset-id"):
        assert parser.parse_args(["plan-tiny", spelling, "7"]).dataset_id == 7
        assert parser.parse_args(["multitask-experiments", spelling, "8", "--out", "x"]).dataset_id == 8
        assert parser.parse_args(["convert", "volumes", "src", spelling, "9"]).dataset_id == 9
        assert parser.parse_args(["predict-landmarks", "-i", "a", "-o", "b", spelling, "Dataset601_X", "-c",
                                  "3d_tiny"]).dataset_id == "Dataset601_X"


@pytest.mark.parametrize("source", ["pddca", "volumes", "to-coco"])
def test_convert_help(source):
    r = run_cli("convert", source, "--help")
    assert r.returncode == 0 and "--overwrite" in r.stdout


def test_usage_error_exit_2():
    assert run_cli("no-such-command").returncode == 2
    assert run_cli("convert", "pddca").returncode == 2          # missing SRC and --dataset-id


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    """Library errors (here the converters' and the evaluation's) are mapped to exit 2 in one place."""
    r = run_cli("convert", "volumes", tmp_path / "missing", "-d", "5", "--out", tmp_path / "raw")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("organmtl convert: error: ") and "missing" in r.stderr
    r = run_cli("evaluate", tmp_path / "nope", tmp_path / "gt")
    assert r.returncode == 2 and r.stderr.startswith("organmtl evaluate: error: ") and "nope" in r.stderr


def test_demo_bad_input_exits_2(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    r = run_cli("demo", "--out", foreign)
    assert r.returncode == 2 and "not made by the demo" in r.stderr
    assert (foreign / "x").is_dir() and not (foreign / ".organmtl-demo").exists()    # nothing touched
    a_file = tmp_path / "file"
    a_file.write_text("")
    r = run_cli("demo", "--out", a_file)
    assert r.returncode == 2 and "is not a folder" in r.stderr
    assert run_cli("demo", "--epochs", "0", "--out", tmp_path / "new").returncode == 2
    assert run_cli("demo", "--overwrite").returncode == 2     # gone: an earlier demo folder is always replaced
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("module,command", [("organmtl.nnunet_trainers.landmarks.predict", "predict-landmarks"),
                                            ("organmtl.nnunet_trainers.focusnet.centres", "predict-centres")])
def test_module_entry_points_are_the_commands(module, command):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"usage: organmtl {command}" in r.stdout
    r = subprocess.run([sys.executable, "-m", module, "-i", "a"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "required" in r.stderr


def test_doctor_reports_everything_and_exits_0(tmp_path):
    r = run_cli("doctor", env=nnunet_env_vars(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    for key in ("torch", "nnunetv2", "detectron2", "detectron2._C", "GPU", "nnUNet_extTrainer", "start-up hook"):
        assert key in r.stdout
    assert "found organmtl.nnunet_trainers" in r.stdout


@pytest.mark.parametrize("cuda", [False, True])
def test_doctor_flags_unset_nnunet_paths_a_leftover_epochs_and_reports_the_gpu(cuda, tmp_path, monkeypatch, capsys):
    """No nnU-Net paths: a problem (exit 1, not "all good"); ORGANMTL_EPOCHS set: a warning naming it (not
    "all good"); the GPU line says what torch sees (the trainer probe and torch's CUDA query are replaced)."""
    import torch

    import organmtl.doctor as doctor

    monkeypatch.setattr(doctor, "trainer_visible_to_nnunet", lambda: (True, "organmtl.probe"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"name": "Test GPU", "total_memory": 80 * 2 ** 30})())
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "ORGANMTL_EPOCHS",
                "ORGANMTL_ITERS_PER_EPOCH", "ORGANMTL_VAL_ITERS"):
        monkeypatch.delenv(var, raising=False)
    assert doctor.run_doctor() == 1
    out = capsys.readouterr().out
    assert "all good" not in out and out.count("NOT SET") == 3 and "problems found" in out
    gpu = [line for line in out.splitlines() if line.startswith("GPU")]
    assert gpu == ["GPU          : 1 CUDA device(s): cuda:0 Test GPU (80 GiB)"] if cuda else \
        len(gpu) == 1 and gpu[0].startswith("GPU          : none ("), gpu
    for var, value in nnunet_env_vars(tmp_path).items():
        monkeypatch.setenv(var, value)
    assert doctor.run_doctor() == 0
    assert capsys.readouterr().out.splitlines()[-1] == "doctor: all good"
    monkeypatch.setenv("ORGANMTL_EPOCHS", "3")
    assert doctor.run_doctor() == 0
    out = capsys.readouterr().out
    assert "WARNING: ORGANMTL_EPOCHS=3 is set" in out and "non-_Tiny" in out and "all good" not in out


def test_startup_hook_sets_ext_trainer_without_importing_organmtl():
    code = "import os, sys; print(os.environ.get('nnUNet_extTrainer', '')); print('organmtl' in sys.modules)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "nnUNet_extTrainer"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.split()
    assert out[0].endswith("ext_shim") and out[1] == "False"


@pytest.mark.parametrize("cuda", [False, True])
def test_prediction_commands_share_one_device_rule(cuda, monkeypatch, tmp_path):
    """predict-centres and predict-landmarks default to ``auto`` and resolve it with the same helper:
    cuda where torch sees a GPU, else cpu (the predictors themselves are replaced by recorders)."""
    import torch

    import organmtl.nnunet_trainers.focusnet.centres as centres
    import organmtl.nnunet_trainers.landmarks.predict as landmarks
    from organmtl.cli import main
    from organmtl.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = {}
    monkeypatch.setattr(centres, "export_folder", lambda i, o, m, f, chk, device: seen.setdefault("centres", device)
                        and [])
    monkeypatch.setattr(landmarks, "run", lambda args: seen.setdefault("landmarks", args.device))
    assert main(["predict-centres", "-i", str(tmp_path), "-o", str(tmp_path), "-m", str(tmp_path)]) == 0
    assert main(["predict-landmarks", "-i", "a", "-o", "b", "-d", "1", "-c", "3d_tiny"]) == 0
    expected = "cuda" if cuda else "cpu"
    assert seen == {"centres": expected, "landmarks": expected} and resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


def test_unavailable_device_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    import torch

    from organmtl.cli import main
    from organmtl.devices import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")
    assert main(["predict-centres", "-i", str(tmp_path), "-o", str(tmp_path), "-m", str(tmp_path),
                 "-device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("organmtl predict-centres: error: -device cuda: no CUDA"), err


def test_readme_quick_start_writes_what_it_predicts_and_evaluates(tmp_path):
    """The README's "Using it" data commands (demo-data restricted to the head-and-neck family, for time)
    write the imagesTs that its nnUNetv2_predict reads and the labelsTs that its evaluate compares with,
    the same cases in both."""
    import os
    import shlex
    import string
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Using it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip() and
             not line.lstrip().startswith("#")]
    data = [line for line in lines if line.startswith(("organmtl demo-data", "mkdir", "mv", "organmtl convert pddca"))]
    assert len(data) >= 3 and any("--test" in line for line in data), data
    data = [f"{line} --families han_pddca" if line.startswith("organmtl demo-data") else line for line in data]
    env = {**os.environ, **nnunet_env_vars(tmp_path / "nnunet"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-ec", "\n".join(data)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr

    def argument(command: str, option: str | None, position: int | None = None) -> Path:
        line = next(line for line in lines if line.startswith(command))
        words = [string.Template(w).safe_substitute(env) for w in shlex.split(line)]
        text = words[words.index(option) + 1] if option else words[position]
        return Path(text) if os.path.isabs(text) else tmp_path / text

    images = argument("nnUNetv2_predict", "-i")
    labels = argument("organmtl evaluate", None, 3)
    assert images.name == "imagesTs" and labels.name == "labelsTs"
    cases = sorted(p.name.split("_0000")[0] for p in images.iterdir())
    assert cases and cases == sorted(p.name.split(".")[0] for p in labels.iterdir())
