"""Trainer mixins: CPU schedule from the environment, laterality-aware mirroring."""
import pytest

from organmtl.nnunet_trainers.budget import _env_int
from organmtl.nnunet_trainers.laterality import lateral_pairs


def test_lateral_pairs():
    names = ["background", "BrainStem", "Parotid_L", "Parotid_R", "OpticNerve_L", "OpticNerve_R", "Chiasm",
             "kidney_left", "kidney_right", "Lung"]
    assert sorted(lateral_pairs(names)) == [("OpticNerve_L", "OpticNerve_R"), ("Parotid_L", "Parotid_R"),
                                            ("kidney_left", "kidney_right")]
    assert lateral_pairs(["background", "CSF", "GM", "WM"]) == []
    assert lateral_pairs(["Lung_L"]) == []                              # a single side is not a pair


def test_env_int(monkeypatch):
    monkeypatch.delenv("ORGANMTL_EPOCHS", raising=False)
    assert _env_int("ORGANMTL_EPOCHS", 3) == 3
    monkeypatch.setenv("ORGANMTL_EPOCHS", "7")
    assert _env_int("ORGANMTL_EPOCHS", 3) == 7
    monkeypatch.setenv("ORGANMTL_EPOCHS", "x")
    with pytest.raises(ValueError, match="ORGANMTL_EPOCHS"):
        _env_int("ORGANMTL_EPOCHS", 3)
