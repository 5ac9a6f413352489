"""Multi-task multi-modality CNN of Moeskops et al. ("Deep learning for multi-task medical image
segmentation in multiple modalities", MICCAI 2016; docs/multitask_cnn.md) for nnU-Net v2.

- :mod:`.tasks`: the task table a merged dataset carries (``convert merge``);
- :mod:`.sampler`: task- and class-balanced mini-batches as an nnU-Net data loader (§3.2);
- :mod:`.triplanar`: the triplanar network (§3.1);
- :mod:`.trainers`: the nnU-Net trainers (triplanar network and nnU-Net's U-Net), collected by
  :mod:`organmtl.nnunet_trainers` (``MULTITASK``);
- :mod:`.evaluation`: Dice per class, per-task output masking, cross-task confusion, the
  Dice-optimal threshold of binary tasks (§4);
- :mod:`.mni_brain`: nilearn's MNI152 template as a real brain task.
- :mod:`.partial_labels`: partially labelled sources of the same anatomy (marginal / masked-sigmoid
  loss per case's annotated classes; docs/partial_labels.md), also collected into ``MULTITASK``.

The 2^T - 1 task-subset experiments (§3.2, Fig. 1) behind ``organmtl multitask-experiments`` are a
workflow: :mod:`organmtl.workflows.multitask_experiments`.
"""
