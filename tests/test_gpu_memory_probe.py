"""The GPU memory plan's probes (nnunet_trainers/gpu_memory.py) when the optimizer step, not the
activations, sets the whole-step peak at the small probe patch: nnU-Net's U-Net at a PDDCA-sized plan
(31 M parameters: gradients + SGD momentum + temporaries ~0.35 GiB against ~0.13 GiB of activations per
sample at 16 x 64 x 64) gave batch 1 and batch 2 the same peak, so the rule saw no activations at all
and predicted 2.0 GiB for a step that needs about 6 GiB with AMP."""
import pytest
import torch
from torch import nn

from organmtl.memory import GPU_OVERHEAD_GIB, measure_network_step
from organmtl.nnunet_trainers.gpu_memory import probe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class HeavyParameters(nn.Module):
    """Three small 3-D convolutions (the activations) and 4 M parameters used once (the optimizer)."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.ELU(), nn.Conv3d(16, 16, 3, padding=1), nn.ELU(),
                                   nn.Conv3d(16, 2, 1))
        self.big = nn.Parameter(torch.zeros(4_000_000))

    def forward(self, x):
        return self.convs(x) + self.big[:1].sum()


def _sgd(params):
    """nnU-Net's optimizer: its Nesterov update allocates temporaries of the parameters' size."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.99, nesterov=True)


def test_probe_predicts_the_activations_a_larger_patch_needs():
    torch.manual_seed(0)
    net = HeavyParameters()
    small, large = (8, 16, 16), (32, 64, 64)
    model = probe(net, 1, small, _sgd(net.parameters()), "none")
    # at the probe patch the whole-step peak is the optimizer step's, the same for batch 1 and 2
    one, two = (measure_network_step(net, (b, 1, *small), _sgd) for b in (1, 2))
    assert one.peak_bytes - one.resident_bytes == two.peak_bytes - two.resident_bytes
    assert model.floor_bytes > model.fixed_bytes + 2 * model.per_voxel_bytes * 8 * 16 * 16
    assert model.per_voxel_bytes > 16 * 4                   # at least one saved 16-channel fp32 activation
    actual = measure_network_step(net, (2, 1, *large), _sgd)
    assert actual.peak_bytes > 1.5 * model.floor_bytes      # activations dominate at the large patch
    assert model.predicted_gib(large, 2) - GPU_OVERHEAD_GIB == pytest.approx(actual.peak_gib, rel=0.1)
    # below the optimizer step's peak the prediction never drops under it
    assert model.predicted_gib(small, 1) - GPU_OVERHEAD_GIB == pytest.approx(model.floor_bytes / 1024 ** 3)


def test_probe_measures_a_cpu_copy_of_a_network_on_another_device():
    """A CUDA trainer's network lives on the GPU; the probes count CPU storage, so they step a CPU copy made
    by mapping every parameter and buffer to a CPU clone (forced here: this machine has no GPU)."""
    from organmtl.nnunet_trainers.gpu_memory import cpu_network

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 2, 1))
    assert cpu_network(net) is net
    copy = cpu_network(net, force=True)
    originals = {t.data_ptr() for t in (*net.parameters(), *net.buffers())}
    assert copy is not net and not originals & {t.data_ptr() for t in (*copy.parameters(), *copy.buffers())}
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), copy.state_dict().values()))
    assert all(p.requires_grad for p in copy.parameters())
    patch = (4, 8, 8)
    a = probe(net, 1, patch, _sgd(net.parameters()), "none")
    b = probe(copy, 1, patch, _sgd(copy.parameters()), "none")
    assert (a.fixed_bytes, a.per_voxel_bytes, a.floor_bytes) == (b.fixed_bytes, b.per_voxel_bytes, b.floor_bytes)
