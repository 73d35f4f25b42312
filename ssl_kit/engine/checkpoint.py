"""Checkpoint files: atomic writes, safe loads (weights_only), and the backbone.pt format.

backbone.pt = {"format": "ssl_kit.backbone", "version": 1, "arch", "kwargs", "data": DataInfo dict,
               "state_dict", optional "head": {"state_dict", "num_classes"}}
A training checkpoint = {"format": "ssl_kit.checkpoint", "version": 1, "stage", "step", "method", "optimizer",
               "scaler", "ema", "rng", "backbone": {arch, kwargs, data}, ...}
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..common.files import safe_load
from ..errors import CheckpointError
from ..models import foreign
from ..models.bounds import build_from_record, check_arch_value  # noqa: F401  (build_from_record: public here)

__all__ = ["atomic_save", "atomic_write_text", "safe_load", "backbone_record", "validate_record",
           "resolve_checkpoint", "build_from_record", "load_backbone", "BACKBONE_FORMAT", "CHECKPOINT_FORMAT"]

BACKBONE_FORMAT = "ssl_kit.backbone"
CHECKPOINT_FORMAT = "ssl_kit.checkpoint"


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """exc itself or the first OSError in its __context__ chain (None when there is none)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__context__, seen + 1
    return None


def _temp_beside(path: Path) -> tuple[int, str]:
    """mkstemp '.<name>.XXXXXXXX.tmp' in path's folder (created if needed); OSError -> CheckpointError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CheckpointError(f"could not write {str(path)!r}: {exc.strerror or exc}; the previous file is "
                              f"intact") from exc


def _write_atomically(path: str | Path, mode: str, write: Callable[[Any], None], label: str) -> None:
    """write(file) into a temp file beside `path`, flush + fsync, then rename over `path`: a crash never leaves a
    truncated file. On failure the temp file is removed, the previous file at `path` is untouched, and an OS error
    (disk full, read-only, permissions, file size; also when torch's zip writer reports it as a RuntimeError at its
    finalisation) becomes CheckpointError naming `label` and the file."""
    path = Path(path)
    handle, tmp_name = _temp_beside(path)
    try:
        with os.fdopen(handle, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        cause = _os_error_in(exc)
        if cause is not None:
            raise CheckpointError(f"could not write {label}{str(path)!r}: {cause.strerror or cause}; the previous "
                                  f"file is intact") from exc
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through a temp file + fsync + rename (`_write_atomically`); CheckpointError on a disk error."""
    _write_atomically(path, "wb", lambda tmp: torch.save(obj, tmp), "checkpoint ")


def atomic_write_text(path: str | Path, text: str) -> None:
    """A text file through a temp file + fsync + rename (`_write_atomically`); CheckpointError on a disk error."""
    _write_atomically(path, "w", lambda tmp: tmp.write(text), "")


