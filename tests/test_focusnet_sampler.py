"""The whole-small-organ patch sampler of FocusNet's ``ae``/``sos``/``joint`` phases
(nnunet_trainers/focusnet/sampler.py, docs/focusnetv2.md "Sampling"): every patch holds every small organ
of its case with no voxel on the patch border; an organ too large for the patch is centred; cases without a
small organ are not drawn; the S-Net and SOL-Net phases keep nnU-Net's sampler."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from organmtl.nnunet_trainers.focusnet.sampler import WholeSmallOrganDataLoader
from tests.helpers import one_thread
from tests.test_focusnet_train_steps import DATASET_JSON, PATCH, make_trainer, nnunet_folders, set_phase, tiny_plans

SHAPE = (20, 48, 48)
LABELS = {"background": 0, "BrainStem": 1, "Chiasm": 2, "Lens": 3}


def _case(rng, small_at, big_lens: bool = False, lens: bool = True):
    """Label map: a large organ (1) and small organs 2 (3 x 4 x 4 at ``small_at``) and 3 (``big_lens``: wider
    than the patch in x, else 2 x 3 x 3 next to organ 2; ``lens=False``: none); ``small_at`` None: no small organ."""
    seg = np.zeros(SHAPE, np.int16)
    seg[4:16, 10:38, 10:38] = 1
    if small_at is not None:
        z, y, x = small_at
        seg[z:z + 3, y:y + 4, x:x + 4] = 2
        if big_lens:
            seg[z, 20:24, 6:40] = 3
        elif lens:
            zz, yy, xx = min(z + 4, SHAPE[0] - 2), min(y + 5, SHAPE[1] - 3), x
            seg[zz:zz + 2, yy:yy + 3, xx:xx + 3] = 3
    data = (seg + rng.normal(0, 0.1, SHAPE)).astype(np.float32)[None]
    locations = {v: np.argwhere(seg[None] == v) for v in (1, 2, 3) if (seg == v).any() or v < 3}
    return data, seg[None], {"class_locations": locations, "spacing": [2.5, 1.0, 1.0]}


def _write_cases(folder, cases, lens: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("case_*"):
        f.unlink()
    rng = np.random.default_rng(0)
    for name, (at, big) in cases.items():
        nnUNetDatasetNumpy.save_case(*_case(rng, at, big, lens), str(folder / name))


#: small organs at the image corners and in the middle; one case without small organs
CASES = {"case_a": ((0, 0, 0), False), "case_b": ((14, 38, 41), False), "case_c": ((8, 20, 20), False),
         "case_d": ((2, 30, 5), False), "case_none": (None, False)}


def _label_manager():
    dj = {**copy.deepcopy(DATASET_JSON), "labels": dict(LABELS)}
    return PlansManager(tiny_plans()).get_label_manager(dj)


def _on_border_or_missing(seg: np.ndarray, label: int) -> str | None:
    m = seg == label
    if not m.any():
        return "missing"
    for axis in range(3):
        faces = np.take(m, [0, m.shape[axis] - 1], axis=axis)
        if faces.any():
            return f"on the border of axis {axis}"
    return None


def test_every_patch_holds_every_small_organ_whole(tmp_path):
    folder = tmp_path / "pre"
    _write_cases(folder, CASES)
    ds = nnUNetDatasetNumpy(str(folder))
    np.random.seed(0)
    loader = WholeSmallOrganDataLoader(ds, 2, PATCH, PATCH, _label_manager(), [2, 3])
    assert loader.indices == ["case_a", "case_b", "case_c", "case_d"] and loader.cases_not_fitting == []
    drawn, starts = set(), {}
    for _ in range(40):
        batch = next(loader)
        for key, seg in zip(batch["keys"], batch["target"].numpy()[:, 0]):
            drawn.add(key)
            for label in (2, 3):
                problem = _on_border_or_missing(seg, label)
                assert problem is None, f"{key}: small organ {label} {problem}"
            starts.setdefault(key, set()).add(tuple(np.argwhere(seg == 2).min(0)))
    assert drawn == {"case_a", "case_b", "case_c", "case_d"}                  # never the case without small organs
    assert all(len(v) > 1 for v in starts.values())                          # the position inside the patch varies
    # nnU-Net's own random sampler on the same cases cuts or misses them (what the sampler is for)
    np.random.seed(0)
    stock = nnUNetDataLoader(ds, 2, PATCH, PATCH, _label_manager(), oversample_foreground_percent=0.33)
    problems = [_on_border_or_missing(seg, 2) for _ in range(20) for seg in next(stock)["target"].numpy()[:, 0]]
    assert sum(p is not None for p in problems) > 5


def test_small_organs_larger_than_the_patch_are_centred(tmp_path):
    folder = tmp_path / "pre"
    _write_cases(folder, {"case_wide": ((8, 18, 18), True)})     # organ 3 spans x 6..39: 34 > patch 24 - 2
    ds = nnUNetDatasetNumpy(str(folder))
    np.random.seed(1)
    loader = WholeSmallOrganDataLoader(ds, 2, PATCH, PATCH, _label_manager(), [2, 3])
    assert loader.cases_not_fitting == ["case_wide"]
    for _ in range(5):
        for seg in next(loader)["target"].numpy()[:, 0]:
            assert _on_border_or_missing(seg, 2) is None
            xs = np.nonzero((seg == 3).any((0, 1)))[0]
            assert xs.min() == 0 and xs.max() == PATCH[2] - 1                 # cut on both sides ...
            lo, hi = 6, 39                                                    # ... symmetrically (organ centre = patch centre)
            ys = np.argwhere(seg == 2)
            assert ys[:, 2].min() == 18 - (lo + hi + 1) // 2 + PATCH[2] // 2


def test_whole_organ_sampler_only_in_the_ae_sos_joint_phases(tmp_path, monkeypatch):
    for var in [v for v in __import__("os").environ if v.startswith("ORGANMTL_FOCUSNET")]:
        monkeypatch.delenv(var)
    nnunet_folders(tmp_path, monkeypatch.setenv)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    _write_cases(tmp_path / "nnUNet_preprocessed" / "Dataset997_FNSteps" / "d",
                 {f"case_{i}": ((2 + i, 4 + 3 * i, 30 - 4 * i), False) for i in range(5)}, lens=False)
    with one_thread():
        tr = make_trainer()
        kinds = {}
        for phase in ("snet", "sol", "ae", "sos", "joint"):
            set_phase(tr, phase)
            if tr.dataloader_train is None:
                tr.dataloader_train, tr.dataloader_val = tr.get_dataloaders()
            tr._switch_sampler()
            kinds[phase] = type(tr.dataloader_train.data_loader)
            if phase in ("ae", "sos", "joint"):
                # ae: every sample holds the Chiasm; sos/joint: a third of the samples at nnU-Net's random positions
                # (SOS-Net's negatives)
                assert tr.dataloader_train.data_loader.random_fraction == (0.0 if phase == "ae" else pytest.approx(1 / 3))
            if phase == "ae":
                np.random.seed(0), torch.manual_seed(0)
                batch = next(tr.dataloader_train)
                target = batch["target"][0] if isinstance(batch["target"], list) else batch["target"]
                assert all((target[b] == 2).any() for b in range(target.shape[0]))   # the Chiasm in every sample
            if phase in ("sos", "joint"):
                np.random.seed(0), torch.manual_seed(0)
                out = tr.train_step(next(tr.dataloader_train))
                assert out["focusnet_trained"] and np.isfinite(out["loss"])
        assert type(tr.dataloader_val.data_loader) is nnUNetDataLoader
    assert kinds == {"snet": nnUNetDataLoader, "sol": nnUNetDataLoader, "ae": WholeSmallOrganDataLoader,
                     "sos": WholeSmallOrganDataLoader, "joint": WholeSmallOrganDataLoader}
    assert "patches holding every small organ whole" in open(tr.log_file).read()
