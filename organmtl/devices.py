"""One rule for the ``-device`` option of every organmtl prediction command.

``auto`` (the default everywhere) is ``cuda`` when torch sees a CUDA device, else ``cpu``; an explicit
``cuda`` or ``mps`` that torch cannot use is bad input (:class:`DeviceError`, one line, exit 2) instead of a
traceback deep inside the predictor.
"""
from __future__ import annotations

#: the choices of a ``-device`` option
DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")


class DeviceError(ValueError):
    """A device that this machine does not have (CLI exit code 2)."""


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` if available else ``"cpu"``; ``"cuda"``/``"cpu"``/``"mps"`` are checked and
    returned as given (``"cuda:1"`` too). Raises :class:`DeviceError` for a device torch cannot use."""
    import torch

    name = str(name).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":", 1)[0]
    if kind == "cpu":
        return name
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"-device {name}: no CUDA device is available here (use -device auto or cpu)")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise DeviceError(f"-device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return name
    if kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError(f"-device {name}: no Apple MPS device is available here (use -device auto or cpu)")
        return name
    raise DeviceError(f"-device {name}: choose one of {', '.join(DEVICE_CHOICES)}")
