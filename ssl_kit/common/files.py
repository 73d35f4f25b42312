"""Reading torch files safely: `torch.load(weights_only=True)` — tensors and plain containers only, never code —
after checking that the path is a regular file and that a zip checkpoint does not declare far more bytes than it
holds. Every checkpoint, backbone and weights file ssl_kit reads goes through `safe_load`; errors name the slot."""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError


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
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:  # 'zip file version 6.4'
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


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (bounded memory for any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
