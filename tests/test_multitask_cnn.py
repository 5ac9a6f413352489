"""Multi-task multi-modality CNN (Moeskops et al., "Deep Learning for Multi-task Medical Image
Segmentation in Multiple Modalities"; docs/multitask_cnn.md): the triplanar network (§3.1),
task/class-balanced nnU-Net batches (§3.2), the losses, the task table, and the evaluation pieces
(per-task masking, cross-task confusion, Dice-optimal PR threshold, §4)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from organmtl.nnunet_trainers.multitask.evaluation import (DiceOptimalThreshold, argmax_labels, confusion_rate,
                                                            dice_per_label, head_label_values, task_masked_labels,
                                                            thresholded_labels)
from organmtl.workflows.multitask_experiments import plan_experiments, task_subsets
from organmtl.nnunet_trainers.multitask.sampler import TaskBalancedDataLoader
from organmtl.nnunet_trainers.multitask.tasks import SINGLE_TASK, TaskTable
from organmtl.nnunet_trainers.multitask.triplanar import TriplanarCNN
from tests.helpers import one_thread

LABELS = {"background": 0, "CSF": 1, "GM": 2, "WM": 3, "pectoral_muscle": 4, "coronary_artery": 5}


def _dataset_json(cases_per_task=4):
    tasks = {"brain_mr": [1, 2, 3], "breast_mr": [4], "cardiac_cta": [5]}
    return {"labels": LABELS, "organmtl_tasks": {
        t: {"label_values": v, "labels": [k for k, x in LABELS.items() if x in v],
            "cases": [f"{t}_{i}" for i in range(cases_per_task)], "test_cases": []} for t, v in tasks.items()}}


# ------------------------------------------------------------------ the triplanar network (§3.1)

def test_paper_configuration_shape_parameters_and_receptive_field():
    net = TriplanarCNN(1, 6)                                     # 25 layers, 32 kernels, 2 x 192 FC
    convs = [m for m in net.stack if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 25 and all(c.kernel_size == (3, 3) and c.out_channels == 32 and c.stride == (1, 1)
                                    for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.stack) == 25
    assert sum(isinstance(m, torch.nn.ELU) for m in net.stack) == 25
    fc = [m for m in net.fc if isinstance(m, torch.nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in fc] == [(96, 192, (1, 1, 1)), (192, 192, (1, 1, 1))]
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.fc) == 2
    assert net.classifier.out_channels == 6 and net.receptive_field == 51
    net.eval()
    x = torch.randn(1, 1, 5, 7, 9)
    with torch.no_grad():
        assert net(x).shape == (1, 6, 5, 7, 9)                    # fully convolutional, any size
        assert net.features_per_voxel(x).shape == (1, 96, 5, 7, 9)


def test_receptive_field_is_three_orthogonal_squares():
    """The gradient of one output voxel reaches exactly the three (2L+1)^2 in-plane squares through it."""
    torch.manual_seed(0)
    L = 3
    net = TriplanarCNN(1, 2, num_conv=L, features=4, fc_features=8, dropout=0.0).double().eval()
    x = torch.randn(1, 1, 15, 15, 15, dtype=torch.double, requires_grad=True)
    c = 7
    net(x)[0, 1, c, c, c].backward()
    support = x.grad[0, 0].abs() > 0
    expected = torch.zeros_like(support)
    r = slice(c - L, c + L + 1)
    expected[c, r, r] = True                  # axial plane (axis1, axis2)
    expected[r, c, r] = True                  # coronal plane (axis0, axis2)
    expected[r, r, c] = True                  # sagittal plane (axis0, axis1)
    assert torch.equal(support, expected)


def test_whole_volume_equals_patch_inference_in_the_interior():
    torch.manual_seed(1)
    L = 4
    net = TriplanarCNN(1, 3, num_conv=L, features=8, fc_features=16).eval()
    for m in net.modules():                                         # non-trivial running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    vol = torch.randn(1, 1, 30, 34, 38)
    with torch.no_grad():
        whole = net(vol)
        lo, hi = (6, 9, 11), (26, 29, 35)
        patch = net(vol[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    interior_patch = patch[:, :, L:-L, L:-L, L:-L]
    interior_whole = whole[:, :, lo[0] + L:hi[0] - L, lo[1] + L:hi[1] - L, lo[2] + L:hi[2] - L]
    torch.testing.assert_close(interior_patch, interior_whole, rtol=1e-4, atol=1e-5)
    # and at the border they differ (zero padding of the patch), so the test has teeth
    assert not torch.allclose(patch[:, :, 0], whole[:, :, lo[0], lo[1]:hi[1], lo[2]:hi[2]], atol=1e-3)


def test_two_dimensional_variant_and_bad_input():
    net = TriplanarCNN(2, 4, num_conv=2, features=4, fc_features=8, ndim=2).eval()
    with torch.no_grad():
        assert net(torch.randn(3, 2, 11, 13)).shape == (3, 4, 11, 13)
    with pytest.raises(ValueError, match="expects a 4D tensor"):
        net(torch.randn(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        TriplanarCNN(1, 2, ndim=1)


def test_tiny_triplanar_overfits_a_tiny_phantom():
    """A 2-class phantom (bright sphere) is learnt to Dice > 0.9 with Adam and cross-entropy (§3.2)."""
    torch.manual_seed(0)
    with one_thread():                        # tiny tensors: one thread is fastest (and kind to a shared CPU)
        _overfit()


def _overfit():
    g = torch.stack(torch.meshgrid(*[torch.arange(8.0)] * 3, indexing="ij"))
    target = (((g - 3.5) ** 2).sum(0) < 6).long()[None]
    x = (target.float() + 0.1 * torch.randn(target.shape))[:, None]
    net = TriplanarCNN(1, 2, num_conv=2, features=8, fc_features=16, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(x).argmax(1)
    assert dice_per_label(pred[0].numpy(), target[0].numpy(), [1])[1] > 0.9


# ------------------------------------------------------------------ trainers: network, loss, gradients

def _trainer(cls, tmp_path, monkeypatch):
    """A trainer on a tiny in-memory plan (no dataset on disk needed for network/loss)."""
    plans = {"continue_training": False, "dataset_name": "Dataset999_T", "plans_name": "nnUNetPlans", "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [16, 16, 16], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "x",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
             "configurations": {"3d_tiny": {
                 "data_identifier": "d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
                 "patch_size": [16, 16, 16], "median_image_size_in_voxels": [16, 16, 16], "spacing": [1, 1, 1],
                 "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                 "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
                 "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities":
                 "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {}, "batch_dice": False,
                 "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                  "arch_kwargs": {"n_stages": 2, "features_per_stage": [4, 8],
                                                  "conv_op": "torch.nn.modules.conv.Conv3d",
                                                  "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                                                  "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1],
                                                  "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                                  "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                                                  "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                                                  "nonlin_kwargs": {"inplace": True}},
                                  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    dataset_json = {**_dataset_json(), "channel_names": {"0": "T1"}, "file_ending": ".nii.gz", "numTraining": 12}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, str(tmp_path / var))
    return cls(plans, "3d_tiny", 0, dataset_json, torch.device("cpu"))


@pytest.mark.parametrize("name,dice_weight,triplanar", [
    ("nnUNetTrainerOMTLTriplanar_Tiny", 0.0, True), ("nnUNetTrainerOMTLTriplanarDiceCE_Tiny", 1.0, True),
    ("nnUNetTrainerOMTLMultiTaskUNet_Tiny", 0.0, False), ("nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny", 1.0, False)])
def test_trainer_network_and_loss(name, dice_weight, triplanar, tmp_path, monkeypatch):
    import organmtl.nnunet_trainers as trainers
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    assert name in trainers.__all__
    tr = _trainer(getattr(trainers, name), tmp_path, monkeypatch)
    net = tr.build_network_architecture(tr.plans_manager, tr.configuration_manager, 1,
                                        tr.label_manager.num_segmentation_heads, tr.enable_deep_supervision)
    assert isinstance(net, TriplanarCNN) == triplanar
    if triplanar:
        # the size follows the plan: first stage 4 of 32 features -> widths x 1/8; patch 16 -> 7 layers
        assert (net.num_conv, net.features, net.fc[0].out_channels, tr.enable_deep_supervision) == (7, 4, 24, False)
        tr.network = net
        opt, _ = tr.configure_optimizers()
        assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3
    loss = tr._build_loss()
    inner = loss.loss if isinstance(loss, DeepSupervisionWrapper) else loss
    assert isinstance(inner, DC_and_CE_loss) and inner.weight_dice == dice_weight
    if triplanar:
        torch.manual_seed(0)
        logits = torch.randn(2, 6, 4, 4, 4, requires_grad=True)
        target = torch.randint(0, 6, (2, 1, 4, 4, 4))
        value = loss(logits, target)
        ce = torch.nn.functional.cross_entropy(logits, target[:, 0])
        if dice_weight == 0:
            torch.testing.assert_close(value, ce)                # exactly categorical cross-entropy
        else:
            assert value.item() != pytest.approx(ce.item())


def test_triplanar_size_follows_the_plan():
    from types import SimpleNamespace

    from organmtl.nnunet_trainers.multitask.trainers import nnUNetTrainerOMTLTriplanar, nnUNetTrainerOMTLTriplanar_Tiny

    def cm(features, patch):
        return SimpleNamespace(network_arch_init_kwargs={"features_per_stage": features}, patch_size=patch,
                               network_arch_class_name="PlainConvUNet")

    fullres = cm([32, 64, 128, 256, 320], [128, 128, 128])            # nnU-Net's default width: the paper
    assert nnUNetTrainerOMTLTriplanar.triplanar_size(fullres) == (25, 32, 192)
    tiny = cm([8, 16, 32], [32, 32, 32])                               # organmtl plan-tiny's 3d_tiny
    assert nnUNetTrainerOMTLTriplanar_Tiny.triplanar_size(tiny) == (15, 8, 48)
    assert nnUNetTrainerOMTLTriplanar.triplanar_size(tiny) == (15, 8, 48)    # _Tiny changes no size
    assert nnUNetTrainerOMTLTriplanar.triplanar_size(cm([32, 64], [12, 160, 160])) == (5, 32, 192)


def test_gradients_reach_every_triplanar_parameter_through_the_shared_stack():
    """One shared stack serves the three planes: its weights get gradients from each plane."""
    torch.manual_seed(0)
    net = TriplanarCNN(1, 3, num_conv=2, features=4, fc_features=8, dropout=0.0)
    x = torch.randn(1, 1, 6, 7, 8)
    grads = []
    for plane in ("axial", "coronal", "sagittal"):
        net.zero_grad()
        net._plane(x, plane).sum().backward()
        grads.append(net.stack[0].weight.grad.clone())
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.fc.parameters())
    assert all(g.abs().sum() > 0 for g in grads) and not torch.allclose(grads[0], grads[1])
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), torch.zeros(1, 6, 7, 8, dtype=torch.long)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


# ------------------------------------------------------------------ the task table

def test_task_table_from_merged_dataset_json():
    t = TaskTable.from_dataset_json(_dataset_json())
    assert t.names == ["brain_mr", "breast_mr", "cardiac_cta"]
    assert t.task_of("breast_mr_2") == "breast_mr" and t.allowed_labels("brain_mr") == (0, 1, 2, 3)
    assert t.alien_labels("breast_mr") == (1, 2, 3, 5)
    assert t.task_of_prediction("cardiac_cta_unseen_case") == "cardiac_cta"
    with pytest.raises(KeyError, match="belongs to no task"):
        t.task_of("liver_0")
    single = TaskTable.from_dataset_json({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}})
    assert single.names == [SINGLE_TASK] and single.tasks[SINGLE_TASK].classes == (0, 1, 2)
    bad = _dataset_json()
    bad["organmtl_tasks"]["breast_mr"]["label_values"] = [9]
    with pytest.raises(ValueError, match=r"owns label value\(s\) \[9\]"):
        TaskTable.from_dataset_json(bad)


# ------------------------------------------------------------------ balanced sampling (§3.2)

class InMemoryDataset(nnUNetBaseDataset):
    """nnU-Net dataset interface over arrays, with class locations sampled by nnU-Net's preprocessor."""

    def __init__(self, cases: dict):
        self.cases = cases
        self.properties = {k: {"class_locations": DefaultPreprocessor._sample_foreground_locations(
            seg, [1, 2, 3, 4, 5], seed=1)} for k, (_, seg) in cases.items()}
        super().__init__("memory", list(cases))

    def load_case(self, identifier):
        data, seg = self.cases[identifier]
        return data, seg, None, self.properties[identifier]

    @staticmethod
    def save_case(*a, **k):
        raise NotImplementedError

    @staticmethod
    def get_identifiers(folder):
        raise NotImplementedError


