"""Bounds on architectures described by untrusted metadata (a checkpoint's arch/kwargs, a recipe's backbone.kwargs):
settings within MAX_ARCH_INT and finite, and a network measured on the meta device (shapes only, no memory) against
MAX_PARAMS and the weights actually present — before anything is allocated. `build_from_record` rebuilds a record's
backbone (registry.py) only after those checks."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError, SslKitError
from ..limits import how_to_raise, limit
from .registry import build_backbone


def check_arch_value(value: Any, where: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str) and len(value) <= 256:
        return
    if isinstance(value, int):
        if abs(value) > limit("MAX_ARCH_INT"):
            raise CheckpointError(f"{where} = {value} is beyond any real architecture; {how_to_raise('MAX_ARCH_INT')}")
        return
    if isinstance(value, float):
        if value != value or abs(value) == float("inf"):
            raise CheckpointError(f"{where} = {value} is not finite")
        return
    if isinstance(value, (list, tuple)) and len(value) <= 64:
        for i, item in enumerate(value):
            check_arch_value(item, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} holds a {type(value).__name__} ({str(value)[:60]}), not an architecture setting")


class _LargeOnMeta(TorchFunctionMode):
    """While active, tensor factories asked for ≥ 4096 elements allocate on the meta device (shape only, no memory);
    small ones (drop-path rates, position tables) stay real so constructors that read them still work."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            size = args[0] if args and isinstance(args[0], (tuple, list, torch.Size)) else \
                [a for a in args if isinstance(a, int)]
            if math.prod(int(n) for n in size) >= 4096:
                kwargs["device"] = "meta"
        return func(*args, **kwargs)


def check_architecture(arch: str, kwargs: dict, channels: int, image_size: int, where: str,
                       state_dict: Optional[dict] = None) -> nn.Module:
    """Build the network on the meta device (no memory) and check its size against MAX_PARAMS and, when given,
    `state_dict`'s names and shapes against it: a crafted checkpoint cannot make us allocate a giant network.
    -> the skeleton (tensors of >= 4096 elements on the meta device: shapes only, for fitting key names)."""
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{where}: kwargs is a {type(kwargs).__name__}, expected a mapping")
    for key, value in kwargs.items():
        check_arch_value(value, f"{where}: kwargs.{key}")
    for key, value in (("channels", channels), ("image_size", image_size)):
        check_arch_value(value, f"{where}: {key}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{where}: {key} = {value!r}, expected a positive integer")
    with torch.random.fork_rng(devices=[]), _LargeOnMeta():  # measuring must not move the global RNG
        try:
            skeleton = build_backbone(arch, channels, image_size, kwargs)
        except SslKitError:
            raise
        except (RuntimeError, NotImplementedError, ZeroDivisionError, OverflowError, MemoryError, AssertionError,
                ValueError, TypeError, IndexError, KeyError) as exc:  # constructors reject bad values many ways
            raise CheckpointError(f"{where}: backbone {arch!r} {kwargs} cannot be built: "
                                  f"{type(exc).__name__}: {str(exc)[:300]}") from None
    params = sum(p.numel() for p in skeleton.parameters())
    if params > limit("MAX_PARAMS"):
        raise CheckpointError(f"{where}: backbone {arch!r} {kwargs} would have {params:,} parameters; "
                              f"{how_to_raise('MAX_PARAMS')}")
    if state_dict is None:
        return skeleton
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} in the file, {shape} in the network" for k, shape in expected.items()
             if k in state_dict and tuple(state_dict[k].shape) != shape]
    problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                f"wrong shapes {wrong[:3]}" if wrong else ""]
    if any(problems):
        raise CheckpointError(f"{where}: weights do not fit backbone {arch!r} {kwargs}: "
                              f"{'; '.join(p for p in problems if p)}")
    return skeleton


def build_from_record(record: dict) -> nn.Module:
    """Rebuild the backbone of a record, load its weights; attaches .data_info, .arch and .arch_kwargs. The
    architecture is checked against MAX_PARAMS and the weights present before the network is allocated
    (check_architecture)."""
    info = record["data"]
    check_architecture(record["arch"], record["kwargs"], info["channels"], info["image_size"],
                       f"checkpoint of {record['arch']!r}", record["state_dict"])
    backbone = build_backbone(record["arch"], info["channels"], info["image_size"], record["kwargs"])
    try:
        backbone.load_state_dict(record["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"weights do not fit backbone {record['arch']!r} {record['kwargs']}: {first}") from None
    backbone.data_info = info
    backbone.arch = record["arch"]
    backbone.arch_kwargs = dict(record["kwargs"])
    return backbone
