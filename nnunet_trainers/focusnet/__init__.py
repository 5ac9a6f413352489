"""FocusNetv2 (papers/focusnetv2.txt) as nnU-Net v2 trainers: networks (``blocks``, ``network``,
``shape_ae``), ROI handling (``roi``), losses (``losses``), options and phase schedule (``options``),
the trainer machinery (``trainer``), the trainer classes (``trainers``) and centre export
(``centres``). See docs/focusnetv2.md."""
from organmtl.nnunet_trainers.focusnet.trainers import (  # noqa: F401
    TRAINERS, nnUNetTrainerOMTLFocusNetV1, nnUNetTrainerOMTLFocusNetV1_Tiny, nnUNetTrainerOMTLFocusNetV2,
    nnUNetTrainerOMTLFocusNetV2_Tiny, nnUNetTrainerOMTLFocusNetV2NoConcat, nnUNetTrainerOMTLFocusNetV2NoConcat_Tiny,
    nnUNetTrainerOMTLFocusNetV2OriginAE, nnUNetTrainerOMTLFocusNetV2OriginAE_Tiny, nnUNetTrainerOMTLSNet,
    nnUNetTrainerOMTLSNet_Tiny)

__all__ = list(TRAINERS)
