"""Resource caps on untrusted input (recipes, dataset files, images, checkpoints), checked before anything is
allocated. Each cap has a default that fits every bundled recipe and real dataset with room to spare; raise one by
setting its environment variable (e.g. ``SSL_KIT_MAX_DATA_BYTES=64e9``).

| cap                | default        | bounds                                                              |
| ------------------ | -------------- | ------------------------------------------------------------------- |
| MAX_RECIPE_BYTES   | 1 MiB          | size of a recipe file or config.yaml read back on --resume          |
| MAX_YAML_NODES     | 100 000        | YAML nodes after alias expansion (a recipe has a few hundred)       |
| MAX_YAML_CHARS     | 4 000 000      | characters of all scalars after alias expansion                     |
| MAX_YAML_DEPTH     | 48             | nesting depth of a YAML document                                    |
| MAX_DATA_BYTES     | 16 GiB         | pixels a dataset file declares (IDX header, CIFAR/STL/SVHN arrays)  |
| MAX_IMAGE_PIXELS   | 89 478 485     | width × height of one image file (PIL's own warning level)          |
| MAX_PARAMS         | 2 000 000 000  | parameters of a backbone built from a recipe or a checkpoint        |
| MAX_ARCH_INT       | 65 536         | any integer architecture setting (width, depth, patch size, ...)    |
| MAX_BATCH_PIXELS   | 2**31          | images per step (batch × (1 + mu)) × channels × image_size²         |
| MAX_LIST_BYTES     | 2 GiB          | size of a file list (filelist:FILE, data.labels CSV)                |
| MAX_LIST_LINE_BYTES| 65 536         | one line of a file list (a path is at most 4 096 bytes on Linux)    |
| MAX_SHARDS         | 1 000 000      | shard paths a webdataset brace pattern or glob expands to           |

Every SSL_KIT_* variable (the caps above, SSL_KIT_DIST_TIMEOUT_MIN, SSL_KIT_EVAL_CHUNK_ROWS) is read by one
parser, `knob`, with its kind and range in KNOBS: a value that is not a finite number of that kind in range (abc,
0, negative, NaN) is a ConfigError naming the variable, the value and the range; the CLI checks every set one
first (`check_environment`). SSL_KIT_CACHE (the cache folder, `cache_root`): an unusable one (a file, not
creatable or not writable) is an error naming it, never a silent run without a cache.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

from .errors import ConfigError

DEFAULTS = {
    "MAX_RECIPE_BYTES": 1 << 20,
    "MAX_YAML_NODES": 100_000,
    "MAX_YAML_CHARS": 4_000_000,
    "MAX_YAML_DEPTH": 48,
    "MAX_DATA_BYTES": 16 << 30,
    "MAX_IMAGE_PIXELS": 89_478_485,
    "MAX_PARAMS": 2_000_000_000,
    "MAX_ARCH_INT": 65_536,
    "MAX_BATCH_PIXELS": 1 << 31,
    "MAX_LIST_BYTES": 2 << 30,
    "MAX_LIST_LINE_BYTES": 1 << 16,
    "MAX_SHARDS": 1_000_000,
}


# every other SSL_KIT_* knob: (kind, default, low, high); parsed by knob() with the same errors as the caps
KNOBS = {
    "SSL_KIT_DIST_TIMEOUT_MIN": (float, 60.0, 0.1, 7 * 24 * 60),  # collective timeout of a distributed run
    "SSL_KIT_EVAL_CHUNK_ROWS": (int, None, 1, 1 << 30),           # rows per chunk of mapped evaluation
}
for _name, _default in DEFAULTS.items():
    KNOBS[f"SSL_KIT_{_name}"] = (int, _default, 1, 1 << 62)
CACHE_VARIABLE = "SSL_KIT_CACHE"


def knob(variable: str, default=None, kind=None, low=None, high=None):
    """The value of the environment variable `variable` (a key of KNOBS, whose kind, default and range the other
    arguments override), or its default when unset or empty. ConfigError naming the variable, the value and the
    range when it is not a finite number of that kind within [low, high] (abc, 0, -1, nan, inf, 1.5 for an int)."""
    spec = KNOBS.get(variable, (int, None, None, None))
    kind = kind or spec[0]
    default = spec[1] if default is None else default
    low, high = spec[2] if low is None else low, spec[3] if high is None else high
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    expected = f"{'an integer' if kind is int else 'a number'} in [{low:,}, {high:,}]"
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not math.isfinite(number) or kind is int and number != int(number) or not low <= number <= high:
        raise ConfigError(f"environment variable {variable}={text!r} is not {expected} (unset it for the default "
                          f"{default})")
    return int(number) if kind is int else number


def limit(name: str) -> int:
    """The cap `name` (a key of DEFAULTS), from the environment variable SSL_KIT_<name> when set (knob())."""
    return knob(f"SSL_KIT_{name}")


def cache_root(default) -> Optional[Path]:
    """The folder of ssl_kit's on-disk caches: $SSL_KIT_CACHE, else `default`. An unusable one (a file, a folder
    that cannot be created or written) is an error naming the variable: one behaviour on every path (no silent
    fall-back to running without a cache, no traceback)."""
    text = os.environ.get(CACHE_VARIABLE, "").strip()
    root = Path(text).expanduser() if text else Path(default)
    where = f"environment variable {CACHE_VARIABLE}={text!r}" if text else f"cache folder {str(root)!r}"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{where} is a file, not a folder: point it at a writable folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{where} cannot be created ({exc.strerror}): point it at a writable folder") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} is not writable: point it at a writable folder")
    return root


def check_environment() -> None:
    """Every SSL_KIT_* knob that is set, parsed once (the CLI calls this first): a bad value fails the command
    with one clear error instead of failing later, or being taken for a bad input file."""
    for variable in KNOBS:
        if os.environ.get(variable, "").strip():
            knob(variable)
    if os.environ.get(CACHE_VARIABLE, "").strip():
        root = Path(os.environ[CACHE_VARIABLE]).expanduser()
        if root.exists() and not root.is_dir():
            raise ConfigError(f"environment variable {CACHE_VARIABLE}={os.environ[CACHE_VARIABLE]!r} is a file, "
                              f"not a folder: point it at a writable folder")


def how_to_raise(name: str) -> str:
    """The sentence every over-the-cap error ends with."""
    return f"the limit is {limit(name):,} (raise it with the environment variable SSL_KIT_{name})"
