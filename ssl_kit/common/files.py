"""Reading torch files safely: `torch.load(weights_only=True)` — tensors and plain containers only, never code.
Every checkpoint, backbone and weights file ssl_kit reads goes through `safe_load`."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..errors import CheckpointError


def safe_load(path: str | Path) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only. Anything else is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain containers "
            f"(loading it could run code). Details: {str(exc).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch file: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(data).__name__}, not a dict")
    return data
