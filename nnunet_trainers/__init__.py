"""organmtl's nnU-Net v2 trainers.

Each method family defines its trainer classes in its trainer modules; this package collects them
(:func:`trainer_classes`) into one tuple per family and re-exports every class, so the class
definition is the only place a trainer name is written. ``nnUNetv2_train -tr NAME`` finds them
through the shim module in ``ext_shim/`` that ``nnUNet_extTrainer`` points at (see
:mod:`organmtl.env`); the plugin manifests (``organmtl list``) name the family tuples. Names carry
the ``nnUNetTrainerOMTL`` prefix because nnU-Net's own trainers win name clashes; base classes and
mixins do not carry it, so nnU-Net's search finds exactly the trainers listed here.
"""
from __future__ import annotations

from types import ModuleType

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from organmtl.nnunet_trainers import baseline
from organmtl.nnunet_trainers.focusnet import trainers as _focusnet
from organmtl.nnunet_trainers.landmarks import aux_trainers as _landmark_aux
from organmtl.nnunet_trainers.landmarks import input_trainers as _landmark_input
from organmtl.nnunet_trainers.multitask import trainers as _multitask
from organmtl.nnunet_trainers.multitask import partial_labels as _partial_labels

PREFIX = "nnUNetTrainerOMTL"
TINY_SUFFIX = "_Tiny"


def trainer_classes(*modules: ModuleType) -> tuple[type, ...]:
    """The ``nnUNetTrainer`` subclasses named ``nnUNetTrainerOMTL*`` defined in ``modules``: in
    definition order, each ``_Tiny`` variant right after its full-schedule class."""
    found = [obj for m in modules for name, obj in vars(m).items()
             if name.startswith(PREFIX) and isinstance(obj, type) and issubclass(obj, nnUNetTrainer)
             and obj.__module__ == m.__name__]
    order = {c.__name__: i for i, c in enumerate(found)}
    return tuple(sorted(found, key=lambda c: (order.get(c.__name__.removesuffix(TINY_SUFFIX), order[c.__name__]),
                                              c.__name__.endswith(TINY_SUFFIX))))


#: one tuple per family, named by the plugin manifests (plugins/builtin.py)
BASELINE = trainer_classes(baseline)
FOCUSNET = trainer_classes(_focusnet)
LANDMARKS = trainer_classes(_landmark_aux, _landmark_input)
MULTITASK = trainer_classes(_multitask, _partial_labels)
TRAINERS = BASELINE + FOCUSNET + LANDMARKS + MULTITASK

globals().update((c.__name__, c) for c in TRAINERS)
__all__ = [c.__name__ for c in TRAINERS]
