"""Shared by the nnU-Net benchmarks: build a trainer the way ``nnUNetv2_train`` does and time its own
``train_step`` on one fixed batch (not a benchmark itself: ``run.py`` only collects ``bench_*.py``)."""
from __future__ import annotations

import json
import time

import torch


def initialized_trainer(cls, plans: dict, configuration: str, dataset_json: dict, device: str):
    """``cls(plans, configuration, fold 0, dataset_json, device)``, initialised, on a private copy of
    ``plans`` with the ``continue_training`` key that ``nnunetv2.run.run_training`` adds."""
    plans = {**json.loads(json.dumps(plans)), "continue_training": False}
    trainer = cls(plans, configuration, 0, dataset_json, torch.device(device))
    trainer.initialize()
    return trainer


def train_step_seconds(trainer, batch: dict, n_steps: int) -> list[float]:
    """Seconds of each of ``n_steps`` calls of ``trainer.train_step`` on (copies of) ``batch``, after one
    untimed warm-up call; CUDA is synchronised so that each time covers the whole step."""
    trainer.network.train()
    cuda = trainer.device.type == "cuda"
    times = []
    for i in range(n_steps + 1):
        t0 = time.perf_counter()
        target = batch["target"]
        trainer.train_step({"data": batch["data"].clone(),
                            "target": [t.clone() for t in target] if isinstance(target, list) else target.clone()})
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return times