def _phantom_cases():
    rng = np.random.default_rng(0)
    cases = {}
    own = {"brain_mr": [1, 2, 3], "breast_mr": [4], "cardiac_cta": [5]}
    for task, values in own.items():
        for i in range(4):
            seg = np.zeros((1, 20, 24, 24), np.int16)
            for k, v in enumerate(values):                  # small structures: balance must come from sampling
                z, y, x = rng.integers(3, 17), rng.integers(3, 21), rng.integers(3, 21)
                if task == "brain_mr" and v == 3 and i == 0:
                    continue                                # one brain case lacks WM
                seg[0, z - 1:z + 2, y - 1:y + 2, x - 1:x + 2 + k] = v
            cases[f"{task}_{i}"] = (rng.normal(size=seg.shape).astype(np.float32), seg)
    return cases


@pytest.mark.parametrize("batch_size,world_size", [(3, 1), (2, 1), (2, 3)])
def test_batches_are_balanced_over_tasks_and_classes(batch_size, world_size):
    np.random.seed(0)
    table = TaskTable.from_dataset_json(_dataset_json())
    data = InMemoryDataset(_phantom_cases())
    lm = LabelManager(LABELS, None)
    patch = (8, 10, 10)
    loaders = [TaskBalancedDataLoader(data, batch_size, patch, patch, lm, table, rank=r, world_size=world_size)
               for r in range(world_size)]
    # nnU-Net's whole batch generation: every patch holds a voxel of the class drawn for its slot
    for _ in range(20):
        for dl in loaders:
            batch = dl.generate_train_batch()
            tasks = [table.task_of(k) for k in batch["keys"]]
            assert tasks == dl.slot_tasks_of_last_batch
            if batch_size % 3 == 0:
                assert sorted(tasks) == sorted(table.names * (batch_size // 3))   # every batch balanced
            for cls, seg in zip(dl._slot_classes, batch["target"].numpy()):
                if cls:
                    assert (seg == cls).any()             # nnU-Net's foreground crop around a voxel of the class
    # the draws over many batches (statistics only: no cropping needed)
    n_batches = 2000
    task_counts = {t: 0 for t in table.names}
    class_counts = {t: {c: 0 for c in table.tasks[t].classes} for t in table.names}
    for _ in range(n_batches):
        for dl in loaders:
            keys = dl.get_indices()
            for key, cls in zip(keys, dl._slot_classes):
                task = table.task_of(key)
                task_counts[task] += 1
                class_counts[task][cls] += 1
                assert key in dl.cases_by_task_class[task][cls]       # a case that has the class
    counts = list(task_counts.values())
    assert max(counts) - min(counts) <= 1, task_counts           # round robin: exact shares
    for t, counts in class_counts.items():
        n = sum(counts.values())
        expected = n / len(counts)
        for c, k in counts.items():                        # uniform over the task's classes (binomial 5 sigma)
            assert abs(k - expected) < 5 * np.sqrt(expected), (t, counts)


def test_ddp_ranks_interleave_into_a_balanced_global_batch():
    table = TaskTable.from_dataset_json(_dataset_json())
    data = InMemoryDataset(_phantom_cases())
    lm = LabelManager(LABELS, None)
    loaders = [TaskBalancedDataLoader(data, 1, (8, 10, 10), (8, 10, 10), lm, table, rank=r, world_size=3)
               for r in range(3)]
    for _ in range(4):
        slots = [dl.slot_tasks() for dl in loaders]
        assert sorted(itertools.chain(*slots)) == sorted(table.names)
        for dl in loaders:
            dl.get_indices()


def test_sampler_only_draws_tasks_of_its_split_and_names_bad_cases():
    table = TaskTable.from_dataset_json(_dataset_json())
    cases = {k: v for k, v in _phantom_cases().items() if not k.startswith("cardiac")}
    dl = TaskBalancedDataLoader(InMemoryDataset(cases), 2, (8, 10, 10), (8, 10, 10), LabelManager(LABELS, None), table)
    assert dl.active_tasks == ["brain_mr", "breast_mr"]
    assert dl.cases_by_task_class["brain_mr"][3] == ["brain_mr_1", "brain_mr_2", "brain_mr_3"]   # case 0 has no WM
    stray = {"liver_0": next(iter(cases.values()))}
    with pytest.raises(KeyError, match="liver_0"):
        TaskBalancedDataLoader(InMemoryDataset(stray), 2, (8, 10, 10), (8, 10, 10), LabelManager(LABELS, None), table)


# ------------------------------------------------------------------ evaluation (§4)

def test_masking_confusion_and_thresholded_labels():
    heads = head_label_values({**LABELS, "ignore": 6})
    assert heads.tolist() == [0, 1, 2, 3, 4, 5]
    probs = np.zeros((6, 2, 2, 2), np.float32)
    probs[0] = 0.2
    probs[4] = 0.5                     # breast muscle wins the argmax everywhere ...
    probs[5, 0] = 0.3                  # ... the vessel class is second in the first slice
    plain = argmax_labels(probs, heads)
    assert (plain == 4).all()
    assert confusion_rate(plain, (1, 2, 3, 4)) == 1.0          # a cardiac case: every voxel alien
    masked = task_masked_labels(probs, heads, (0, 5))
    assert (masked[0] == 5).all() and (masked[1] == 0).all()
    assert confusion_rate(masked, (1, 2, 3, 4)) == 0.0
    assert (thresholded_labels(probs, heads, 5, 0.25)[0] == 5).all()
    assert (thresholded_labels(probs, heads, 5, 0.35) == 0).all()


def test_dice_optimal_threshold_hand_computed():
    # p:  0.95 0.85 0.75 0.65 0.55 0.45, reference 1 1 0 1 0 0  (3 positives)
    # p>=0.85: TP2 FP0 FN1 -> 0.8 ; p>=0.65: TP3 FP1 -> 6/7 = 0.857 ; p>=0.95: 0.5 ; p>=0.55: 6/8
    p = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.45])
    ref = np.array([1, 1, 0, 1, 0, 0], bool)
    acc = DiceOptimalThreshold(bins=100)
    acc.add(p[:3], ref[:3])
    acc.add(p[3:], ref[3:])                 # accumulated over cases
    t, d = acc.best()
    assert d == pytest.approx(6 / 7)
    assert 0.55 < t <= 0.65
    thresholds, precision, recall, dsc = acc.curve()
    i = int(np.searchsorted(thresholds, 0.85))
    assert precision[i] == 1.0 and recall[i] == pytest.approx(2 / 3) and dsc[i] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="differs"):
        acc.add(p, ref[:2])


