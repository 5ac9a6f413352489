"""Peak training memory of one step, measured on the CPU by counting tensor storage (docs/scaling.md).

A GPU run fails with "out of memory" after hours of data preparation; the question "does this
trainer at this patch and batch fit a 24 GB card?" can be answered on a CPU: the tensors a training
step keeps alive (parameters, gradients, optimizer state, the activations autograd saves for the
backward pass, the batch) have the same shapes and dtypes on both devices.

:class:`StorageCounter` is a ``TorchDispatchMode``: every ATen operator call passes through it,
and it records the storage of each tensor the operator returns (one entry per storage, so views
and in-place results are not counted twice) and forgets a storage once nothing references it
(its weak reference expires). ``current`` is what the tensors allocated under the mode occupy now,
``peak`` its maximum at operator boundaries. Allocator effects are not counted: the scratch memory
inside one operator (convolution workspaces), CUDA's context and its caching-allocator rounding;
:data:`GPU_OVERHEAD_GIB` is the allowance added for them when predicting GPU memory.

``tracemalloc`` or the process RSS would be wrong for torch: tensor data is allocated outside
Python's allocator, and the CPU allocator returns freed blocks lazily.

Mixed precision: nnU-Net trains under ``torch.autocast`` on CUDA (fp16). CPU autocast with
``torch.float16`` (or ``torch.bfloat16``, also 2 bytes) casts the same operators, so measuring the
step under CPU autocast gives the AMP activation footprint instead of a guessed halving.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 1024 ** 3
# Allowance for what storage counting cannot see on a GPU: the CUDA context (~0.3-0.5 GiB),
# cuDNN workspaces and the caching allocator's block rounding/fragmentation.
GPU_OVERHEAD_GIB = 1.5
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": None}
#: GPU memory target (GiB) when no CUDA device is visible: a plan made on a CPU for a GPU elsewhere
#: (override with ``ORGANMTL_GPU_MEMORY_GB`` / ``--gpu-gb``)
FALLBACK_GPU_GIB = 24.0


def default_gpu_gib(device=None) -> tuple[float, str]:
    """The GPU memory target when none is given, and where it comes from: the total memory of the CUDA
    device ``device`` (a CUDA ``torch.device`` or name; anything else: the current CUDA device) when CUDA
    is available, else :data:`FALLBACK_GPU_GIB`."""
    if not torch.cuda.is_available():
        return FALLBACK_GPU_GIB, f"no CUDA device visible: {FALLBACK_GPU_GIB:g} GiB"
    device = torch.device(device) if device is not None else None
    index = device.index if device is not None and device.type == "cuda" and device.index is not None \
        else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return round(props.total_memory / GIB, 2), f"the memory of CUDA device {index} ({props.name})"


class StorageCounter(TorchDispatchMode):
    """Bytes of the tensor storages allocated by operators run under this mode (see module doc).

    ``current``: live now; ``peak``: the maximum seen at an operator boundary (outputs allocated,
    inputs not yet released). Only tensors on ``device`` (``"cpu"``) are counted."""

    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.device = device
        self._live: dict[StorageWeakRef, int] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [ref for ref in self._live if ref.expired()]
        for ref in dead:
            self.current -= self._live.pop(ref)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self._sweep()
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref not in self._live:
                    self._live[ref] = storage.nbytes()
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (shared storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            key = (s.data_ptr(), s.nbytes())
            if key not in seen:
                seen.add(key)
                total += s.nbytes()
    return total


def model_bytes(network: torch.nn.Module) -> int:
    """Parameters and buffers of ``network``."""
    return storage_bytes(list(network.parameters()) + list(network.buffers()))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """The optimizer's per-parameter state (momentum buffers, Adam moments)."""
    if optimizer is None:
        return 0
    return storage_bytes(v for state in optimizer.state.values() for v in state.values())


@dataclass(frozen=True)
class StepMemory:
    """One measured training step. ``resident_bytes``: parameters, buffers, optimizer state and
    batch held before the step; ``step_peak_bytes``: the peak of what the step allocated on top
    (activations, gradients, new optimizer state, temporaries between operators);
    ``backward_peak_bytes`` (:func:`measure_network_step` only): the peak up to the end of the backward
    pass plus the optimizer state, the part that grows with the batch (the optimizer step's own peak,
    gradients + state + its temporaries, does not); ``forward_peak_bytes``: the peak at the end of
    the forward pass (the saved activations)."""

    resident_bytes: int
    step_peak_bytes: int
    seconds: float
    amp: str = "none"
    backward_peak_bytes: int | None = None
    forward_peak_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        return self.resident_bytes + self.step_peak_bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def predicted_gpu_gib(self) -> float:
        """GPU memory one process needs: the measured peak plus :data:`GPU_OVERHEAD_GIB`."""
        return self.peak_gib + GPU_OVERHEAD_GIB

    def fits(self, gpu_gib: float) -> bool:
        return self.predicted_gpu_gib() <= gpu_gib