def _portable(state: dict) -> dict:
    """CPU tensors in the default (contiguous) memory layout, whatever layout training used (channels_last)."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def backbone_record(arch: str, kwargs: dict, data_info: dict, backbone: nn.Module,
                    head: Optional[nn.Linear] = None) -> dict:
    record = {"format": BACKBONE_FORMAT, "version": 1, "arch": arch, "kwargs": dict(kwargs), "data": dict(data_info),
              "state_dict": _portable(backbone.state_dict())}
    if head is not None and head.out_features > 0:  # a label-free run (no classes) saves features only
        record["head"] = {"state_dict": _portable(head.state_dict()),
                          "num_classes": head.out_features}
    return record


def _extract_prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)}


def _need(mapping: dict, key: str, kind, where: str):
    """mapping[key], which must be of `kind`, else CheckpointError naming `where`.key."""
    if not isinstance(mapping, dict) or key not in mapping:
        raise CheckpointError(f"{where}: missing key {key!r}")
    value = mapping[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise CheckpointError(f"{where}: {key!r} is a {type(value).__name__}, expected {names}")
    return value


def _check_state_dict(state: Any, where: str) -> None:
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{where}: expected a non-empty dict of name -> tensor, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            raise CheckpointError(f"{where}: entry {str(key)[:80]!r} is a {type(value).__name__}, expected a tensor")


def _is_zero_class_head(head: Any) -> bool:
    """A head entry with no classes (num_classes 0, weight of shape (0, F)): what a label-free run wrote."""
    if not isinstance(head, dict) or head.get("num_classes") != 0:
        return False
    weight = head.get("state_dict", {}).get("weight") if isinstance(head.get("state_dict"), dict) else None
    return torch.is_tensor(weight) and weight.ndim == 2 and weight.shape[0] == 0


def validate_record(record: dict, where: str) -> dict:
    """Check a backbone record's fields (types, bounds) before anything is built from it. -> record."""
    arch = _need(record, "arch", str, where)
    kwargs = _need(record, "kwargs", dict, where)
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: kwargs key {key!r} is not a string")
        check_arch_value(value, f"{where}: kwargs.{key}")
    data = _need(record, "data", dict, where)
    channels = _need(data, "channels", int, f"{where}: data")
    image_size = _need(data, "image_size", int, f"{where}: data")
    if channels not in (1, 3):
        raise CheckpointError(f"{where}: data.channels is {channels}, expected 1 or 3")
    if not 4 <= image_size <= 4096:
        raise CheckpointError(f"{where}: data.image_size is {image_size}, expected 4..4096")
    for key in ("mean", "std"):
        if key in data:
            values = data[key]
            if (not isinstance(values, (list, tuple)) or len(values) != channels
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
                    or key == "std" and not all(v > 0 for v in values)):
                raise CheckpointError(f"{where}: data.{key} is {str(values)[:80]}, expected {channels} finite "
                                      f"number(s){' > 0' if key == 'std' else ''}")
    ratio = data.get("eval_resize_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise CheckpointError(f"{where}: data.eval_resize_ratio is {str(ratio)[:80]}, expected a number in (0, 1]")
    _check_state_dict(record.get("state_dict"), f"{where}: state_dict")
    if _is_zero_class_head(record.get("head")):
        del record["head"]  # written by label-free runs before 0.1.1: no classifier to keep
    if record.get("head") is not None:
        head = _need(record, "head", dict, where)
        _check_state_dict(head.get("state_dict"), f"{where}: head.state_dict")
        num_classes = _need(head, "num_classes", int, f"{where}: head")
        weight = head["state_dict"].get("weight")
        if weight is None or weight.ndim != 2 or weight.shape[0] != num_classes or not 1 <= num_classes <= 1_000_000:
            shape = None if weight is None else tuple(weight.shape)
            raise CheckpointError(f"{where}: head.num_classes is {num_classes} but head weight has shape {shape}")
    record["arch"] = arch
    return record


def resolve_checkpoint(path: str | Path, what: str = "checkpoint", *, arch: Optional[str] = None) -> dict:
    """A backbone.pt, a run directory, a training checkpoint or an `ssl-kit export` folder (timm, torchvision,
    safetensors) -> a validated backbone record (see module doc).
    Also another repo's checkpoint, `[LAYOUT:]FILE[@ARCH]` (.pth or .safetensors), its layout detected unless
    given and the architecture from `arch` / '@ARCH' when the file does not record it (models/foreign.py).
    `what` names the slot in errors ('init checkpoint', 'teacher checkpoint', ...)."""
    layout, path, arch = foreign.split_reference(str(path), arch)
    path = Path(path)
    if path.is_dir():
        candidate = path / "backbone.pt"
        if not candidate.is_file() and (path / "config.json").is_file():  # an ssl-kit export folder
            return {"format": BACKBONE_FORMAT, "version": 1, **foreign.export_folder_record(path)}
        if not candidate.is_file():
            raise CheckpointError(f"{what}: run directory {str(path)!r} has no backbone.pt (has the run finished a "
                                  f"training stage?)")
        path = candidate
    data = foreign.read_safetensors(path) if path.suffix == ".safetensors" else safe_load(path, what)
    kind = data.get("format")
    where = f"{what} {str(path)!r}"
    if layout is not None or kind is None:  # another repo's layout; ssl_kit files record their own arch
        return {"format": BACKBONE_FORMAT, "version": 1, **foreign.foreign_record(data, str(path), layout, arch)}
    if kind == BACKBONE_FORMAT:
        return validate_record(data, where)
    if kind == CHECKPOINT_FORMAT:
        meta = _need(data, "backbone", dict, where)
        method = _need(data, "method", dict, where)
        prefix = meta.get("backbone_prefix", "backbone.")
        if not isinstance(prefix, str):
            raise CheckpointError(f"{where}: backbone.backbone_prefix is a {type(prefix).__name__}, expected str")
        record = {"format": BACKBONE_FORMAT, "version": 1, "arch": meta.get("arch"), "kwargs": meta.get("kwargs"),
                  "data": meta.get("data"), "state_dict": _extract_prefixed(method, prefix)}
        for key in ("arch", "kwargs", "data"):
            if key not in meta:
                raise CheckpointError(f"{where}: backbone metadata has no {key!r}")
        head_prefix = meta.get("head_prefix")
        head = _extract_prefixed(method, head_prefix) if isinstance(head_prefix, str) and head_prefix else {}
        if torch.is_tensor(head.get("weight")) and head["weight"].ndim == 2 and head["weight"].shape[0] > 0:
            record["head"] = {"state_dict": head, "num_classes": int(head["weight"].shape[0])}
        return validate_record(record, where)
    raise CheckpointError(
        f"{where} is not an ssl_kit backbone or training checkpoint (format field: {str(kind)[:80]!r}); "
        f"expected a run's backbone.pt, a run directory or checkpoints/last.pt"
    )


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuild a backbone from backbone.pt, a run dir or a training checkpoint alone.
    Returns an nn.Module in eval mode: images (N, C, H, W) -> features (N, num_features), with .data_info."""
    return build_from_record(resolve_checkpoint(path)).eval()
