"""Shim for nnU-Net's ``nnUNet_extTrainer`` search: re-exports every organmtl trainer.

nnU-Net imports this file as a top-level module and finds trainers by attribute. The classes
themselves live in ``organmtl.nnunet_trainers`` and keep that module name.
"""
from organmtl.nnunet_trainers import TRAINERS

globals().update((c.__name__, c) for c in TRAINERS)
__all__ = [c.__name__ for c in TRAINERS]
