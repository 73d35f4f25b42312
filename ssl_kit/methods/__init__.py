"""Method registry: stage `method` name -> class. One file per method."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Method, Progress
from .supervised import Supervised


def _registry() -> dict[str, type]:
    from .contrastive import MoCoV2, MoCoV3, SimCLR
    from .dino import DINO
    from .fixmatch import FixMatch
    from .kd import KnowledgeDistillation
    from .masked import MAE, SimMIM

    return {"supervised": Supervised, "simclr": SimCLR, "mocov2": MoCoV2, "mocov3": MoCoV3, "fixmatch": FixMatch,
            "kd": KnowledgeDistillation, "dino": DINO, "mae": MAE, "simmim": SimMIM}


def build_method(name: str, check_only: bool = False) -> type:
    """The class implementing training method `name`; ConfigError listing the known ones otherwise."""
    methods = _registry()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r} (known: {', '.join(sorted(methods))})")
    return methods[name]


__all__ = ["Method", "Progress", "build_method"]
