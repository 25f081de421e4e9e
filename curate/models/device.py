"""Device and precision: CUDA with bf16 (or fp16 where bf16 is missing) when a GPU is there, fp32 on a CPU."""

from __future__ import annotations

import contextlib
from typing import Literal

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

__all__ = ["Device", "Precision", "autocast", "pick_device", "pick_dtype"]


def pick_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but torch sees no CUDA device")
    return torch.device(device)


def pick_dtype(device, precision: str = "auto"):
    """The compute dtype: fp32 on a CPU unless asked otherwise; bf16 on a GPU that has it, else fp16."""
    import torch

    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device, dtype):
    """Mixed precision for a non-fp32 dtype; a no-op context for fp32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
