"""The FocusNet trainers found by ``nnUNetv2_train -tr NAME`` (FocusNetv2 paper, Table 6): each as a
full-schedule class and a ``_Tiny`` CPU variant (:class:`CPUBudgetMixin` first: the CPU schedule and
no mirroring at inference, nothing else; the width follows the plan, docs/trainers.md).

| trainer | Table 6 row | phases |
|---|---|---|
| ``nnUNetTrainerOMTLSNet`` | S-Net (SEResUNet_d2 + ASPP, FL + DL) | snet |
| ``nnUNetTrainerOMTLFocusNetV1`` | FocusNetv1 (no AAE) | snet, sol, sos, joint |
| ``nnUNetTrainerOMTLFocusNetV2`` | FocusNetv2 | snet, sol, ae, sos, joint |
| ``nnUNetTrainerOMTLFocusNetV2NoConcat`` | FocusNetv2 no concat | as v2, no raw image into SOS-Net |
| ``nnUNetTrainerOMTLFocusNetV2OriginAE`` | origin AE | as v2, AE trained on GT only, then frozen |
"""
from organmtl.nnunet_trainers.budget import CPUBudgetMixin
from organmtl.nnunet_trainers.focusnet.trainer import FocusNetTrainerBase


class nnUNetTrainerOMTLSNet(FocusNetTrainerBase):
    """S-Net alone with the weighted focal + generalised Dice loss (§3.1.1, §3.2)."""
    phases = ("snet",)
    use_sos = False
    use_ae = False


class nnUNetTrainerOMTLFocusNetV1(FocusNetTrainerBase):
    """FocusNetv1: S-Net + SOL-Net + SOS-Net, no shape autoencoder (Table 6)."""
    phases = ("snet", "sol", "sos", "joint")
    use_ae = False
    adversarial = False


class nnUNetTrainerOMTLFocusNetV2(FocusNetTrainerBase):
    """Full FocusNetv2: S-Net, SOL-Net, SOS-Net, adversarial shape autoencoder (§3, §4.2)."""


class nnUNetTrainerOMTLFocusNetV2NoConcat(FocusNetTrainerBase):
    """Ablation "FocusNetv2 no concat": SOS-Net sees only the S-Net features, not the raw image."""
    concat_image = False


class nnUNetTrainerOMTLFocusNetV2OriginAE(FocusNetTrainerBase):
    """Ablation "origin AE": autoencoder trained on ground truth only, then frozen (Oktay et al. 2017
    style shape prior, no adversarial D step)."""
    adversarial = False


class nnUNetTrainerOMTLSNet_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLSNet):
    """:class:`nnUNetTrainerOMTLSNet` on the CPU budget."""


class nnUNetTrainerOMTLFocusNetV1_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLFocusNetV1):
    """:class:`nnUNetTrainerOMTLFocusNetV1` on the CPU budget."""


class nnUNetTrainerOMTLFocusNetV2_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLFocusNetV2):
    """:class:`nnUNetTrainerOMTLFocusNetV2` on the CPU budget."""


class nnUNetTrainerOMTLFocusNetV2NoConcat_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLFocusNetV2NoConcat):
    """:class:`nnUNetTrainerOMTLFocusNetV2NoConcat` on the CPU budget."""


class nnUNetTrainerOMTLFocusNetV2OriginAE_Tiny(CPUBudgetMixin, nnUNetTrainerOMTLFocusNetV2OriginAE):
    """:class:`nnUNetTrainerOMTLFocusNetV2OriginAE` on the CPU budget."""

