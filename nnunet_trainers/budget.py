"""Short training schedules for CPU runs (tests, the demo) as an nnU-Net trainer mixin.

Stock nnU-Net trains 1000 epochs x 250 iterations; on a CPU that is days. The mixin lets any
organmtl trainer run a handful of epochs, read from environment variables so the stock
``nnUNetv2_train`` command line stays unchanged:

- ``ORGANMTL_EPOCHS`` (default: the class' ``budget_epochs``)
- ``ORGANMTL_ITERS_PER_EPOCH`` (default: ``budget_iters``)
- ``ORGANMTL_VAL_ITERS`` (default: ``budget_val_iters``)
- ``ORGANMTL_SEED`` (optional: seeds torch / numpy / random before the network is built; unset: no seeding)

Inference of these trainers skips mirroring test-time augmentation (8x cheaper on a CPU), and they make
no GPU memory plan (the full trainers' probes, nnunet_trainers/gpu_memory.py). That is all ``_Tiny``
changes in every family; network sizes follow the plan configuration (docs/trainers.md).

A full (non-``_Tiny``) trainer whose schedule one of them changes writes a ``WARNING`` line saying so into
its training log (a leftover variable would otherwise cut a real training short); ``organmtl doctor`` warns
about them too.

The budget is a run length, not a model setting, so it is not stored with the model: ``--c`` from a
shell with a larger ``ORGANMTL_EPOCHS`` trains on, as stock nnU-Net does with ``num_epochs``
(FocusNet stores the phase schedule it derived from the budget, see docs/focusnetv2.md).
"""
from __future__ import annotations

import torch

from organmtl.nnunet_trainers.settings import env_int


#: the schedule variables and the nnUNetTrainer attributes they set
SCHEDULE_VARIABLES = (("ORGANMTL_EPOCHS", "num_epochs"), ("ORGANMTL_ITERS_PER_EPOCH", "num_iterations_per_epoch"),
                      ("ORGANMTL_VAL_ITERS", "num_val_iterations_per_epoch"))


def apply_schedule(trainer, defaults: dict[str, int] | None = None) -> list[str]:
    """Set the trainer's epochs / iterations from :data:`SCHEDULE_VARIABLES` where set, else from
    ``defaults`` (attribute -> value), else leave nnU-Net's value; checkpoints at most every epoch count.

    A full (non-``_Tiny``) trainer whose schedule a variable changes says so in its log (and on the console),
    one line per variable, since a leftover ``ORGANMTL_EPOCHS`` would otherwise silently cut a real training
    short; returns those lines."""
    defaults = defaults or {}
    notices = []
    for name, attr in SCHEDULE_VARIABLES:
        own = defaults.get(attr, getattr(trainer, attr))
        value = env_int(name, own, minimum=1)
        if value != own and not isinstance(trainer, CPUBudgetMixin):
            notices.append(f"WARNING: {name}={value} is set: {type(trainer).__name__}'s {attr} is {value} instead "
                           f"of {own} (unset {name} for the trainer's own schedule)")
        setattr(trainer, attr, value)
    trainer.save_every = max(1, min(trainer.save_every, trainer.num_epochs))
    log = getattr(trainer, "print_to_log_file", print)
    for line in notices:
        log(line)
    return notices


#: seeds torch, numpy and random when set (benchmarks/convergence.py's repeats); unset: nnU-Net's own
#: behaviour (no seeding). A run property like the budget, not a model setting: not stored.
SEED_VARIABLE = "ORGANMTL_SEED"


def seed_from_env() -> int | None:
    """Seed torch, numpy's global state and ``random`` from ``ORGANMTL_SEED`` if it is set; returns it."""
    seed = env_int(SEED_VARIABLE, None, minimum=0)
    if seed is not None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
    return seed


#: torch's intra-op threads of the training when set: ``nnUNetv2_train -device cpu`` takes one per core,
#: so two trainings side by side (``organmtl demo``) oversubscribe the cores and spin; unset: nnU-Net's.
THREADS_VARIABLE = "ORGANMTL_CPU_THREADS"


def cpu_threads_from_env(device: torch.device) -> int | None:
    """On a CPU device, set torch's intra-op threads from ``ORGANMTL_CPU_THREADS`` if it is set; returns it.
    Called by every organmtl trainer's ``__init__`` (after ``nnUNetv2_train`` has set one thread per core)."""
    threads = env_int(THREADS_VARIABLE, None, minimum=1)
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    return threads


class CPUBudgetMixin:
    """Put before the nnU-Net trainer class in the bases: shortens the schedule after ``__init__``."""

    budget_epochs = 2
    budget_iters = 10
    budget_val_iters = 2

    # nnU-Net records the constructor arguments by name (inspect.signature), so the mixin keeps
    # nnUNetTrainer's exact signature instead of *args/**kwargs.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        seed_from_env()
        cpu_threads_from_env(device)
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self, {"num_epochs": self.budget_epochs, "num_iterations_per_epoch": self.budget_iters,
                              "num_val_iterations_per_epoch": self.budget_val_iters})

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """Keep nnU-Net's training augmentation, but no mirroring test-time augmentation: on a CPU
        it multiplies validation/prediction time by 8 (the same as ``nnUNetv2_predict --disable_tta``)."""
        result = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return result

    def plan_for_gpu_memory(self) -> None:
        """No GPU memory plan: ``_Tiny`` trainers run CPU-sized plans (tests, the demo), which fit any GPU, so
        the plan's patch and batch stand and the two probes of the full trainers' plan
        (:mod:`organmtl.nnunet_trainers.gpu_memory`, seconds of CPU at every new training) are skipped."""
        self.print_to_log_file("GPU memory plan: none for a _Tiny trainer (the plan's patch and batch are kept)")
