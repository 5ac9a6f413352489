"""Landmark U-Nets as nnU-Net v2 trainers (docs/landmark_unets.md).

Landmarks as an auxiliary task (the multi-task thesis): :mod:`.aux_trainers`. Landmarks as input
and the multi-organ multi-task block (the landmark-input thesis): :mod:`.input_trainers`. Landmark coordinates from a trained auxiliary-task model:
``organmtl predict-landmarks`` (:mod:`.predict`).

Importing this package imports none of its modules; the trainer classes are collected by
:mod:`organmtl.nnunet_trainers` (``LANDMARKS``).
"""
