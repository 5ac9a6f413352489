"""organmtl's nnU-Net v2 trainers.

Every trainer is re-exported here; ``nnUNetv2_train -tr NAME`` finds them through the shim module
in ``ext_shim/`` that ``nnUNet_extTrainer`` points at (see :mod:`organmtl.env`). Names carry the
``nnUNetTrainerOMTL`` prefix because nnU-Net's own trainers win name clashes.
"""
from organmtl.nnunet_trainers.baseline import nnUNetTrainerOMTLBaseline_Tiny

__all__ = ["nnUNetTrainerOMTLBaseline_Tiny"]
