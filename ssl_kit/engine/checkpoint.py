"""Checkpoint files: atomic writes, safe loads (weights_only), and the backbone.pt format.

backbone.pt = {"format": "ssl_kit.backbone", "version": 1, "arch", "kwargs", "data": DataInfo dict,
               "state_dict", optional "head": {"state_dict", "num_classes"}}
A training checkpoint = {"format": "ssl_kit.checkpoint", "version": 1, "stage", "step", "method", "optimizer",
               "scaler", "ema", "rng", "backbone": {arch, kwargs, data}, ...}
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..common.files import safe_load  # noqa: F401  (public here: every checkpoint read goes through it)
from ..errors import CheckpointError
from ..models.registry import build_from_record  # noqa: F401  (public here: records in, modules out)

BACKBONE_FORMAT = "ssl_kit.backbone"
CHECKPOINT_FORMAT = "ssl_kit.checkpoint"


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash never leaves a truncated file.
    On failure (disk full, ...) the previous file at `path` is untouched and CheckpointError is raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        if isinstance(exc, OSError):
            raise CheckpointError(f"could not write checkpoint {str(path)!r}: {exc}; the previous file is intact") from exc
        raise


def backbone_record(arch: str, kwargs: dict, data_info: dict, backbone: nn.Module,
                    head: Optional[nn.Linear] = None) -> dict:
    record = {"format": BACKBONE_FORMAT, "version": 1, "arch": arch, "kwargs": dict(kwargs), "data": dict(data_info),
              "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()}}
    if head is not None:
        record["head"] = {"state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                          "num_classes": head.out_features}
    return record


def _extract_prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def resolve_checkpoint(path: str | Path, arch: Optional[str] = None) -> dict:
    """A backbone.pt, a run directory or a training checkpoint -> a backbone record (see module doc).
    Also another repo's checkpoint, `[LAYOUT:]FILE[@ARCH]` (.pth or .safetensors), its layout detected unless
    given and the architecture from `arch` / '@ARCH' when the file does not record it (models/foreign.py)."""
    from ..models import foreign

    layout, path, arch = foreign.split_reference(str(path), arch)
    path = Path(path)
    if path.is_dir():
        candidate = path / "backbone.pt"
        if not candidate.is_file():
            raise CheckpointError(f"run directory {str(path)!r} has no backbone.pt (has the run finished a training stage?)")
        path = candidate
    data = foreign.read_safetensors(path) if path.suffix == ".safetensors" else safe_load(path)
    kind = data.get("format")
    if layout is not None or kind is None:  # another repo's layout; ssl_kit files record their own arch
        return {"format": BACKBONE_FORMAT, "version": 1, **foreign.foreign_record(data, str(path), layout, arch)}
    if kind == BACKBONE_FORMAT:
        return data
    if kind == CHECKPOINT_FORMAT:
        meta = data.get("backbone") or {}
        state = _extract_prefixed(data["method"], meta.get("backbone_prefix", "backbone."))
        record = {"format": BACKBONE_FORMAT, "version": 1, "arch": meta["arch"], "kwargs": meta["kwargs"],
                  "data": meta["data"], "state_dict": state}
        head = _extract_prefixed(data["method"], meta["head_prefix"]) if meta.get("head_prefix") else {}
        if "weight" in head:
            record["head"] = {"state_dict": head, "num_classes": int(head["weight"].shape[0])}
        return record
    raise CheckpointError(
        f"{str(path)!r} is not an ssl_kit backbone or training checkpoint (format field: {kind!r}); "
        f"expected a run's backbone.pt, a run directory or checkpoints/last.pt"
    )


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuild a backbone from backbone.pt, a run dir or a training checkpoint alone.
    Returns an nn.Module in eval mode: images (N, C, H, W) -> features (N, num_features), with .data_info."""
    return build_from_record(resolve_checkpoint(path)).eval()
