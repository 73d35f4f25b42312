"""The registry of dataset kinds: the NAME of a `NAME[:ARG][,key=value...]` spec.

A kind says what its ARG is (nothing, a root folder, an optional root, an angle), which spec options it takes
beyond the common `test_fraction` and `seed`, how its splits load into memory, and, for a file-indexed kind that
can stream, how its file index is built (sources.py caches it). Spec parsing (specs.py), loading, the streamed
training path (pipeline.py), evaluation and the `ssl-kit data` command all ask this registry, so a new source is
one module with its loader plus one `register_kind` call in catalog.py.

This module holds only the registry; the kinds themselves are registered by catalog.py, which the `ssl_kit.data`
package imports first.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from ..errors import DataError

Argument = Literal["none", "root", "optional_root", "angle"]
COMMON_OPTIONS = ("test_fraction", "seed")  # every kind: the holdout of a source without a test split of its own
STREAM_OPTIONS = ("labels", "storage")  # every file-indexed kind


@dataclass(frozen=True)
class DatasetKind:
    """One kind of dataset.

    load(spec, folder_size) -> {'train', 'test'[, 'unlabeled']} ImageSets of uint8 (N, C, H, W) at the source's own
    size: a kind with files of its own format. index(source, location, arg, workers) -> sources.IndexBuild: the
    file table of a file-indexed kind, which can stream and loads into memory through its index (one or the
    other)."""

    name: str
    summary: str
    argument: Argument = "root"
    load: Optional[Callable] = None
    index: Optional[Callable] = None
    download: Optional[Callable[[Path], None]] = None
    options: tuple[str, ...] = ()
    unlabeled: bool = False  # holds no labels of its own: only a labels CSV gives it some

    @property
    def streams(self) -> bool:
        """Whether the kind is file-indexed: it can stream (data.storage) and take a labels CSV."""
        return self.index is not None

    def accepted_options(self) -> tuple[str, ...]:
        return COMMON_OPTIONS + self.options + (STREAM_OPTIONS if self.streams else ()) + \
            (("download",) if self.download else ())


KINDS: dict[str, DatasetKind] = {}


def register_kind(kind: DatasetKind) -> DatasetKind:
    """Add a kind; a name is registered once, and a kind has a loader or a file-index builder (one of them)."""
    if kind.name in KINDS:
        raise ValueError(f"dataset kind {kind.name!r} is already registered")
    if (kind.load is None) == (kind.index is None):
        raise ValueError(f"dataset kind {kind.name!r} needs a loader or a file-index builder, not both")
    KINDS[kind.name] = kind
    return kind


def dataset_kind(name: str, spec: Optional[str] = None) -> DatasetKind:
    """The registered kind called `name`; a DataError naming the spec and the known kinds otherwise."""
    if name not in KINDS:
        where = f" in spec {spec!r}" if spec is not None else ""
        raise DataError(f"unknown dataset {name!r}{where} (known: {', '.join(KINDS)}){spec_hint(spec)}")
    return KINDS[name]


def spec_hint(spec: Optional[str]) -> str:
    """For a spec that is a bare path (what a new user types first), the spec that names it: '; PATH is a
    folder: write imagefolder:PATH ...'; '' otherwise."""
    if not spec:
        return ""
    text = spec.split(",")[0].strip()
    try:
        path = Path(text)
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError):  # a name too long for a path, a NUL byte
        return ""
    if is_dir:
        return (f"; {text!r} is a folder: write imagefolder:{text} (one sub-folder per class) or images:{text} "
                f"(unlabeled images, any layout)")
    if is_file and text.endswith(".tar"):
        return f"; {text!r} is a tar file: write webdataset:{text}"
    if is_file:
        return f"; {text!r} is a file: write filelist:{text} for a list of image paths (path[,label] per line)"
    return ""


def streamed_kinds() -> tuple[str, ...]:
    """Names of the file-indexed kinds (imagefolder, images, filelist, webdataset, ...)."""
    return tuple(name for name, kind in KINDS.items() if kind.streams)
