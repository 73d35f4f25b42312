"""Exceptions that ssl_kit raises for bad input. Each names the key, file or value at fault."""


class SslKitError(Exception):
    """Base class of every error ssl_kit raises on purpose (bad input, bad state)."""


def reword(exc: BaseException, message: str) -> BaseException:
    """`exc` with `message` as its text, its type and any further args kept (a BadImage stays a BadImage, so the
    exit code and handlers that match on the type still do); for `raise` after adding the key or flag at fault."""
    exc.args = (message, *exc.args[1:])
    return exc


class ConfigError(SslKitError, ValueError):
    """A recipe or override is invalid: unknown key, wrong type or impossible value."""


class DataError(SslKitError, ValueError):
    """A dataset spec, root or file is missing, malformed or inconsistent."""


class CheckpointError(SslKitError, ValueError):
    """A checkpoint is missing, unsafe, of another format or of another architecture."""


class TrainingError(SslKitError, RuntimeError):
    """Training cannot go on (non-finite loss or gradients, a failed rank)."""


class TrainingInterrupted(SslKitError):
    """SIGINT/SIGTERM arrived: a checkpoint was saved at the step boundary; `--resume` continues."""

    def __init__(self, message: str, signal_number: int, run_dir=None) -> None:
        super().__init__(message)
        self.signal_number = signal_number
        self.run_dir = run_dir  # the run directory to resume (the CLI builds the exact command from it)


class UsageError(ConfigError):
    """A command-line argument is missing, malformed or out of range."""
