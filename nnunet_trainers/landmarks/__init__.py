"""Landmark U-Nets as nnU-Net v2 trainers (docs/landmark_unets.md).

Landmarks as an auxiliary task (papers/landmark_mtl_unet_thesis.txt): :mod:`.aux_trainers`.
Landmarks as input and the multi-organ multi-task block (papers/landmark_input_unet.txt):
:mod:`.input_trainers`. Landmark coordinates from a trained auxiliary-task model:
``python -m organmtl.nnunet_trainers.landmarks.predict`` (:mod:`.predict`).
"""
from organmtl.nnunet_trainers.landmarks.aux_trainers import (
    nnUNetTrainerOMTLLandmarkAlternate, nnUNetTrainerOMTLLandmarkAlternate_Tiny, nnUNetTrainerOMTLLandmarkJoint,
    nnUNetTrainerOMTLLandmarkJoint_Tiny, nnUNetTrainerOMTLLandmarkJointL3, nnUNetTrainerOMTLLandmarkJointL3_Tiny,
    nnUNetTrainerOMTLLandmarkJointL5, nnUNetTrainerOMTLLandmarkJointL5_Tiny, nnUNetTrainerOMTLLandmarkJointL10,
    nnUNetTrainerOMTLLandmarkJointL10_Tiny, nnUNetTrainerOMTLLandmarkJointLite, nnUNetTrainerOMTLLandmarkJointLite_Tiny,
    nnUNetTrainerOMTLLandmarkJointThesisCT,
    nnUNetTrainerOMTLLandmarkJointThesisCT_Tiny, nnUNetTrainerOMTLLandmarkUncertainty,
    nnUNetTrainerOMTLLandmarkUncertainty_Tiny)
from organmtl.nnunet_trainers.landmarks.input_trainers import (
    nnUNetTrainerOMTLLandmarkEarlyFusion, nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny,
    nnUNetTrainerOMTLLandmarkImageOnly, nnUNetTrainerOMTLLandmarkImageOnly_Tiny, nnUNetTrainerOMTLLandmarkLateFusion,
    nnUNetTrainerOMTLLandmarkLateFusion_Tiny, nnUNetTrainerOMTLMultiTaskBlock, nnUNetTrainerOMTLMultiTaskBlock_Tiny,
    nnUNetTrainerOMTLMultiTaskBlockDice, nnUNetTrainerOMTLMultiTaskBlockDice_Tiny)

__all__ = [
    "nnUNetTrainerOMTLLandmarkJoint", "nnUNetTrainerOMTLLandmarkJoint_Tiny",
    "nnUNetTrainerOMTLLandmarkJointL3", "nnUNetTrainerOMTLLandmarkJointL3_Tiny",
    "nnUNetTrainerOMTLLandmarkJointL5", "nnUNetTrainerOMTLLandmarkJointL5_Tiny",
    "nnUNetTrainerOMTLLandmarkJointL10", "nnUNetTrainerOMTLLandmarkJointL10_Tiny",
    "nnUNetTrainerOMTLLandmarkJointLite", "nnUNetTrainerOMTLLandmarkJointLite_Tiny",
    "nnUNetTrainerOMTLLandmarkJointThesisCT", "nnUNetTrainerOMTLLandmarkJointThesisCT_Tiny",
    "nnUNetTrainerOMTLLandmarkAlternate", "nnUNetTrainerOMTLLandmarkAlternate_Tiny",
    "nnUNetTrainerOMTLLandmarkUncertainty", "nnUNetTrainerOMTLLandmarkUncertainty_Tiny",
    "nnUNetTrainerOMTLLandmarkEarlyFusion", "nnUNetTrainerOMTLLandmarkEarlyFusion_Tiny",
    "nnUNetTrainerOMTLLandmarkLateFusion", "nnUNetTrainerOMTLLandmarkLateFusion_Tiny",
    "nnUNetTrainerOMTLLandmarkImageOnly", "nnUNetTrainerOMTLLandmarkImageOnly_Tiny",
    "nnUNetTrainerOMTLMultiTaskBlock", "nnUNetTrainerOMTLMultiTaskBlock_Tiny",
    "nnUNetTrainerOMTLMultiTaskBlockDice", "nnUNetTrainerOMTLMultiTaskBlockDice_Tiny",
]
