"""The storage-counting memory check (organmtl.memory) against hand counts on a small conv net."""
from __future__ import annotations

import torch
from torch import nn

from organmtl.memory import (GPU_OVERHEAD_GIB, GIB, StepMemory, StorageCounter, measure_network_step,
                             model_bytes)

F32 = 4


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 3, padding=1))


def test_forward_backward_bytes_match_a_hand_count():
    """x (1,1,8,8,8) -> conv(1->4) y1 -> relu y2 -> conv(4->2) y3, loss = y3.sum().

    After the forward: y1 is released (ReLU saves its result y2, conv2 saves its input y2), live are
    y2 (4 x 512 floats) and y3 (2 x 512). Peak during backward, at ReLU's backward: y2, y3, loss, the
    ones seed, conv2's input gradient (4 x 512) and weight/bias gradients (2*4*27 + 2), plus ReLU's
    input gradient (4 x 512). After backward: y3, loss, seed and the four parameter gradients."""
    net, x = small_net(), torch.randn(1, 1, 8, 8, 8)
    counter = StorageCounter()
    with counter:
        y3 = net(x)
        after_forward = counter.current
        loss = y3.sum()
        loss.backward()
    vox = 8 ** 3
    assert after_forward == (4 * vox + 2 * vox) * F32
    grads2, grads1 = 2 * 4 * 27 + 2, 4 * 27 + 4
    peak = (4 * vox + 2 * vox + 1 + 1 + 4 * vox + grads2 + 4 * vox) * F32
    assert counter.peak == peak
    assert counter.current == (2 * vox + 1 + 1 + grads2 + grads1) * F32


def test_views_and_inplace_results_are_counted_once():
    counter = StorageCounter()
    with counter:
        a = torch.zeros(1000)
        b = a.view(10, 100)
        a.add_(1.0)
        c = b[2:5]
    assert counter.current == 1000 * F32
    del a, b, c
    with counter:
        torch.ones(1)          # the next operator sweeps the released storage
    assert counter.current == F32


def test_network_step_counts_gradients_and_momentum_and_restores_state():
    net = small_net()
    bn = nn.Sequential(net, nn.BatchNorm3d(2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    m = measure_network_step(bn, (1, 1, 8, 8, 8))
    params = sum(p.numel() for p in bn.parameters()) * F32
    # momentum SGD: after the step gradients and momentum buffers (each one copy of the parameters)
    assert m.step_peak_bytes >= 2 * params + 2 * 4 * 512 * F32
    assert m.resident_bytes == model_bytes(bn) + 512 * F32
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in bn.parameters())


def test_activations_scale_with_batch_and_amp_halves_them():
    net = nn.Sequential(*[nn.Sequential(nn.Conv3d(8 if i else 1, 8, 3, padding=1), nn.InstanceNorm3d(8, affine=True),
                                        nn.LeakyReLU(inplace=True)) for i in range(4)])
    one = measure_network_step(net, (1, 1, 16, 32, 32))
    two = measure_network_step(net, (2, 1, 16, 32, 32))
    per_sample = two.step_peak_bytes - one.step_peak_bytes
    assert per_sample > 0.8 * (one.step_peak_bytes - 2 * model_bytes(net))
    fp16 = measure_network_step(net, (2, 1, 16, 32, 32), amp="fp16")
    bf16 = measure_network_step(net, (2, 1, 16, 32, 32), amp="bf16")
    for m in (fp16, bf16):
        assert 0.35 * two.step_peak_bytes < m.step_peak_bytes < 0.85 * two.step_peak_bytes, m


def test_fits_uses_the_overhead_allowance():
    m = StepMemory(resident_bytes=GIB, step_peak_bytes=int(20 * GIB), seconds=0.0)
    assert m.predicted_gpu_gib() == 21 + GPU_OVERHEAD_GIB
    assert m.fits(24.0) and not m.fits(22.0)


def test_gpu_memory_rule_lowers_batch_then_patch_and_respects_the_minimum():
    """The issue's triplanar numbers: ~36 KB per voxel at 2 x 128^3 is ~150 GB; the rule keeps
    batch 2 and shrinks the longest axis (mm) by pooling steps until the prediction fits 24 GiB."""
    from organmtl.nnunet_trainers.gpu_memory import MemoryModel, choose, pooling_steps, probe_patch

    model = MemoryModel(fixed_bytes=0.5 * GIB, per_voxel_bytes=36 * 1024, probe_patch=(16, 32, 32), amp="none")
    assert model.predicted_gib((128, 128, 128), 2) > 140
    patch, batch = choose(model, (128, 128, 128), 4, (1.0, 1.0, 1.0), (32, 32, 32), (64, 64, 64), 24.0)
    assert batch == 2 and all(p % 32 == 0 and p >= 64 for p in patch)
    assert model.predicted_gib(patch, batch) <= 24.0
    # one step larger on any axis would not fit
    assert all(model.predicted_gib([p + 32 * (i == a) for i, p in enumerate(patch)], 2) > 24.0 for a in range(3))
    fits = choose(model, (32, 32, 32), 2, (1.0, 1.0, 1.0), (32, 32, 32), (32, 32, 32), 24.0)
    assert fits == ((32, 32, 32), 2)
    import pytest
    with pytest.raises(ValueError, match="ORGANMTL_GPU_MEMORY_GB"):
        choose(model, (128, 128, 128), 2, (1.0, 1.0, 1.0), (32, 32, 32), (128, 128, 128), 24.0)

    class CM:
        patch_size = (32, 80, 80)
        network_arch_init_kwargs = {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}
    assert pooling_steps(CM) == (8, 16, 16)
    assert probe_patch((32, 80, 80), (8, 16, 16)) == (24, 48, 48)


def test_gpu_memory_target_defaults_to_the_cuda_devices_own_memory(monkeypatch):
    """No fixed 24 GiB: the card's total memory when CUDA is available (the device asked for, else the current
    one), 24 GiB only without CUDA; ORGANMTL_GPU_MEMORY_GB overrides (GPUMemoryOptions)."""
    import organmtl.memory as M
    from organmtl.nnunet_trainers.gpu_memory import GPUMemoryOptions
    from organmtl.nnunet_trainers.settings import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.default_gpu_gib(torch.device("cuda", 0))[0] == M.FALLBACK_GPU_GIB == 24.0

    class H100:
        name, total_memory = "NVIDIA H100 80GB HBM3", 81559 * 1024 ** 2

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: asked.append(i) or H100)
    gib, where = M.default_gpu_gib(torch.device("cuda", 1))
    assert gib == 79.65 and asked == [1] and "H100" in where          # 81559 MiB / 1024
    assert M.default_gpu_gib("cpu")[0] == 79.65 and asked[-1] == 3       # CPU trainer: the current CUDA device
    assert M.default_gpu_gib()[0] == 79.65 and asked[-1] == 3

    monkeypatch.delenv("ORGANMTL_GPU_MEMORY_GB", raising=False)
    assert resolve(GPUMemoryOptions).options.gpu_memory_gib is None    # -> default_gpu_gib at plan time
    monkeypatch.setenv("ORGANMTL_GPU_MEMORY_GB", "40")
    assert resolve(GPUMemoryOptions).options.gpu_memory_gib == 40.0


