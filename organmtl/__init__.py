"""organmtl: multi-task organ segmentation methods as nnU-Net v2 trainers and Detectron2 heads.

Importing this package makes nnU-Net's stock commands able to find our trainers: it points the
official ``nnUNet_extTrainer`` variable at :func:`organmtl.env.ext_trainer_dir` (unless the user set
it already). The same is done at interpreter start-up by the ``.pth`` hook the set-up installs,
so ``nnUNetv2_train ... -tr nnUNetTrainerOMTL...`` works in a fresh shell.
"""
from organmtl.env import ensure_ext_trainer_env

__version__ = "0.1.0"

ensure_ext_trainer_env()
