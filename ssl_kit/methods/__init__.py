"""Training methods, one file each. Importing this package imports every module in it, so each method's
`@register(...)` runs and its stage config becomes part of the recipe schema (see registry.py)."""
from __future__ import annotations

import importlib
import pkgutil

from .base import Method, Progress
from .registry import build_method, method_options, register, registered_methods

_SUPPORT_MODULES = {"base", "registry", "pretext", "semi", "param_groups", "momentum", "thresholds"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Method", "Progress", "build_method", "method_options", "register", "registered_methods"]
