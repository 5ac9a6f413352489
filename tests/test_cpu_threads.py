"""ORGANMTL_CPU_THREADS: every organmtl trainer (full and _Tiny) sets torch's CPU threads from it when set."""
import torch

from organmtl.nnunet_trainers.budget import THREADS_VARIABLE, CPUBudgetMixin, cpu_threads_from_env
from organmtl.nnunet_trainers.gpu_memory import EnvScheduleMixin


class _StockLike:
    """The attributes of nnUNetTrainer that the mixins touch, with nnU-Net's defaults."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.save_every = 50
        self.threads_at_init = torch.get_num_threads()


class _Full(EnvScheduleMixin, _StockLike):
    pass


class _Tiny(CPUBudgetMixin, _Full):
    pass


def _build(cls, device):
    return cls({}, "3d_fullres", 0, {}, device)


def test_full_and_tiny_trainers_take_the_thread_count(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)                  # what nnUNetv2_train -device cpu does on a 2-core machine
        monkeypatch.setenv(THREADS_VARIABLE, "1")
        for cls in (_Full, _Tiny):
            torch.set_num_threads(2)
            trainer = _build(cls, torch.device("cpu"))
            assert trainer.threads_at_init == 1 and torch.get_num_threads() == 1, cls
        assert _build(_Full, torch.device("cpu")).num_epochs == 1000     # the full schedule is untouched
    finally:
        torch.set_num_threads(before)


def test_unset_or_cuda_leaves_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv(THREADS_VARIABLE, raising=False)
        assert cpu_threads_from_env(torch.device("cpu")) is None and torch.get_num_threads() == 2
        monkeypatch.setenv(THREADS_VARIABLE, "1")
        assert cpu_threads_from_env(torch.device("cuda")) == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