def autocast_context(amp: str):
    """CPU autocast for ``amp`` in :data:`AMP_DTYPES` (``"none"``: fp32, no autocast)."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def measure_step(step: Callable[[], object], resident_bytes: int = 0, amp: str = "none") -> StepMemory:
    """Run ``step()`` once under a :class:`StorageCounter` (and CPU autocast for ``amp``)."""
    counter = StorageCounter()
    t0 = time.perf_counter()
    with autocast_context(amp), counter:
        step()
    return StepMemory(resident_bytes, counter.peak, time.perf_counter() - t0, amp)


def batch_bytes(batch: dict) -> int:
    return storage_bytes(t for t in tree_leaves(batch) if isinstance(t, torch.Tensor))


def as_tensors(batch: dict) -> dict:
    """nnU-Net's dataloaders may hand out numpy arrays: the step receives tensors either way."""
    import numpy as np

    def conv(v):
        if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            return torch.from_numpy(v)
        if isinstance(v, (list, tuple)):
            return type(v)(conv(x) for x in v)
        return v
    return {k: conv(v) for k, v in batch.items()}


def measure_trainer_step(trainer, batch: dict, amp: str = "none", warmup: bool = True) -> StepMemory:
    """Peak memory of ``trainer.train_step(batch)`` of an initialised nnU-Net trainer on the CPU.

    With ``warmup`` one unmeasured step runs first, so the optimizer state exists (as in every step
    after the first) and is counted as resident."""
    batch = as_tensors(batch)
    if warmup:
        with autocast_context(amp):
            trainer.train_step(batch)
    net = trainer.network
    resident = model_bytes(net) + optimizer_state_bytes(trainer.optimizer) + batch_bytes(batch)
    return measure_step(lambda: trainer.train_step(batch), resident, amp)


def measure_network_step(network: torch.nn.Module, input_shape, optimizer_factory=None,
                         forward: Callable | None = None, amp: str = "none") -> StepMemory:
    """Peak memory of forward + backward (sum of the float outputs) + one optimizer step of
    ``network`` on a random input of ``input_shape``, in train mode; the network's state (weights,
    normalisation statistics) is restored afterwards. The optimizer state created by the step is
    counted as if it had been resident during the backward pass (as in every step after the first).

    ``optimizer_factory(params)`` builds the optimizer (default SGD with momentum, nnU-Net's);
    ``forward(network, x)`` replaces ``network(x)`` (e.g. one phase of a multi-part network)."""
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    was_training = network.training
    network.train()
    x = torch.randn(*input_shape)
    opt = (optimizer_factory or (lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.99)))(network.parameters())
    forward = forward or (lambda net, inp: net(inp))
    counter = StorageCounter()
    t0 = time.perf_counter()
    try:
        with autocast_context(amp), counter:
            opt.zero_grad(set_to_none=True)
            out = forward(network, x)
            forward_peak = counter.peak
            loss = sum(t.float().sum() for t in tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad)
            del out
            loss.backward()
            del loss
            backward_peak = counter.peak
            opt.step()
        seconds = time.perf_counter() - t0
        opt_state = optimizer_state_bytes(opt)
        peak = max(backward_peak + opt_state, counter.peak)
        return StepMemory(model_bytes(network) + storage_bytes([x]), peak, seconds, amp, backward_peak + opt_state,
                          forward_peak)
    finally:
        for p in network.parameters():
            p.grad = None
        network.load_state_dict(state)
        network.train(was_training)


def format_report(name: str, patch, batch_size: int, memory: StepMemory, gpu_gib: float) -> str:
    """One line for logs and the CLI."""
    verdict = "fits" if memory.fits(gpu_gib) else "does NOT fit"
    return (f"{name}: patch {list(patch)} x batch {batch_size}, amp {memory.amp}: peak {memory.peak_gib:.2f} GiB "
            f"(resident {memory.resident_bytes / GIB:.2f} + step {memory.step_peak_bytes / GIB:.2f}) measured on "
            f"the CPU in {memory.seconds:.1f} s; predicted GPU {memory.predicted_gpu_gib():.2f} GiB "
            f"{verdict} {gpu_gib:g} GiB")


def check_trainer(dataset: str, configuration: str, trainer_name: str, fold: int = 0,
                  plans_identifier: str = "nnUNetPlans", amp: str = "fp16", gpu_gib: float | None = None):
    """``organmtl memory-check``: build ``trainer_name`` as ``nnUNetv2_train`` does (on the CPU),
    ``initialize`` it (its own plan adjustment runs, e.g. the GPU memory plan of the full trainers),
    take one batch from its own training dataloader and measure :func:`measure_trainer_step`.
    Returns ``(trainer, StepMemory)``. The trainer writes its log into ``nnUNet_results`` as a
    training would (the command points it at a temporary folder)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(str(dataset), configuration, fold, trainer_name, plans_identifier,
                                    device=torch.device("cpu"))
    trainer.initialize()
    dl_tr, dl_val = trainer.get_dataloaders()
    batch = next(dl_tr)
    for dl in (dl_tr, dl_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    return trainer, measure_trainer_step(trainer, batch, amp=amp)
