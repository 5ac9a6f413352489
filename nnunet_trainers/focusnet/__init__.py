"""FocusNetv2 (Gao et al., "FocusNetv2: imbalanced large and small organ segmentation with
adversarial shape constraint for head and neck CT images"; docs/focusnetv2.md) as nnU-Net v2
trainers: networks (``blocks``, ``network``, ``shape_ae``), ROI handling (``roi``), losses
(``losses``), options and phase schedule (``options``), the trainer machinery (``trainer``), the
trainer classes (``trainers``) and centre export (``centres``).

Importing this package imports none of its modules (no cycle with ``trainer``); the trainer classes
are collected by :mod:`organmtl.nnunet_trainers` (``FOCUSNET``)."""
