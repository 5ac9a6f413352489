"""Plugin registry: built-in manifests resolve, and a third-party package adds a method with one
entry point (installed into the venv for the test, removed afterwards)."""
import subprocess
import sys
from pathlib import Path

import pytest

from organmtl.plugins import Plugin, PluginError, discover_plugins
from organmtl.plugins.registry import load_reference
from tests.conftest import run_cli

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
