"""FocusNet settings that travel with the model: FocusNetOptions precedence (stored plans entry >
environment > class defaults) in the trainer, the model folder's plans.json for a new fold, the
checkpoint's copy for ``--c``/``--val``, the network built from the stored entry, and the one
``forward`` dispatching to named parts with one return type each (docs/focusnetv2.md "Options")."""
import json

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from organmtl.nnunet_trainers.focusnet import options as O
from organmtl.nnunet_trainers.focusnet.network import AEOutput, FocusNet, HeatmapOutput, SNetOutput, SOSOutput, SOSRecord
from organmtl.nnunet_trainers.focusnet.trainers import nnUNetTrainerOMTLFocusNetV2, nnUNetTrainerOMTLFocusNetV2_Tiny
from tests.helpers import one_thread

CONFIG = "3d_tiny"


def _plans(entry=None) -> dict:
    cfg = {"data_identifier": "d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": [8, 16, 16], "median_image_size_in_voxels": [16, 32, 32], "spacing": [2.5, 1.0, 1.0],
           "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
           "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
           "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
           "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
           "batch_dice": False,
           "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                            "arch_kwargs": {"n_stages": 2, "features_per_stage": [8, 16]}, "_kw_requires_import": []}}
    if entry is not None:
        cfg[O.PLANS_KEY] = entry
    return {"continue_training": False, "dataset_name": "Dataset998_FN", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": [2.5, 1, 1], "original_median_shape_after_transp": [16, 32, 32],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "x", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {}, "configurations": {CONFIG: cfg}}


DATASET_JSON = {"labels": {"background": 0, "BrainStem": 1, "Chiasm": 2}, "channel_names": {"0": "CT"},
                "file_ending": ".nii.gz", "numTraining": 4}


@pytest.fixture
def results(tmp_path, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    for var in ("ORGANMTL_FOCUSNET_HEAT_THRESHOLD", "ORGANMTL_FOCUSNET_LR", "ORGANMTL_FOCUSNET_ROI"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "nnUNet_results"


def _trainer(entry=None, fold=0, cls=nnUNetTrainerOMTLFocusNetV2):
    return cls(_plans(entry), CONFIG, fold, dict(DATASET_JSON), torch.device("cpu"))


def _log(tr) -> str:
    with open(tr.log_file) as fh:
        return fh.read()


def test_options_plans_entry_then_environment_then_defaults(results, monkeypatch):
    tr = _trainer()
    assert tr.options == O.FocusNetOptions() and (tr.initial_lr, tr.centre_jitter) == (5e-4, 2)
    monkeypatch.setenv("ORGANMTL_FOCUSNET_HEAT_THRESHOLD", "0.9")
    monkeypatch.setenv("ORGANMTL_FOCUSNET_LR", "1e-3")
    tr = _trainer()
    assert (tr.options.heat_threshold, tr.initial_lr) == (0.9, 1e-3)
    tr = _trainer({"options": {"heat_threshold": 0.3, "roi": [4, 8, 8]}})
    assert (tr.options.heat_threshold, tr.options.roi, tr.initial_lr) == (0.3, (4, 8, 8), 1e-3)
    log = _log(tr)
    assert ("heat_threshold=0.3 stored with the model (the plans' configuration entry) wins over "
            "ORGANMTL_FOCUSNET_HEAT_THRESHOLD='0.9'") in log
    assert "ORGANMTL_FOCUSNET_LR" not in log                            # lr is not stored: no note
    monkeypatch.setenv("ORGANMTL_FOCUSNET_LR", "fast")
    with pytest.raises(ValueError, match="ORGANMTL_FOCUSNET_LR='fast': is not a number"):
        _trainer()


def test_a_new_fold_takes_the_settings_of_the_model_folder(results, monkeypatch):
    base = results / "Dataset998_FN" / f"nnUNetTrainerOMTLFocusNetV2__nnUNetPlans__{CONFIG}"
    base.mkdir(parents=True)
    (base / "plans.json").write_text(json.dumps(_plans({"options": {"roi": [4, 8, 8]}, "small_labels": [2]})))
    monkeypatch.setenv("ORGANMTL_FOCUSNET_ROI", "2,4,4")
    assert _trainer(fold=1).options.roi == (2, 4, 4)         # no other fold yet: a fresh model, the environment
    (base / "fold_0").mkdir()
    tr = _trainer(fold=1)
    assert tr.options.roi == (4, 8, 8) and tr._stored["small_labels"] == [2]
    assert "wins over ORGANMTL_FOCUSNET_ROI='2,4,4'" in _log(tr) and "shared with ['fold_0']" in _log(tr)


def test_load_checkpoint_adopts_the_checkpoint_entry_before_building(results, monkeypatch, tmp_path):
    stored = {"options": {"heat_threshold": 0.25, "lr": 2e-4}, "small_organs": ["Chiasm"], "small_labels": [2],
              "roi_size": [4, 8, 8], "use_sos": True, "concat_image": True, "use_ae": True, "heat_threshold": 0.25,
              "width": 0.125, "fold_record": {"fold": 0, "organ_sizes_mm3": {"0": 1.0, "1": 2.0, "2": 3.0},
                                               "schedule": [["snet", 1], ["joint", 1]]}}
    plans = _plans(stored)
    del plans["continue_training"]
    ckpt = tmp_path / "checkpoint_final.pth"
    torch.save({"init_args": {"plans": plans, "configuration": CONFIG}}, ckpt)
    calls = []
    monkeypatch.setattr(nnUNetTrainer, "load_checkpoint", lambda self, f: calls.append((f, self.options)))
    monkeypatch.setenv("ORGANMTL_FOCUSNET_HEAT_THRESHOLD", "0.8")
    tr = _trainer()
    assert tr.options.heat_threshold == 0.8
    tr.load_checkpoint(str(ckpt))
    assert calls == [(str(ckpt), tr.options)] and tr.options.heat_threshold == 0.25 and tr.initial_lr == 2e-4
    assert tr._stored["fold_record"]["schedule"] == [["snet", 1], ["joint", 1]]
    assert f"stored with the model (checkpoint {ckpt}) wins over ORGANMTL_FOCUSNET_HEAT_THRESHOLD='0.8'" in _log(tr)


def test_network_is_built_from_the_stored_entry_and_tiny_changes_no_size(results):
    entry = {"small_organs": ["Chiasm"], "small_labels": [2], "roi_size": [4, 8, 8], "use_sos": True,
             "concat_image": False, "use_ae": True, "heat_threshold": 0.4, "width": 0.25}
    tr = _trainer(entry, cls=nnUNetTrainerOMTLFocusNetV2_Tiny)
    net = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1, 3)
    assert (net.small_labels, net.roi_size, net.concat_image, net.heat_threshold) == ([2], (4, 8, 8), False, 0.4)
    assert net.snet.feature_channels == 8                                # 32 x 0.25
    assert not hasattr(nnUNetTrainerOMTLFocusNetV2_Tiny, "network_width")
    cm = tr.configuration_manager
    del cm.configuration[O.PLANS_KEY]
    with pytest.raises(ValueError, match="no 'organmtl_focusnet' entry"):
        tr.build_network_architecture(tr.plans_manager, cm, 1, 3)


def test_forward_dispatches_to_named_parts_with_one_return_type_each():
    torch.manual_seed(0)
    net = FocusNet(1, 4, small_labels=[2, 3], roi_size=(4, 8, 8), width=0.125).train()
    x = torch.randn(2, 1, 8, 16, 16)
    with one_thread():
        assert isinstance(net(x), torch.Tensor) and net(x).shape == (2, 4, 8, 16, 16)
        s = net(x, part="snet")
        assert type(s) is SNetOutput and s.logits.shape == (2, 4, 8, 16, 16)
        h = net(x, part="heatmap", train_snet=False)
        assert type(h) is HeatmapOutput and h.heatmaps.shape == (2, 2, 8, 16, 16) and not h.features.requires_grad
        o = net(x, part="sos", centres=[[(3, 7, 8), None], [None, (4, 8, 8)]])
        assert type(o) is SOSOutput and [(r.b, r.k) for r in o.records] == [(0, 0), (1, 1)]
        assert all(type(r) is SOSRecord and r.prob.shape == (1, 4, 8, 8) for r in o.records)
        ae = net(part="ae", masks=[torch.rand(3, 1, 4, 8, 8), None])
        assert type(ae) is list and ae[1] is None and type(ae[0]) is AEOutput
        assert ae[0].reconstruction.shape == (3, 1, 4, 8, 8)
        assert net.run_snet(x).logits.shape == s.logits.shape            # the named methods, outside DDP
        with pytest.raises(ValueError, match="unknown part 'mode'"):
            net(x, part="mode")
        net.eval()
        assert isinstance(net(x), torch.Tensor) and net(x).shape == (2, 4, 8, 16, 16)
    s_only = FocusNet(1, 4, use_sos=False, width=0.125)
    with pytest.raises(RuntimeError, match="needs SOL/SOS-Net"):
        s_only(x, part="heatmap")
