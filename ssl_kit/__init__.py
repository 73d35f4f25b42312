"""ssl_kit: semi-supervised and self-supervised training of image backbones on one shared engine."""
from . import methods  # noqa: F401  (registers every method's stage config with the recipe schema)
from ._version import __version__  # noqa: F401
from .engine.checkpoint import load_backbone
from .errors import CheckpointError, ConfigError, DataError, SslKitError, TrainingError

__all__ = ["methods", "load_backbone", "SslKitError", "ConfigError", "DataError", "CheckpointError", "TrainingError"]
