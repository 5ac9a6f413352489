"""Tiny CPU configurations derived from nnU-Net's own plans."""
import json

import numpy as np

from organmtl.nnunet_plans import add_tiny_configurations, shrink_patch


def test_shrink_patch_keeps_aspect_and_budget():
    assert shrink_patch([32, 80, 80], 32 ** 3) == [16, 40, 40]
    assert shrink_patch([128, 128, 128], 32 ** 3) == [32, 32, 32]
    assert shrink_patch([20, 24, 24], 32 ** 3) == [20, 24, 24]       # already small: unchanged
    for patch in ([96, 160, 160], [64, 64], [40, 192, 160]):
        budget = 32 ** 3 if len(patch) == 3 else 64 ** 2
        assert np.prod(shrink_patch(patch, budget)) <= budget


def test_tiny_configuration_is_valid_for_nnunet(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [2.5, 1, 1],
             "original_median_shape_after_transp": [32, 80, 80], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "x",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
             "configurations": {"3d_fullres": {
                 "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                 "batch_size": 2, "patch_size": [32, 80, 80], "spacing": [2.5, 1.0, 1.0],
                 "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                  "arch_kwargs": {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
                                                  "kernel_sizes": [], "strides": [], "n_conv_per_stage": [],
                                                  "n_conv_per_stage_decoder": []},
                                  "_kw_requires_import": []}}}}
    f = tmp_path / "nnUNetPlans.json"
    f.write_text(json.dumps(plans))
    add_tiny_configurations(f, ["3d_tiny"])
    cm = PlansManager(str(f)).get_configuration("3d_tiny")
    assert cm.patch_size == [16, 40, 40] and cm.batch_size == 2
    assert cm.data_identifier == "nnUNetPlans_3d_fullres"           # shares the preprocessed data
    kw = cm.network_arch_init_kwargs
    assert kw["features_per_stage"] == [8, 16, 32, 64][: kw["n_stages"]]
    down = np.prod(np.array(kw["strides"]), axis=0)
    assert all(p % d == 0 for p, d in zip(cm.patch_size, down))
