"""A leftover ORGANMTL_EPOCHS (or ..._ITERS_PER_EPOCH / _VAL_ITERS) shortens a full trainer only with a
line in its training log; the _Tiny trainers' schedule is theirs to shorten, without that line."""
import pytest

from organmtl.nnunet_trainers.budget import CPUBudgetMixin, apply_schedule
from organmtl.nnunet_trainers.gpu_memory import EnvScheduleMixin


class _ScheduleOf:
    """nnUNetTrainer's schedule attributes (1000 x 250 x 50, a checkpoint every 50) and its log method."""

    def __init__(self):
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1000, 250, 50
        self.save_every = 50
        self.log = []

    def print_to_log_file(self, *args, **kwargs):
        self.log.append(" ".join(map(str, args)))


class FullTrainer(EnvScheduleMixin, _ScheduleOf):
    __init__ = _ScheduleOf.__init__          # the schedule only: the mixin's __init__ needs nnU-Net's


class TinyTrainer(CPUBudgetMixin, _ScheduleOf):
    __init__ = _ScheduleOf.__init__


@pytest.fixture
def no_schedule_env(monkeypatch):
    for var in ("ORGANMTL_EPOCHS", "ORGANMTL_ITERS_PER_EPOCH", "ORGANMTL_VAL_ITERS"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_full_trainer_logs_a_shortened_schedule(no_schedule_env):
    full = FullTrainer()
    assert apply_schedule(full) == [] and full.log == [] and full.num_epochs == 1000       # unset: nnU-Net's
    no_schedule_env.setenv("ORGANMTL_EPOCHS", "3")
    no_schedule_env.setenv("ORGANMTL_VAL_ITERS", "50")                                    # same value: no line
    full = FullTrainer()
    apply_schedule(full)
    assert (full.num_epochs, full.num_iterations_per_epoch, full.save_every) == (3, 250, 3)
    assert full.log == ["WARNING: ORGANMTL_EPOCHS=3 is set: FullTrainer's num_epochs is 3 instead of 1000 "
                        "(unset ORGANMTL_EPOCHS for the trainer's own schedule)"]


def test_tiny_trainer_schedule_is_not_flagged(no_schedule_env):
    no_schedule_env.setenv("ORGANMTL_EPOCHS", "3")
    tiny = TinyTrainer()
    assert apply_schedule(tiny, {"num_epochs": 2, "num_iterations_per_epoch": 10}) == []
    assert (tiny.num_epochs, tiny.num_iterations_per_epoch, tiny.log) == (3, 10, [])
