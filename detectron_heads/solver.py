"""Learning-rate schedule of the HMR-Net paper (§3.2: "initial learning rate 0.001 with a decay rate
of 0.000001"), the Keras SGD ``decay``: ``lr_t = lr_0 / (1 + decay * t)`` after ``t`` updates, as a
Detectron2 scheduler. ``SOLVER.LR_SCHEDULER_NAME: WarmupInverseTimeDecayLR`` with
``SOLVER.INVERSE_TIME_DECAY`` (per iteration); every other name goes to Detectron2's
``build_lr_scheduler``. Warm-up (``SOLVER.WARMUP_*``) is applied as in Detectron2's schedulers."""
from __future__ import annotations

from fvcore.common.param_scheduler import ParamScheduler

from detectron2.solver import build_lr_scheduler as detectron2_build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler

INVERSE_TIME_DECAY = "WarmupInverseTimeDecayLR"


class InverseTimeDecayParamScheduler(ParamScheduler):
    """Multiplier ``1 / (1 + decay * t)`` with ``t = where * num_updates`` (fvcore's ``where`` is the
    fraction of training done)."""

    def __init__(self, decay: float, num_updates: int):
        if decay < 0:
            raise ValueError(f"SOLVER.INVERSE_TIME_DECAY must be >= 0, got {decay}")
        self.decay, self.num_updates = decay, num_updates

    def __call__(self, where: float) -> float:
        return 1.0 / (1.0 + self.decay * where * self.num_updates)


def build_lr_scheduler(cfg, optimizer):
    """Detectron2's scheduler, or the paper's inverse-time decay for :data:`INVERSE_TIME_DECAY`."""
    s = cfg.SOLVER
    if s.LR_SCHEDULER_NAME != INVERSE_TIME_DECAY:
        return detectron2_build_lr_scheduler(cfg, optimizer)
    sched = WarmupParamScheduler(InverseTimeDecayParamScheduler(s.INVERSE_TIME_DECAY, s.MAX_ITER), s.WARMUP_FACTOR,
                                 min(s.WARMUP_ITERS / s.MAX_ITER, 1.0), s.WARMUP_METHOD, s.RESCALE_INTERVAL)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=s.MAX_ITER)
