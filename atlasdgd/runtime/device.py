"""Devices and precision: the one place a user's choice becomes a torch device.

``auto`` means CUDA when torch sees a GPU, else the CPU. Asking for a device this machine does not
have is an input error raised before any work starts (the CLI turns it into exit code 2).
"""

from __future__ import annotations

import contextlib

import torch

from atlasdgd.errors import InputError

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
PRECISIONS = ("32", "bf16-mixed")


class DeviceError(InputError):
    """The requested device or precision is not available here."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """A concrete torch device for ``spec`` (see :data:`DEVICE_HELP`), checked against this machine."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {spec!r}: use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {text!r} was asked for but torch sees no CUDA GPU here (torch {torch.__version__}, "
                              f"CUDA build: {torch.version.cuda or 'none'}): use --device cpu (or auto), or run on a GPU "
                              "machine with a CUDA build of torch")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {text!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {text!r} was asked for but torch has no MPS backend here: use --device cpu")
        return device
    raise DeviceError(f"unsupported device {spec!r}: use {DEVICE_HELP}")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``bf16-mixed`` (matrix products in bf16, fp32 weights), else a no-op."""
    if precision != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters live (the CPU for a module without parameters)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def on_device_of(module: torch.nn.Module, values) -> torch.Tensor:
    """``values`` (numpy or tensor) as a float32 tensor where ``module`` lives."""
    return torch.as_tensor(values, dtype=torch.float32).to(module_device(module))


def to_numpy(tensor: torch.Tensor):
    """A tensor's values as a numpy array on the host, from any device."""
    return tensor.detach().cpu().numpy()
