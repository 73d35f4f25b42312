"""Which device a process trains or evaluates on, its precision and CUDA backend flags, and the autocast context."""
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


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision 'auto' -> 'bf16' on a CUDA device with bf16 support (Ampere and newer), 'fp16' on older
    GPUs (with a grad scaler), 'fp32' on the CPU (bf16 autocast there is slower than fp32 for our small models).
    Any other setting is returned as given."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def configure_cuda_backends(tf32: bool, cudnn_benchmark: bool) -> None:
    """Process-wide CUDA flags of a training stage: TF32 for fp32 matmuls and cuDNN convolutions, and cuDNN's
    algorithm search (train.tf32, train.cudnn_benchmark). Harmless to set on a machine without CUDA."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
