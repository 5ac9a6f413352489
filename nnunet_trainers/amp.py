"""Mixed precision and collective-safe steps for organmtl's custom ``train_step`` s (docs/scaling.md).

nnU-Net's ``nnUNetTrainer.train_step`` runs the forward pass and the loss under
``torch.autocast`` on a CUDA device (not on CPU/MPS) and the backward pass through its
``GradScaler``: ``scale(loss).backward()``, ``unscale_`` before clipping the gradient norm at 12,
``step``, ``update``. A trainer that writes its own ``train_step`` must keep that contract, or GPU
training silently runs in fp32 while validation and prediction run under autocast.
:class:`AMPTrainStepMixin` holds the sequence once: a custom step hands :meth:`~AMPTrainStepMixin.amp_step`
a function computing its loss, and gets nnU-Net's AMP, scaler and clipping around it. In fp32 on the
CPU the operations and their order are those of nnU-Net's step, so results are bit-identical.

:func:`float32_region` turns autocast off for numerically fragile parts (log-variances, heatmap
regression, Laplacians, logit-space arithmetic): inside it, ops run in the dtype of their inputs,
so cast the inputs with ``.float()``.

:func:`any_rank` is the all-reduced "has samples" flag for steps whose work depends on the batch:
every DDP rank must run the same forward/backward/collective sequence, so a decision taken from one
rank's batch must be taken from all ranks' batches.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from nnunetv2.utilities.helpers import dummy_context
from torch import distributed as dist

#: what ``amp_step``'s loss function returns: the loss to optimise and named parts for logging
LossAndParts = tuple[torch.Tensor, dict]


def float32_region(device_type: str):
    """A context with autocast disabled for ``device_type`` when it is enabled (else a no-op, so it
    is free in fp32 and never touches devices that reject autocast calls, e.g. MPS)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-ed over the DDP ranks (one all-reduce; ``flag`` itself without DDP). Every rank
    must call it at the same point of its step."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


class AMPTrainStepMixin:
    """nnU-Net's AMP path for custom train steps; put before ``nnUNetTrainer`` in the bases.

    ``cpu_autocast_dtype``: test-only switch. ``None`` (every trainer) keeps nnU-Net's rule,
    autocast on CUDA only; ``torch.float16`` or ``torch.bfloat16`` also autocasts on a CPU device,
    so tests emulate the GPU's mixed-precision path without a GPU (there is no ``GradScaler`` on the
    CPU: nnU-Net creates one for CUDA only). Set it on an instance, never from the environment.
    """

    cpu_autocast_dtype: torch.dtype | None = None

    def autocast_context(self):
        """``torch.autocast`` as nnU-Net's ``train_step`` uses it (CUDA), or on the CPU when
        :attr:`cpu_autocast_dtype` asks for it, else no autocast."""
        if self.device.type == "cuda":
            return torch.autocast(self.device.type, enabled=True)
        if self.device.type == "cpu" and self.cpu_autocast_dtype is not None:
            return torch.autocast("cpu", dtype=self.cpu_autocast_dtype)
        return dummy_context()

    def batch_to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """``(data, target)`` of an nnU-Net batch on the trainer's device (target: one tensor per
        deep-supervision scale, or one tensor)."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)
        return data, target

    def amp_step(self, loss_fn: Callable[[], LossAndParts]) -> LossAndParts:
        """One optimiser step on ``loss_fn()`` exactly as nnU-Net's ``train_step`` does it:
        ``zero_grad``; forward and loss under :meth:`autocast_context`; backward through
        ``self.grad_scaler`` when there is one (CUDA), ``unscale_`` before clipping the gradient
        norm at 12, ``step`` and ``update``. ``loss_fn`` returns ``(loss, parts)``; returns the same."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast_context():
            loss, parts = loss_fn()
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return loss, parts

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's own ``train_step`` (network, ``self.loss``), through :meth:`amp_step`."""
        data, target = self.batch_to_device(batch)
        loss, _ = self.amp_step(lambda: (self.loss(self.network(data), target), {}))
        return {"loss": loss.detach().cpu().numpy()}
