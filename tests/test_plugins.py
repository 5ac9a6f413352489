"""Plugin registry: built-in manifests resolve, and a third-party package adds a method with one
entry point (installed into the venv for the test, removed afterwards)."""
import subprocess
import sys
from pathlib import Path

import pytest

from organmtl.plugins import Plugin, PluginError, discover_plugins
from organmtl.plugins.registry import load_reference
from tests.helpers import run_cli

BUILTIN = {"hmrnet", "focusnetv2", "landmark_unet", "multitask_cnn", "converters"}
FIXTURE = Path(__file__).parent / "fixtures" / "example_plugin"


def test_builtin_plugins_are_discovered_and_resolve():
    plugins = discover_plugins()
    assert BUILTIN <= set(plugins)
    for name in BUILTIN:
        assert plugins[name].distribution == "organmtl"
        assert plugins[name].check() == [], name
        assert (Path(__file__).parent.parent / plugins[name].docs).is_file()


def test_manifest_problems_are_reported():
    bad = Plugin(name="bad", description="", nnunet_trainers=("organmtl.nnunet_trainers:NoSuchTrainer",),
                 detectron_configs=("organmtl.detectron_heads:configs/missing.yaml",))
    problems = bad.check()
    assert any("NoSuchTrainer" in p for p in problems)
    assert any("missing.yaml" in p for p in problems)
    with pytest.raises(PluginError):
        load_reference("no_colon_here")


def test_organmtl_list_shows_builtins():
    r = run_cli("list", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in BUILTIN:
        assert f"{name}:" in r.stdout
    assert "nnUNetTrainerOMTLBaseline_Tiny" in r.stdout


def _trainers_nnunet_finds(folder: Path, package: str) -> dict[str, type]:
    """Every ``nnUNetTrainerOMTL*`` nnUNetTrainer subclass that nnU-Net's class search can return
    under ``folder``: the modules it imports (every non-package module of a folder, then each
    subpackage, as ``nnunetv2.utilities.find_class_by_name``) and the trainer attributes they hold."""
    import importlib
    import pkgutil

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    found = {}
    for _, name, ispkg in pkgutil.iter_modules([str(folder)]):
        if ispkg:
            found.update(_trainers_nnunet_finds(folder / name, f"{package}.{name}"))
            continue
        module = importlib.import_module(f"{package}.{name}")
        found.update({k: v for k, v in vars(module).items() if k.startswith("nnUNetTrainerOMTL")
                      and isinstance(v, type) and issubclass(v, nnUNetTrainer)})
    return found


def test_listed_trainers_are_exactly_those_nnunet_finds():
    """The names ``organmtl list`` prints == the nnUNetTrainerOMTL* classes nnU-Net's own search finds
    under organmtl.nnunet_trainers; each resolves to the same class there and through the
    nnUNet_extTrainer shim folder (the path ``nnUNetv2_train -tr`` takes)."""
    import re

    import organmtl.nnunet_trainers as package
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from organmtl.env import ext_trainer_dir

    r = run_cli("list")
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {name for line in r.stdout.splitlines() if "nnU-Net trainers :" in line
              for name in re.split(r",\s*", line.split(":", 1)[1].strip())}
    folder = Path(package.__file__).parent
    found = _trainers_nnunet_finds(folder, package.__name__)
    assert len(found) >= 45 and listed == set(found), (sorted(listed ^ set(found)))
    assert {c.__name__ for c in package.TRAINERS} == listed and sorted(package.__all__) == sorted(listed)
    for name, cls in found.items():
        assert recursive_find_python_class(str(folder), name, package.__name__) is cls, name
        via_shim = recursive_find_python_class(str(ext_trainer_dir()), name, None, base_folder=str(ext_trainer_dir()),
                                               cleanup_imports_from_base_folder=True)
        assert via_shim is cls, name


def test_trainer_sets_are_resolved_lazily_and_checked():
    lazy = Plugin(name="lazy", description="", nnunet_trainer_sets=("organmtl.nnunet_trainers:MULTITASK",))
    assert lazy.has_trainers and "nnUNetTrainerOMTLTriplanar_Tiny" in lazy.trainer_names
    assert all(ref.startswith(("organmtl.nnunet_trainers.multitask.trainers:",
                               "organmtl.nnunet_trainers.multitask.partial_labels:")) for ref in lazy.trainer_refs())
    broken = Plugin(name="broken", description="", nnunet_trainer_sets=("organmtl.nnunet_trainers:NO_SUCH_SET",))
    assert any("NO_SUCH_SET" in p for p in broken.check())


@pytest.fixture
def third_party_installed():
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", str(FIXTURE)], check=True,
                   capture_output=True)
    yield
    subprocess.run(pip + ["uninstall", "-y", "organmtl-example-plugin"], check=True, capture_output=True)


def test_third_party_plugin_is_listed(third_party_installed):
    r = run_cli("list", "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "example_method [organmtl-example-plugin]: Example third-party method" in r.stdout
    assert "nnUNetTrainerExampleThirdParty" in r.stdout
    for name in BUILTIN:
        assert f"{name}:" in r.stdout


def test_listed_config_ids_work_as_train_net_config_file(tmp_path, capsys):
    """Every Detectron2 config id that ``organmtl list`` prints is accepted by ``train_net.py --config-file``
    (resolved inside the installed package: the same file as ``--paths`` prints); a bad id is one line."""
    from organmtl.cli import main
    from organmtl.detectron_heads.train_net import (ConfigFileError, default_argument_parser, resolve_config_file,
                                                    setup)

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    ids = [i for line in out.splitlines() if "Detectron2 configs:" in line for i in line.split(": ", 1)[1].split(", ")]
    assert main(["list", "--paths"]) == 0
    paths = [i for line in capsys.readouterr().out.splitlines() if "Detectron2 configs:" in line
             for i in line.split(": ", 1)[1].split(", ")]
    assert len(ids) == len(paths) >= 12 and "--config-file" in out
    assert [resolve_config_file(i) for i in ids] == paths and all(Path(p).is_file() for p in paths)
    tiny = next(i for i in ids if i.endswith("mask_rcnn_R_18_FPN_baseline_tiny.yaml"))
    args = default_argument_parser().parse_args(["--config-file", tiny, "OUTPUT_DIR", str(tmp_path)])
    cfg = setup(args)
    assert cfg.MODEL.RESNETS.DEPTH == 18 and cfg.MODEL.FPN.OUT_CHANNELS == 64      # the tiny file and its _BASE_
    assert (tmp_path / "config.yaml").is_file()
    for bad, why in (("organmtl.detectron_heads:configs/nope.yaml", "has no file"),
                     ("no_such_package:x.yaml", "no installed package"), ("missing.yaml", "no such file")):
        with pytest.raises(ConfigFileError, match=why):
            resolve_config_file(bad)
