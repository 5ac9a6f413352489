"""Stock nnU-Net baseline on a CPU budget: the reference every method is compared against."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from organmtl.nnunet_trainers.budget import CPUBudgetMixin


class nnUNetTrainerOMTLBaseline_Tiny(CPUBudgetMixin, nnUNetTrainer):
    """Unmodified ``nnUNetTrainer`` with the short CPU schedule of :class:`CPUBudgetMixin`."""
