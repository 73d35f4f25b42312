"""ssl_kit: semi-supervised and self-supervised training of image backbones on one shared engine.

`import ssl_kit` is light (no torch): the names below resolve on first use (PEP 562), so `ssl-kit --help` and
`import ssl_kit.losses` do not pay for every method, timm, kornia and pydantic. The method registry fills when
`ssl_kit.methods` is imported; the recipe schema (config.py) imports it itself before validating.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> (module, attribute); attribute None: the module itself
_LAZY = {
    "methods": ("ssl_kit.methods", None),
    "load_backbone": ("ssl_kit.engine.checkpoint", "load_backbone"),
    "SslKitError": ("ssl_kit.errors", "SslKitError"),
    "ConfigError": ("ssl_kit.errors", "ConfigError"),
    "DataError": ("ssl_kit.errors", "DataError"),
    "CheckpointError": ("ssl_kit.errors", "CheckpointError"),
    "TrainingError": ("ssl_kit.errors", "TrainingError"),
}

__all__ = ["__version__", "methods", "load_backbone", "SslKitError", "ConfigError", "DataError", "CheckpointError",
           "TrainingError"]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from . import methods
    from .engine.checkpoint import load_backbone
    from .errors import CheckpointError, ConfigError, DataError, SslKitError, TrainingError


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ssl_kit' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
