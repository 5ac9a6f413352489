"""Tiny CPU configurations derived from nnU-Net's own plans."""
import json

import numpy as np
import pytest

from organmtl.nnunet_plans import add_tiny_configurations, lateral_offset_mm, left_right_axis, shrink_patch


def test_shrink_patch_keeps_aspect_and_budget():
    assert shrink_patch([32, 80, 80], 32 ** 3) == [16, 40, 40]
    assert shrink_patch([128, 128, 128], 32 ** 3) == [32, 32, 32]
    assert shrink_patch([20, 24, 24], 32 ** 3) == [20, 24, 24]       # already small: unchanged
    for patch in ([96, 160, 160], [64, 64], [40, 192, 160]):
        budget = 32 ** 3 if len(patch) == 3 else 64 ** 2
        assert np.prod(shrink_patch(patch, budget)) <= budget


def test_shrink_patch_keeps_the_left_right_edge():
    # the demo HaN plan: the uniform shrink sees half the head's width (16 x 40 x 40)
    assert shrink_patch([32, 80, 80], 32 ** 3, keep_axis=2, spacing=[2.5, 1, 1]) == [8, 48, 80]
    # flooring alone would give 8 x 24 x 80 (15360 voxels); the fill grows the finest-spaced edge first,
    # the first axis on a tie
    assert shrink_patch([32, 80, 80], 32 ** 3, keep_axis=2, spacing=[1, 1, 1]) == [16, 24, 80]
    assert shrink_patch([40, 48, 64], 32 ** 3, keep_axis=2, spacing=[4, 3.5, 3.5]) == [16, 32, 64]
    assert shrink_patch([48, 64], 64 ** 2, keep_axis=1, spacing=[3.5, 3.5]) == [48, 64]
    # an edge too long for the budget is cut only as far as the others keep 8 voxels each
    assert shrink_patch([64, 512, 512], 32 ** 3, keep_axis=2, spacing=[2.5, 1, 1]) == [8, 8, 512]
    assert shrink_patch([64, 1024, 1024], 32 ** 3, keep_axis=1, spacing=[2.5, 1, 1]) == [8, 512, 8]
    for patch in ([96, 160, 160], [40, 192, 160], [32, 80, 80]):
        for axis in range(3):
            out = shrink_patch(patch, 32 ** 3, keep_axis=axis, spacing=[2.5, 1, 1])
            assert np.prod(out) <= 32 ** 3 and all(o <= p for o, p in zip(out, patch))


def test_left_right_axis_follows_the_direction_and_the_transpose(tmp_path):
    import SimpleITK as sitk

    axial = sitk.Image(6, 5, 4, sitk.sitkUInt8)                  # index axis 0 along patient x: array axis 2
    sitk.WriteImage(axial, str(tmp_path / "axial.nii.gz"))
    assert left_right_axis(tmp_path / "axial.nii.gz", [0, 1, 2]) == 2
    assert left_right_axis(tmp_path / "axial.nii.gz", [2, 0, 1]) == 0    # nnU-Net moved array axis 2 first
    sagittal = sitk.Image(6, 5, 4, sitk.sitkUInt8)               # slices stacked left-right: index axis 2 along x
    sagittal.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    sitk.WriteImage(sagittal, str(tmp_path / "sagittal.nii.gz"))
    assert left_right_axis(tmp_path / "sagittal.nii.gz", [0, 1, 2]) == 0
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.nii.gz: cannot read the image header"):
        left_right_axis(tmp_path / "broken.nii.gz", [0, 1, 2])


def _plans(tmp_path):
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
    return f


