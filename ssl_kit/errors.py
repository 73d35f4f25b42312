"""Exceptions that ssl_kit raises for bad input. Each names the key, file or value at fault."""


class SslKitError(Exception):
    """Base class of every error ssl_kit raises on purpose (bad input, bad state)."""


class ConfigError(SslKitError, ValueError):
    """A recipe or override is invalid: unknown key, wrong type or impossible value."""


class DataError(SslKitError, ValueError):
    """A dataset spec, root or file is missing, malformed or inconsistent."""


class CheckpointError(SslKitError, ValueError):
    """A checkpoint is missing, unsafe, of another format or of another architecture."""


class TrainingError(SslKitError, RuntimeError):
    """Training cannot go on (non-finite loss or gradients, a failed rank)."""
