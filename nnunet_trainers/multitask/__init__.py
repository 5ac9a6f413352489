"""Multi-task multi-modality CNN of Moeskops et al. (papers/moeskops_multitask_cnn.txt) for nnU-Net v2.

- :mod:`.tasks`: the task table a merged dataset carries (``convert merge``);
- :mod:`.sampler`: task- and class-balanced mini-batches as an nnU-Net data loader (§3.2);
- :mod:`.triplanar`: the triplanar network (§3.1);
- :mod:`.trainers`: the nnU-Net trainers (triplanar network and nnU-Net's U-Net);
- :mod:`.evaluation`: Dice per class, per-task output masking, cross-task confusion, the
  Dice-optimal threshold of binary tasks (§4);
- :mod:`.experiments`: the 2^T - 1 task-subset experiments (§3.2, Fig. 1) behind
  ``organmtl multitask-experiments``;
- :mod:`.mni_brain`: nilearn's MNI152 template as a real brain task.
"""
from organmtl.nnunet_trainers.multitask.trainers import (
    nnUNetTrainerOMTLMultiTaskUNet, nnUNetTrainerOMTLMultiTaskUNet_Tiny, nnUNetTrainerOMTLMultiTaskUNetDiceCE,
    nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny, nnUNetTrainerOMTLTriplanar, nnUNetTrainerOMTLTriplanar_Tiny,
    nnUNetTrainerOMTLTriplanarDiceCE, nnUNetTrainerOMTLTriplanarDiceCE_Tiny)

__all__ = [
    "nnUNetTrainerOMTLTriplanar", "nnUNetTrainerOMTLTriplanar_Tiny",
    "nnUNetTrainerOMTLTriplanarDiceCE", "nnUNetTrainerOMTLTriplanarDiceCE_Tiny",
    "nnUNetTrainerOMTLMultiTaskUNet", "nnUNetTrainerOMTLMultiTaskUNet_Tiny",
    "nnUNetTrainerOMTLMultiTaskUNetDiceCE", "nnUNetTrainerOMTLMultiTaskUNetDiceCE_Tiny",
]