def test_tiny_configuration_keeps_the_left_right_edge_for_nnunet(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    f = _plans(tmp_path)
    add_tiny_configurations(f, ["3d_tiny"], left_right=2)
    cm = PlansManager(str(f)).get_configuration("3d_tiny")
    assert cm.patch_size == [8, 48, 80]
    down = np.prod(np.array(cm.network_arch_init_kwargs["strides"]), axis=0)
    assert all(p % d == 0 for p, d in zip(cm.patch_size, down))


def test_tiny_configuration_is_valid_for_nnunet(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    f = _plans(tmp_path)
    add_tiny_configurations(f, ["3d_tiny"])
    cm = PlansManager(str(f)).get_configuration("3d_tiny")
    assert cm.patch_size == [16, 40, 40] and cm.batch_size == 2
    assert cm.data_identifier == "nnUNetPlans_3d_fullres"           # shares the preprocessed data
    kw = cm.network_arch_init_kwargs
    assert kw["features_per_stage"] == [8, 16, 32, 64][: kw["n_stages"]]
    down = np.prod(np.array(kw["strides"]), axis=0)
    assert all(p % d == 0 for p, d in zip(cm.patch_size, down))


def test_lateral_offset_is_half_the_pair_distance_along_patient_x(tmp_path):
    import SimpleITK as sitk

    files = []
    for i, (left, right) in enumerate([(30, 10), (28, 12), (33, 7)]):   # x index of each organ's centre
        arr = np.zeros((4, 6, 40), np.uint8)
        arr[1:3, 2:4, left - 1:left + 2] = 1                           # Parotid_L: 3 voxels wide, centred on `left`
        arr[1:3, 2:4, right - 1:right + 2] = 2
        arr[0, 0, 0] = 3                                               # a midline organ does not count
        image = sitk.GetImageFromArray(arr)
        image.SetSpacing((1.5, 1.0, 2.5))
        files.append(tmp_path / f"case_{i}.nii.gz")
        sitk.WriteImage(image, str(files[-1]))
    labels = {"background": 0, "Parotid_L": 1, "Parotid_R": 2, "Brainstem": 3, "OpticNerve_L": 4, "OpticNerve_R": 5}
    # medians of (20, 16, 26) voxels / 2 * 1.5 mm; the optic nerves appear in no case and are left out
    assert lateral_offset_mm(files, labels, [("Parotid_L", "Parotid_R"), ("OpticNerve_L", "OpticNerve_R")]) \
        == pytest.approx(15.0)
    assert lateral_offset_mm(files[:1], labels, [("Parotid_L", "Parotid_R")]) == pytest.approx(15.0)
    assert lateral_offset_mm(files[1:2], labels, [("Parotid_L", "Parotid_R")]) == pytest.approx(12.0)
    assert lateral_offset_mm(files, labels, [("OpticNerve_L", "OpticNerve_R")]) is None
    # a sagittal stack: index axis 2 runs along patient x, so the slice spacing sets the distance
    arr = np.zeros((40, 6, 4), np.uint8)
    arr[29:32, 2:4, 1:3] = 1
    arr[9:12, 2:4, 1:3] = 2
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    sitk.WriteImage(image, str(tmp_path / "sagittal.nii.gz"))
    assert lateral_offset_mm([tmp_path / "sagittal.nii.gz"], labels, [("Parotid_L", "Parotid_R")]) == pytest.approx(20.0)


def test_the_left_right_edge_is_kept_only_where_the_uniform_patch_misses_the_midline(tmp_path):
    # the demo HaN plan: uniform 16 x 40 x 40 at 1 mm reaches 20 mm from a patch centre
    f = _plans(tmp_path)
    assert add_tiny_configurations(f, ["3d_tiny"], left_right=2, lateral_offset=24.6)["3d_tiny"]["patch_size"] \
        == [8, 48, 80]                                                # parotids 24.6 mm out: whole edge
    assert add_tiny_configurations(f, ["3d_tiny"], left_right=2, lateral_offset=19.0)["3d_tiny"]["patch_size"] \
        == [16, 40, 40]                                               # within reach: the uniform patch
    assert add_tiny_configurations(f, ["3d_tiny"], left_right=2)["3d_tiny"]["patch_size"] == [8, 48, 80]  # unknown
    assert json.loads(f.read_text())["configurations"]["3d_tiny"]["patch_size"] == [8, 48, 80]



def test_plan_tiny_bad_dataset_or_unset_paths_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """``plan-tiny -d 777`` (no such dataset) and ``plan-tiny`` without the nnU-Net paths: one line, exit 2
    (a traceback would fail the test: main() re-raises anything but bad input), nothing written."""
    from organmtl.cli import main

    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    (tmp_path / "raw" / "Dataset501_X").mkdir(parents=True)         # another id: 777 is still not found
    assert main(["plan-tiny", "-d", "777"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("organmtl plan-tiny: error: "), err
    assert "no dataset with id 777" in err and str(tmp_path / "raw") in err
    monkeypatch.delenv("nnUNet_raw")
    monkeypatch.delenv("nnUNet_preprocessed")
    assert main(["plan-tiny", "-d", "501"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nnUNet_raw and nnUNet_preprocessed are not set" in err, err
    assert not (tmp_path / "pre").exists()
