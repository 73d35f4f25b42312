"""Which device a process trains or evaluates on, and the autocast context for a precision."""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from ..errors import TrainingError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda (this rank's GPU under torchrun: LOCAL_RANK) when available, else cpu."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is available")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast on CPU or CUDA, fp16 autocast on CUDA (with a grad scaler), nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise TrainingError("train.precision=fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
