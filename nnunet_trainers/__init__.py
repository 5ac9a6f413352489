"""organmtl's nnU-Net v2 trainers.

Every trainer is re-exported here; ``nnUNetv2_train -tr NAME`` finds them through the shim module
in ``ext_shim/`` that ``nnUNet_extTrainer`` points at (see :mod:`organmtl.env`). Names carry the
``nnUNetTrainerOMTL`` prefix because nnU-Net's own trainers win name clashes.
"""
from organmtl.nnunet_trainers.baseline import nnUNetTrainerOMTLBaseline_Tiny
from organmtl.nnunet_trainers.focusnet import *  # noqa: F401,F403  (FocusNetv2 trainers)
from organmtl.nnunet_trainers.focusnet import __all__ as _focusnet_all
from organmtl.nnunet_trainers.multitask import *  # noqa: F401,F403  (multitask_cnn trainers)
from organmtl.nnunet_trainers.multitask import __all__ as _multitask_all
from organmtl.nnunet_trainers.landmarks import *  # noqa: F401,F403  (landmark U-Net trainers)
from organmtl.nnunet_trainers.landmarks import __all__ as _landmarks_all

__all__ = ["nnUNetTrainerOMTLBaseline_Tiny"]
__all__ += _multitask_all
__all__ += _focusnet_all
__all__ += _landmarks_all
