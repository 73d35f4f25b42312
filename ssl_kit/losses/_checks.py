"""Argument validation shared by the losses: clear ValueErrors for shapes, temperatures, thresholds."""
from __future__ import annotations

from torch import Tensor


def check_temperature(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_2d(name: str, x: Tensor) -> None:
    if not hasattr(x, "ndim") or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got shape {tuple(getattr(x, 'shape', ()))}")


def check_same(name_a: str, a: Tensor, name_b: str, b: Tensor, what: str = "shape") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}")


def check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def check_positive_int(name: str, value: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_batch(name: str, x: Tensor, minimum: int) -> None:
    if x.shape[0] < minimum:
        raise ValueError(f"{name} needs a batch of at least {minimum} samples, got N={x.shape[0]}")


def full_precision(x: Tensor):
    """Context that turns autocast off on x's device: a loss's matmuls then run in its inputs' float32."""
    import torch

    return torch.autocast(x.device.type, enabled=False)
