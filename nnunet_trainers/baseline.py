"""Stock nnU-Net baseline on a CPU budget: the reference every method is compared against."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from organmtl.nnunet_trainers.budget import CPUBudgetMixin
from organmtl.nnunet_trainers.laterality import LateralityAwareMirroringMixin


class nnUNetTrainerOMTLBaseline_Tiny(CPUBudgetMixin, LateralityAwareMirroringMixin, nnUNetTrainer):
    """``nnUNetTrainer`` with the short CPU schedule of :class:`CPUBudgetMixin` and no mirroring
    when the labels come in left/right pairs (:class:`LateralityAwareMirroringMixin`)."""