def test_a_full_trainer_plans_for_a_gpu_only_when_there_is_one_or_a_target_is_given(tmp_path, monkeypatch):
    """nnunet_trainers/gpu_memory.py in a real (full) trainer's ``initialize`` on the CPU: no CUDA and no
    ``ORGANMTL_GPU_MEMORY_GB`` -> no probes, nnU-Net's patch and batch, no record; a target -> the probes'
    record stored in the plans with the patch kept when it fits; a target nothing fits -> one clear error."""
    from organmtl.nnunet_trainers import nnUNetTrainerOMTLLandmarkLateFusion as Trainer
    from organmtl.nnunet_trainers.gpu_memory import PLANS_KEY
    from tests.helpers import one_thread
    from tests.trainer_steps import PATCH, build_trainer

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, "unset")                     # build_trainer sets them; monkeypatch restores
    monkeypatch.delenv("ORGANMTL_GPU_MEMORY_GB", raising=False)
    with one_thread():
        tr = build_trainer(Trainer, tmp_path / "none", "landmarks")
        cfg = tr.plans_manager.plans["configurations"]["3d_steps"]
        assert PLANS_KEY not in cfg and list(tr.configuration_manager.patch_size) == list(PATCH)
        assert tr.batch_size == 2

        monkeypatch.setenv("ORGANMTL_GPU_MEMORY_GB", "24")
        tr = build_trainer(Trainer, tmp_path / "24", "landmarks")
        record = tr.plans_manager.plans["configurations"]["3d_steps"][PLANS_KEY]
        assert record["options"]["gpu_memory_gib"] == 24.0 and record["patch_size"] == list(PATCH)
        assert record["batch_size"] == 2 and GPU_OVERHEAD_GIB < record["predicted_gib"] < 24

        monkeypatch.setenv("ORGANMTL_GPU_MEMORY_GB", "1")       # below the 1.5 GiB allowance alone
        try:
            build_trainer(Trainer, tmp_path / "1", "landmarks")
        except ValueError as e:
            assert "fits 1 GiB" in str(e) and "ORGANMTL_GPU_MEMORY_GB" in str(e)
        else:
            raise AssertionError("a 1 GiB target was accepted")
