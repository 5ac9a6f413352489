"""Workflows: whole jobs built from organmtl's library functions and nnU-Net's / Detectron2's stock
commands. They sit on top of every other layer (converters, ``nnunet_plans``, evaluation, the
trainers run by ``nnUNetv2_train``); nothing below imports them.

- :mod:`.demo`: ``organmtl demo``, every method next to its baseline on the demo data;
- :mod:`.multitask_experiments`: ``organmtl multitask-experiments``, the task-subset experiments of
  the multi-task CNN;
- :mod:`.steps`: the shared pieces (a conversion from its options, output sent to a log file).
"""
