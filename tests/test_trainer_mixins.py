"""Trainer mixins and settings: the one environment parser, CPU schedule from the environment,
laterality-aware mirroring, the network width that follows the plan."""
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from organmtl.nnunet_trainers.laterality import lateral_pairs
from organmtl.nnunet_trainers.settings import (SettingError, env_float, env_int, parse_int, parse_list, parse_mapping,
                                               plan_width_factor, resolve, setting, to_stored)


def test_lateral_pairs():
    names = ["background", "BrainStem", "Parotid_L", "Parotid_R", "OpticNerve_L", "OpticNerve_R", "Chiasm",
             "kidney_left", "kidney_right", "Lung"]
    assert sorted(lateral_pairs(names)) == [("OpticNerve_L", "OpticNerve_R"), ("Parotid_L", "Parotid_R"),
                                            ("kidney_left", "kidney_right")]
    assert lateral_pairs(["background", "CSF", "GM", "WM"]) == []
    assert lateral_pairs(["Lung_L"]) == []                              # a single side is not a pair


def test_env_int_and_float(monkeypatch):
    monkeypatch.delenv("ORGANMTL_EPOCHS", raising=False)
    assert env_int("ORGANMTL_EPOCHS", 3) == 3
    monkeypatch.setenv("ORGANMTL_EPOCHS", "")                    # empty = unset
    assert env_int("ORGANMTL_EPOCHS", 3) == 3
    monkeypatch.setenv("ORGANMTL_EPOCHS", " 7 ")
    assert env_int("ORGANMTL_EPOCHS", 3, minimum=1) == 7
    monkeypatch.setenv("ORGANMTL_EPOCHS", "x")
    with pytest.raises(SettingError, match=r"^environment variable ORGANMTL_EPOCHS='x': is not an integer$"):
        env_int("ORGANMTL_EPOCHS", 3)
    monkeypatch.setenv("ORGANMTL_EPOCHS", "0")
    with pytest.raises(SettingError, match=r"ORGANMTL_EPOCHS='0': must be >= 1"):
        env_int("ORGANMTL_EPOCHS", 3, minimum=1)
    monkeypatch.setenv("ORGANMTL_X", "2.5e-4")
    assert env_float("ORGANMTL_X", 1.0) == 2.5e-4
    monkeypatch.setenv("ORGANMTL_X", "fast")
    with pytest.raises(SettingError, match=r"ORGANMTL_X='fast': is not a number"):
        env_float("ORGANMTL_X", 1.0)


def test_list_and_mapping_parsers_name_the_variable_and_the_bad_item():
    assert parse_list("V", "a, b,c") == ("a", "b", "c")
    assert parse_list("V", "4,16,16", parse_int, length=3) == (4, 16, 16)
    with pytest.raises(SettingError, match=r"V='4,x,16': item 'x' is not an integer"):
        parse_list("V", "4,x,16", parse_int, length=3)
    with pytest.raises(SettingError, match=r"V='4,16': must be 3 comma-separated values"):
        parse_list("V", "4,16", parse_int, length=3)
    assert parse_mapping("M", "a=1, b=2", ("a", "b"), parse_int) == {"a": 1, "b": 2}
    with pytest.raises(SettingError, match=r"M='a=1,c=2': 'c=2' is not NAME=VALUE with NAME one of \['a', 'b'\]"):
        parse_mapping("M", "a=1,c=2", ("a", "b"), parse_int)
    with pytest.raises(SettingError, match=r"M='a=one': 'a=one': the value is not an integer"):
        parse_mapping("M", "a=one", ("a", "b"), parse_int)


@dataclass(frozen=True)
class _Opts:
    n: int = setting(3, "ORGANMTL_TEST_N", parse_int, int)
    names: tuple | None = setting(None, "ORGANMTL_TEST_NAMES", parse_list, tuple)


def test_resolve_precedence_stored_then_environment_then_default(monkeypatch):
    monkeypatch.delenv("ORGANMTL_TEST_N", raising=False)
    monkeypatch.delenv("ORGANMTL_TEST_NAMES", raising=False)
    assert resolve(_Opts).options == _Opts(3, None) and resolve(_Opts).notes == ()
    monkeypatch.setenv("ORGANMTL_TEST_N", "5")
    monkeypatch.setenv("ORGANMTL_TEST_NAMES", "a,b")
    assert resolve(_Opts).options == _Opts(5, ("a", "b"))
    r = resolve(_Opts, {"n": 4, "names": ["a", "b"]}, "ckpt.pth")       # stored as JSON: list -> tuple
    assert r.options == _Opts(4, ("a", "b"))
    assert r.notes == ("n=4 stored with the model (ckpt.pth) wins over ORGANMTL_TEST_N='5'",)
    assert to_stored(r.options) == {"n": 4, "names": ["a", "b"]}
    monkeypatch.setenv("ORGANMTL_TEST_N", "five")                       # a broken variable is an error even then
    with pytest.raises(SettingError, match="ORGANMTL_TEST_N='five'"):
        resolve(_Opts, {"n": 4})


def test_plan_width_factor():
    cm = SimpleNamespace(network_arch_init_kwargs={"features_per_stage": [8, 16, 32]}, network_arch_class_name="U")
    assert plan_width_factor(cm) == 0.25
    cm.network_arch_init_kwargs = {"features_per_stage": [32, 64]}
    assert plan_width_factor(cm) == 1.0
    cm.network_arch_init_kwargs = {}
    with pytest.raises(ValueError, match="features_per_stage"):
        plan_width_factor(cm)
    # organmtl plan-tiny's 3d_tiny starts at 8 features: a quarter of the paper widths, as _Tiny had by hand
    from organmtl.nnunet_plans import tiny_configuration

    parent = {"_name": "3d_fullres", "spacing": [2.5, 1.0, 1.0], "patch_size": [40, 160, 160],
              "architecture": {"arch_kwargs": {"features_per_stage": [32, 64, 128, 256, 320]}}}
    tiny = tiny_configuration(parent, 32 ** 3)["architecture"]["arch_kwargs"]
    assert plan_width_factor(SimpleNamespace(network_arch_init_kwargs=tiny, network_arch_class_name="U")) == 0.25


def test_every_trainer_switches_mirroring_off_for_left_right_pairs():
    """A left-right flip swaps Kidney_L and Kidney_R while the labels stay: every organmtl trainer family
    (not only the baseline) carries the laterality rule, so method and baseline are compared alike."""
    from organmtl.nnunet_trainers import TRAINERS
    from organmtl.nnunet_trainers.laterality import LateralityAwareMirroringMixin

    missing = [t.__name__ for t in TRAINERS if not issubclass(t, LateralityAwareMirroringMixin)]
    assert not missing, missing
