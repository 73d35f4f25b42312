"""Checkpoint files: atomic writes, safe loads (weights_only), and the backbone.pt format.

backbone.pt = {"format": "ssl_kit.backbone", "version": 1, "arch", "kwargs", "data": DataInfo dict,
               "state_dict", optional "head": {"state_dict", "num_classes"}}
A training checkpoint = {"format": "ssl_kit.checkpoint", "version": 1, "stage", "step", "method", "optimizer",
               "scaler", "ema", "rng", "backbone": {arch, kwargs, data}, ...}
"""
from __future__ import annotations

import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointError

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


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves a truncated file.
    On failure (disk full, ...) the previous file at `path` is untouched and CheckpointError is raised."""
    path = Path(path)
    handle, tmp_name = _temp_beside(path)
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        cause = _os_error_in(exc)  # torch's zip writer reports a failed write as RuntimeError at its finalisation
        if cause is not None:
            raise CheckpointError(f"could not write checkpoint {str(path)!r}: {cause}; the previous file is "
                                  f"intact") from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file through a temp file + rename; on failure (disk full, read-only) the previous file is
    intact and CheckpointError names the file and the OS error."""
    path = Path(path)
    handle, tmp_name = _temp_beside(path)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as tmp:
            tmp.write(text)
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write {str(path)!r}: {exc.strerror or exc}; the previous file is "
                                  f"intact") from exc
        raise


def _require_regular_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{what} {str(path)!r} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} is not a regular file (a device, FIFO or socket); give a "
                              f"checkpoint file")


def _unpickling_detail(exc: Exception) -> str:
    """torch's weights_only refusal without its advice to retry with weights_only=False (which could run code)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and "Weights only load failed" not in line
            and "Check the documentation" not in line]
    return (kept[0] if kept else "not a torch checkpoint")[:300]


def _check_zip_sizes(path: Path, what: str) -> None:
    """A torch zip checkpoint stores its tensors uncompressed: refuse members declaring far more bytes than the file
    holds (a zip bomb would allocate them before any tensor is checked)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{what} {str(path)!r} is a corrupt zip archive: {exc}") from None
    if declared > 4 * size + (1 << 20):
        raise CheckpointError(f"{what} {str(path)!r} declares {declared:,} bytes of content in a {size:,}-byte file "
                              f"(compressed members; torch.save never writes these): refusing to expand it")


def safe_load(path: str | Path, what: str = "checkpoint") -> dict:
    """torch.load(weights_only=True): tensors and plain containers only. Anything else is refused unread.
    `what` names the slot in errors (e.g. 'init checkpoint', 'resume checkpoint')."""
    path = Path(path)
    _require_regular_file(path, what)
    _check_zip_sizes(path, what)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {what} {str(path)!r}: it holds objects other than tensors and plain containers, or "
            f"is not a torch file (loading such a file could run code). Details: {_unpickling_detail(exc)}"
        ) from None
    except MemoryError:
        raise CheckpointError(f"{what} {str(path)!r} needs more memory than is available") from None
    except Exception as exc:  # torch, zipfile and pickle raise many types for corrupt bytes
        detail = _unpickling_detail(exc) if str(exc).strip() else "the file ends early"
        raise CheckpointError(f"{what} {str(path)!r} is not a readable torch file ({type(exc).__name__}: "
                              f"{detail})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a {type(data).__name__}, not a dict")
    return data


def backbone_record(arch: str, kwargs: dict, data_info: dict, backbone: nn.Module,
                    head: Optional[nn.Linear] = None) -> dict:
    record = {"format": BACKBONE_FORMAT, "version": 1, "arch": arch, "kwargs": dict(kwargs), "data": dict(data_info),
              "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}}
    if head is not None:
        record["head"] = {"state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
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


def _check_arch_value(value: Any, where: str) -> None:
    from ..limits import how_to_raise, limit

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
            _check_arch_value(item, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} holds a {type(value).__name__} ({str(value)[:60]}), not an architecture setting")


def validate_record(record: dict, where: str) -> dict:
    """Check a backbone record's fields (types, bounds) before anything is built from it. -> record."""
    arch = _need(record, "arch", str, where)
    kwargs = _need(record, "kwargs", dict, where)
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: kwargs key {key!r} is not a string")
        _check_arch_value(value, f"{where}: kwargs.{key}")
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
    _check_state_dict(record.get("state_dict"), f"{where}: state_dict")
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


def resolve_checkpoint(path: str | Path, what: str = "checkpoint") -> dict:
    """A backbone.pt, a run directory or a training checkpoint -> a validated backbone record (see module doc).
    `what` names the slot in errors ('init checkpoint', 'teacher checkpoint', ...)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "backbone.pt"
        if not candidate.is_file():
            raise CheckpointError(f"{what}: run directory {str(path)!r} has no backbone.pt (has the run finished a "
                                  f"training stage?)")
        path = candidate
    data = safe_load(path, what)
    kind = data.get("format")
    where = f"{what} {str(path)!r}"
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
        if torch.is_tensor(head.get("weight")) and head["weight"].ndim == 2:
            record["head"] = {"state_dict": head, "num_classes": int(head["weight"].shape[0])}
        return validate_record(record, where)
    raise CheckpointError(
        f"{where} is not an ssl_kit backbone or training checkpoint (format field: {str(kind)[:80]!r}); "
        f"expected a run's backbone.pt, a run directory or checkpoints/last.pt"
    )


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
                       state_dict: Optional[dict] = None) -> None:
    """Build the network on the meta device (no memory) and check its size against MAX_PARAMS and, when given,
    `state_dict`'s names and shapes against it: a crafted checkpoint cannot make us allocate a giant network."""
    from ..limits import how_to_raise, limit
    from ..models.registry import build_backbone

    for key, value in kwargs.items():
        _check_arch_value(value, f"{where}: kwargs.{key}")
    with _LargeOnMeta():
        try:
            skeleton = build_backbone(arch, channels, image_size, kwargs)
        except (RuntimeError, NotImplementedError, ZeroDivisionError, OverflowError, MemoryError) as exc:
            raise CheckpointError(f"{where}: backbone {arch!r} {kwargs} cannot be built: {exc}") from None
    params = sum(p.numel() for p in skeleton.parameters())
    if params > limit("MAX_PARAMS"):
        raise CheckpointError(f"{where}: backbone {arch!r} {kwargs} would have {params:,} parameters; "
                              f"{how_to_raise('MAX_PARAMS')}")
    if state_dict is None:
        return
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


def build_from_record(record: dict) -> nn.Module:
    """Rebuild the backbone of a record, load its weights; attaches .data_info and .arch. The architecture is
    checked against MAX_PARAMS and the weights present before the network is allocated."""
    from ..models.registry import build_backbone

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
    return backbone


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuild a backbone from backbone.pt, a run dir or a training checkpoint alone.
    Returns an nn.Module in eval mode: images (N, C, H, W) -> features (N, num_features), with .data_info."""
    return build_from_record(resolve_checkpoint(path)).eval()