def test_experiments_are_the_non_empty_task_subsets():
    subsets = task_subsets(["brain", "breast", "cardiac"])
    assert len(subsets) == 7
    assert subsets[:3] == [("brain",), ("breast",), ("cardiac",)] and subsets[-1] == ("brain", "breast", "cardiac")
    exps = plan_experiments(TaskTable.from_dataset_json(_dataset_json(cases_per_task=5)),
                            ["breast_mr", "cardiac_cta"], n_test=2, n_val=1)
    assert [e.tasks for e in exps] == [("breast_mr",), ("cardiac_cta",), ("breast_mr", "cardiac_cta")]
    e = exps[2]
    assert e.fold == 2 and e.train == ["breast_mr_0", "breast_mr_1", "cardiac_cta_0", "cardiac_cta_1"]
    assert e.val == ["breast_mr_2", "cardiac_cta_2"] and e.test == ["breast_mr_3", "breast_mr_4",
                                                                     "cardiac_cta_3", "cardiac_cta_4"]
    assert not set(e.test) & set(e.train + e.val)


# ------------------------------------------------------------------ mixed precision (docs/scaling.md)

MULTITASK_TRAINERS = ("nnUNetTrainerOMTLTriplanar_Tiny", "nnUNetTrainerOMTLTriplanarDiceCE_Tiny",
                      "nnUNetTrainerOMTLMultiTaskUNet_Tiny", "nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny")


