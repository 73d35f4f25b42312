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
"""
from __future__ import annotations

import os

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
}


def limit(name: str) -> int:
    """The cap `name` (a key of DEFAULTS), from the environment variable SSL_KIT_<name> when set."""
    variable = f"SSL_KIT_{name}"
    text = os.environ.get(variable)
    if text is None:
        return DEFAULTS[name]
    try:
        value = int(float(text))
    except (ValueError, OverflowError):
        raise ConfigError(f"environment variable {variable}={text!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"environment variable {variable}={text!r} must be positive")
    return value


def how_to_raise(name: str) -> str:
    """The sentence every over-the-cap error ends with."""
    return f"the limit is {limit(name):,} (raise it with the environment variable SSL_KIT_{name})"
