"""Argument validation shared by the losses: clear ValueErrors for shapes, temperatures, thresholds."""
from __future__ import annotations

import torch
from torch import Tensor


def check_temperature(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def check_2d(name: str, x: Tensor) -> None:
    if not hasattr(x, "ndim") or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got shape {tuple(getattr(x, 'shape', ()))}")


def stack_rows(name: str, values, item: str, shape: str) -> Tensor:
    """V matrices (N, D) of the same rows, as one (V, N, D) tensor or a sequence of V 2-D tensors -> (V, N, D),
    V >= 1; a ValueError naming `name`, the `item` (what one matrix is: a view, a projector's output) and the
    expected `shape` text otherwise."""
    if isinstance(values, Tensor):
        if values.ndim != 3:
            raise ValueError(f"{name} must be a {shape} tensor or a sequence of 2-D tensors, got shape "
                             f"{tuple(values.shape)}")
        stacked = values
    else:
        values = list(values)
        for i, value in enumerate(values):
            check_2d(f"{name}[{i}]", value)
            if value.shape != values[0].shape:
                raise ValueError(f"{name}[{i}]: every {item} must have shape {tuple(values[0].shape)}, {item} {i} "
                                 f"has {tuple(value.shape)}")
        stacked = torch.stack(values) if values else None
    if stacked is None or stacked.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one {item} is needed")
    return stacked


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
    return torch.autocast(x.device.type, enabled=False)


def check_unit_interval(name: str, value: float) -> None:
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_class_vector(name: str, vector: Tensor, k: int, of: str = "") -> None:
    """`vector` is a (K,) tensor, one entry per class (a class distribution, prior or adjustment): ValueError naming
    it and the expected shape otherwise. `of` names what K is the class dimension of (e.g. ' of probs')."""
    if not hasattr(vector, "shape") or tuple(vector.shape) != (k,):
        raise ValueError(f"{name} must have shape ({k},) like the class dimension{of}, got "
                         f"{tuple(getattr(vector, 'shape', ()))}")


def check_class_dim(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """a, b: (·, K) tensors that must agree on the class dimension K (their batch sizes may differ)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{name_a} and {name_b} must have the same number of classes (last dimension), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def check_labels(name: str, labels: Tensor, n: int, num_classes: int) -> None:
    """labels: (n,) integer class indices in [0, num_classes)."""
    if not hasattr(labels, "dtype") or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                             torch.uint8):
        raise ValueError(f"{name} must be an integer tensor of class indices, got {getattr(labels, 'dtype', labels)!r}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{name} must be class indices in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def check_views(groups: list[tuple[str, list[Tensor]]], reference: str, shape: torch.Size) -> None:
    """Every view in every (name, views) group is a 2-D (N, K) tensor of `shape`, the shape of `reference`."""
    for name, views in groups:
        for i, view in enumerate(views):
            check_2d(f"{name}[{i}]", view)
            if view.shape != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(view.shape)}, expected {tuple(shape)} (N, K) like "
                                 f"{reference}")