@pytest.mark.parametrize("name", MULTITASK_TRAINERS)
def test_fp32_cpu_step_is_nnunets_step_bit_for_bit(name, tmp_path, one_torch_thread):
    """The shared AMP step (amp.AMPTrainStepMixin) reproduces nnU-Net's own train_step in fp32."""
    import organmtl.nnunet_trainers as trainers
    from tests.trainer_steps import run_steps, stock_step

    cls = getattr(trainers, name)
    losses, params = run_steps(cls, tmp_path / "new", "tasks", lambda tr, b: tr.train_step(b))
    ref_losses, ref_params = run_steps(cls, tmp_path / "ref", "tasks", stock_step)
    assert losses == ref_losses and all(np.isfinite(losses))
    assert params.keys() == ref_params.keys() and all(torch.equal(params[k], ref_params[k]) for k in params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["nnUNetTrainerOMTLTriplanarDiceCE_Tiny", "nnUNetTrainerOMTLMultiTaskUNet_Tiny"])
def test_cpu_autocast_steps_and_confident_prediction_are_finite(name, dtype, tmp_path, one_torch_thread):
    import organmtl.nnunet_trainers as trainers
    from tests.trainer_steps import build_trainer, logit_margin, make_batch, make_confident, predict_logits

    torch.manual_seed(0)
    trainer = build_trainer(getattr(trainers, name), tmp_path, "tasks")
    trainer.cpu_autocast_dtype = dtype                   # test-only: autocast on the CPU as on CUDA
    seen = set()
    conv = next(m for m in trainer.network.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    conv.register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    for i, labels in enumerate([(1,), (2,), (1, 2)]):   # batches of one task, of the other, of both
        out = trainer.train_step(make_batch(trainer, i, labels=labels))
        assert np.isfinite(out["loss"]), (name, i, out)
    assert seen == {dtype}, f"{name}: the step did not run under autocast ({seen})"
    image = make_batch(trainer, 7, n=1)["data"][0]
    reference = make_confident(trainer, image)
    low = predict_logits(trainer, image, dtype)
    assert torch.isfinite(low).all()
    assert float(logit_margin(reference, False).median()) >= 20
    assert (low.argmax(0) == reference.argmax(0)).float().mean() >= 0.99
