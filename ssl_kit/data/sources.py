"""File indexes of streamed sources: which images a spec holds, their labels, classes and splits.

    imagefolder:ROOT   ROOT/<class>/**/<image>; with ROOT/train (+ ROOT/val and/or ROOT/test) holding the class
                       folders, each is a split
    images:ROOT        every image under ROOT, unlabeled (label -1)
    filelist:FILE      lines `path[,label]` (CSV, TSV or one path per line); relative paths resolve against FILE's
                       folder; an empty label is unlabeled
    webdataset:PATTERN tar shards `shards-{000000..000127}.tar` (or a glob); members KEY.jpg|jpeg|png|webp and
                       optional KEY.cls (an integer label)

Directories are listed in parallel (a thread pool, one directory per task). The index is cached on disk under
`$SSL_KIT_CACHE` (default `~/.cache/ssl_kit/index`), keyed by the spec (cache_key.py) and validated against the
mtimes and sizes of every indexed directory (or of the list file / shards), so a second `ssl-kit data` or training
start is instant; a damaged, crafted or other-version cache file is rebuilt with a warning. The dataset root is
never written to (read-only roots work).

Names are kept in one numpy byte buffer with offsets rather than a list of Python strings: DataLoader workers
forked from the trainer share those pages instead of copying them on every reference-count change.

Tar shards are read by random access with the standard library's `tarfile`: the index records each member's data
offset and size once, so position -> (shard, offset) is O(1) and any step can be read without replaying the
stream. The `webdataset` library iterates shards sequentially with buffer shuffling, which cannot give an order
that is a pure function of (seed, position) nor an O(1) resume.
"""
from __future__ import annotations

import csv
import glob
import itertools
import json
import os
import re
import stat
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
from braceexpand import UnbalancedBracesError, braceexpand, char_range_re, int_range_re, make_char_range

from ..errors import DataError
from ..limits import cache_root, how_to_raise, limit
from .cache_key import CACHE_FORMAT, cache_key, file_stamps
from .kinds import dataset_kind, streamed_kinds

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SPLIT_FOLDERS = ("train", "val", "test")
CLS_MAX_BYTES = 64  # a tar KEY.cls member holds one class number
BYTES_PER_PIXEL_CAP = 8  # an uncompressed 16-bit RGBA file: no image within MAX_IMAGE_PIXELS needs more
CLASS_NUMBER = re.compile(r"-?[0-9]+")  # ASCII digits: '²'.isdigit() is true, yet int('²') fails
MAX_BRACE_DEPTH = 16  # nesting of a webdataset brace pattern (real ones nest 1 or 2 deep)


def max_image_file_bytes() -> int:
    """The largest image file (or tar member) read: 8 bytes per pixel of MAX_IMAGE_PIXELS, plus 1 MiB of headers;
    a bigger one cannot be an image within the pixel cap, and is never read whole."""
    return BYTES_PER_PIXEL_CAP * limit("MAX_IMAGE_PIXELS") + (1 << 20)


def max_classes() -> int:
    """Class numbers must be below this (MAX_ARCH_INT: a classifier head is an architecture setting): one label
    value such as 1000000000 must not make a billion class names."""
    return limit("MAX_ARCH_INT")


def check_class_numbers(values: list[int], where: str) -> None:
    """Integer labels (class numbers) -> DataError naming `where`, the value and the limit when one is too large."""
    top = max(values, default=-1)
    if top >= max_classes():
        raise DataError(f"{where}: label {top} is not a usable class number: class numbers must be below "
                        f"{max_classes():,}; {how_to_raise('MAX_ARCH_INT')}")


def read_bounded(path: str, length: Optional[int] = None, offset: int = 0) -> bytes:
    """The bytes of a regular file (or `length` bytes at `offset`, a tar member), never blocking on a FIFO nor
    reading a device: OSError naming the reason when `path` is not a regular file or the read exceeds
    max_image_file_bytes()."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path!r} is not a regular file (a device, FIFO or socket)")
        size = info.st_size - offset if length is None else length
        if size > max_image_file_bytes():
            raise OSError(f"{size:,} bytes exceed the image file size cap of {max_image_file_bytes():,} "
                          f"({how_to_raise('MAX_IMAGE_PIXELS')})")
        handle.seek(offset)
        return handle.read(max(0, size))


def _pack(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (uint8 blob, int64 offsets (N+1,))."""
    encoded = [n.encode("utf-8", "surrogateescape") for n in names]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


@dataclass
class FileIndex:
    """N images of a streamed source.

    labels: int64 (N,), -1 = unlabeled; classes: label -> name; splits: split name -> int64 positions (every
    index has 'train'; imagefolder adds 'val'/'test' when those folders exist). Files: `root` joined with the
    relative name. Tar members: `shards[shard[i]]` at byte `offset[i]`, `length[i]` bytes.
    skipped: (path, reason) of entries left out while indexing (symlinks out of the root, loops, dangling).
    """

    source: str
    root: str
    blob: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    classes: list[str]
    splits: dict[str, np.ndarray]
    shards: list[str] = field(default_factory=list)
    shard: Optional[np.ndarray] = None
    offset: Optional[np.ndarray] = None
    length: Optional[np.ndarray] = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def name(self, i: int) -> str:
        """Relative path (files) or 'shard.tar/member' (tar) of image i."""
        raw = self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        return f"{os.path.basename(self.shards[self.shard[i]])}/{raw}" if self.shards else raw

    def path(self, i: int) -> str:
        """What to show the user for image i: the absolute file path, or 'SHARD.tar/member'."""
        if self.shards:
            return f"{self.shards[self.shard[i]]}/{self.name(i).split('/', 1)[1]}"
        return os.path.join(self.root, self.name(i))

    def read(self, i: int) -> bytes:
        """The encoded bytes of image i (read_bounded). Raises OSError when the file is unreadable, not a regular
        file or over the size cap."""
        if self.shards:
            return read_bounded(self.shards[self.shard[i]], int(self.length[i]), int(self.offset[i]))
        return read_bounded(self.path(i))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def nbytes(self) -> int:
        """Memory the index itself takes (arrays only)."""
        arrays = [self.blob, self.offsets, self.labels, *self.splits.values(), self.shard, self.offset, self.length]
        return int(sum(a.nbytes for a in arrays if a is not None))

    def split(self, name: str) -> np.ndarray:
        """Positions of split `name` -> int64 (M,)."""
        if name not in self.splits:
            raise DataError(f"{self.source}: no split {name!r} (splits: {sorted(self.splits)})")
        return self.splits[name]

    def with_labels(self, labels: np.ndarray, classes: list[str]) -> "FileIndex":
        return FileIndex(self.source, self.root, self.blob, self.offsets, labels.astype(np.int64), list(classes),
                         self.splits, self.shards, self.shard, self.offset, self.length, self.skipped)


def _names_blob(index: FileIndex, absolute: bool) -> tuple[np.ndarray, np.ndarray]:
    """index's name blob and offsets; with `absolute`, file names rebuilt as absolute paths (root joined)."""
    if not absolute:
        return index.blob, index.offsets
    return _pack([os.path.join(index.root, index.name(i)) for i in range(len(index))])


def check_appended_classes(name: str, classes: list[str], onto: str, onto_classes: list[str]) -> None:
    """Images of `name` appended to `onto` as an unlabeled pool keep their labels only to score pseudo-labels, so
    their classes must be onto's, or they have none (an unlabeled tree or list)."""
    if classes and classes != onto_classes:
        raise DataError(f"{name} has classes {classes[:10]}, {onto} has {onto_classes[:10]}: an appended domain "
                        f"needs the same classes (or none)")


def join_indexes(first: FileIndex, second: FileIndex) -> FileIndex:
    """first's images, then second's (positions len(first) + i), as one index: another domain's images appended as
    an unlabeled pool. Labels: first's; second's must use the same class names (they are kept for measuring
    pseudo-label accuracy) or be unlabeled. Splits: first's, with second's 'train' split added to 'train'. Files
    under different roots get absolute names; tar shards are listed one after the other. Files and shards cannot
    be joined."""
    if bool(first.shards) != bool(second.shards):
        raise DataError(f"cannot join {first.source} and {second.source}: one is tar shards, the other files")
    check_appended_classes(second.source, second.classes, first.source, first.classes)
    absolute = not first.shards and first.root != second.root
    (first_blob, first_offsets), (second_blob, second_offsets) = (_names_blob(first, absolute),
                                                                  _names_blob(second, absolute))
    blob = np.concatenate([first_blob, second_blob])
    offsets = np.concatenate([first_offsets, second_offsets[1:] + len(first_blob)])
    splits = dict(first.splits)
    splits["train"] = np.concatenate([first.split("train"), second.split("train") + len(first)])
    tar = {}
    if first.shards:
        tar = dict(shards=first.shards + second.shards,
                   shard=np.concatenate([first.shard, second.shard + len(first.shards)]),
                   offset=np.concatenate([first.offset, second.offset]),
                   length=np.concatenate([first.length, second.length]))
    return FileIndex(f"{first.source}+{second.source}", "" if absolute else first.root, blob, offsets,
                     np.concatenate([first.labels, second.labels]), list(first.classes), splits,
                     skipped=first.skipped + second.skipped, **tar)


# ------------------------------------------------------------------------------------------- scanning
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _list_dir(directory: str, root: str) -> tuple[list[str], list[str], list[tuple[str, str]], int]:
    """One directory -> (image files, sub-directories, skipped (path, reason), mtime_ns), all absolute paths."""
    files, dirs, skipped = [], [], []
    try:
        mtime = os.stat(directory).st_mtime_ns
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        return [], [], [(directory, f"cannot list directory: {exc.strerror or exc}")], 0
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if not os.path.exists(target):
                    skipped.append((entry.path, "dangling or looping symlink"))
                    continue
                if not _inside(target, root):
                    skipped.append((entry.path, f"symlink points out of the root to {target}"))
                    continue
            if entry.is_dir():
                dirs.append(entry.path)
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                files.append(entry.path)
        except OSError as exc:
            skipped.append((entry.path, f"cannot stat: {exc.strerror or exc}"))
    return files, dirs, skipped, mtime


def scan_tree(top: str, root: str, workers: int = 8) -> tuple[list[str], dict[str, int], list[tuple[str, str]]]:
    """Every image file under `top` (absolute, sorted), the mtime of every directory visited and what was skipped.
    Directories are listed level by level in a thread pool; a directory reached twice (a symlink loop or an alias)
    is listed once."""
    files, mtimes, skipped = [], {}, []
    seen = {os.path.realpath(top)}
    level = [top]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while level:
            next_level = []
            for directory, (found, subdirs, bad, mtime) in zip(level, pool.map(lambda d: _list_dir(d, root), level)):
                files.extend(found)
                skipped.extend(bad)
                mtimes[directory] = mtime
                for sub in subdirs:
                    real = os.path.realpath(sub)
                    if real in seen:
                        skipped.append((sub, f"directory already indexed (symlink loop or alias of {real})"))
                        continue
                    seen.add(real)
                    next_level.append(sub)
            level = sorted(next_level)
    return sorted(files), mtimes, skipped


def _folder_index(source: str, root: str, workers: int) -> tuple[dict, dict[str, int], list[tuple[str, str]]]:
    """imagefolder: class sub-folders, optional train/val/test split folders."""
    split_dirs = [s for s in SPLIT_FOLDERS if os.path.isdir(os.path.join(root, s))]
    if "train" not in split_dirs:
        split_dirs = []
    parts = [(s, os.path.join(root, s)) for s in split_dirs] or [("train", root)]
    names, labels, split_of, skipped = [], [], [], []
    mtimes = {root: os.stat(root).st_mtime_ns}  # split folders appearing or going change the root's mtime
    classes: list[str] = []
    for split, top in parts:
        files, split_mtimes, split_skipped = scan_tree(top, root, workers)
        mtimes.update(split_mtimes)
        skipped.extend(split_skipped)
        by_class: dict[str, list[str]] = {}
        for path in files:
            relative = os.path.relpath(path, top)
            if os.sep not in relative:
                skipped.append((path, "image directly in the root: imagefolder expects ROOT/<class>/<image>"))
                continue
            by_class.setdefault(relative.split(os.sep, 1)[0], []).append(path)
        if split == "train":
            classes = sorted(by_class)
            if not classes:
                raise DataError(f"{source}: {top!r} has no class sub-folders with images "
                                f"(expected {top}/<class>/<image>; use images:{root} for an unlabeled tree)")
            _refuse_empty_classes(source, top, classes)
        unknown = sorted(set(by_class) - set(classes))
        if unknown:
            raise DataError(f"{source}: split {split!r} has classes {unknown[:10]} that the train split lacks")
        for label, cls in enumerate(classes):
            for path in by_class.get(cls, []):
                names.append(os.path.relpath(path, root))
                labels.append(label)
                split_of.append(split)
    return {"names": names, "labels": labels, "classes": classes, "split_of": split_of}, mtimes, skipped


def _refuse_empty_classes(source: str, top: str, classes: list[str]) -> None:
    """A class folder without images would silently shift every later class number: an error, as in
    torchvision's ImageFolder (hidden folders such as .cache are not classes)."""
    with os.scandir(top) as entries:
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    empty = [name for name in folders if name not in classes]
    if empty:
        raise DataError(f"{source}: class folders without images in {top!r}: {empty[:10]}")


def _images_index(source: str, root: str, workers: int) -> tuple[dict, dict[str, int], list[tuple[str, str]]]:
    files, mtimes, skipped = scan_tree(root, root, workers)
    names = [os.path.relpath(p, root) for p in files]
    return {"names": names, "labels": [-1] * len(names), "classes": [], "split_of": ["train"] * len(names)}, \
        mtimes, skipped


def _class_table(raw: list[str], where: str) -> tuple[list[int], list[str]]:
    """Label strings ('' = unlabeled) -> (ints, classes). All-integer labels keep their values (classes '0'..'K');
    names are numbered in sorted order."""
    given = [r for r in raw if r != ""]
    if all(CLASS_NUMBER.fullmatch(r) for r in given):
        huge = next((r for r in given if len(r.lstrip("-")) > 18), None)
        if huge is not None:
            raise DataError(f"{where}: label {huge[:40]!r}{'...' if len(huge) > 40 else ''} is not a usable class "
                            f"number: class numbers must be below {max_classes():,}; {how_to_raise('MAX_ARCH_INT')}")
        values = [int(r) for r in given]
        if values and min(values) < 0:
            raise DataError(f"{where}: negative label {min(values)} (leave the label empty for an unlabeled image)")
        check_class_numbers(values, where)
        classes = [str(i) for i in range(max(values) + 1)] if values else []
        return [int(r) if r != "" else -1 for r in raw], classes
    classes = sorted(set(given))
    lookup = {c: i for i, c in enumerate(classes)}
    return [lookup[r] if r != "" else -1 for r in raw], classes


def _open_list(path: str):
    """A file list opened for binary reading, never blocking on a FIFO nor reading a device: DataError naming the
    file when it cannot be opened, is not a regular file, or is larger than MAX_LIST_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DataError(f"file list {path!r} cannot be read: {exc.strerror or exc}") from None
    handle = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > limit("MAX_LIST_BYTES"):
        handle.close()
        what = "is not a regular file (a folder, device, FIFO or socket)" if not stat.S_ISREG(info.st_mode) else \
            f"is {info.st_size:,} bytes; {how_to_raise('MAX_LIST_BYTES')}"
        raise DataError(f"file list {path!r} {what}")
    return handle


def _list_lines(handle, path: str) -> Iterator[str]:
    """The decoded lines of an open file list, each read with a bounded readline: DataError naming the file and the
    line for a line longer than MAX_LIST_LINE_BYTES (never read whole), a NUL byte, bytes that are not UTF-8, or a
    file that grows past MAX_LIST_BYTES while it is read."""
    line_cap, total_cap, total = limit("MAX_LIST_LINE_BYTES"), limit("MAX_LIST_BYTES"), 0
    for number in itertools.count(1):
        raw = handle.readline(line_cap + 1)
        if not raw:
            return
        total += len(raw)
        if len(raw) > line_cap and not raw.endswith(b"\n"):
            raise DataError(f"{path}:{number}: a line longer than {line_cap:,} bytes (a row is a path of at most "
                            f"4,096 bytes and a label); {how_to_raise('MAX_LIST_LINE_BYTES')}")
        if total > total_cap:
            raise DataError(f"file list {path!r} grew past {total_cap:,} bytes while read; "
                            f"{how_to_raise('MAX_LIST_BYTES')}")
        if b"\0" in raw:
            column = raw.index(b"\0") + 1
            raise DataError(f"{path}:{number}: a NUL byte at column {column}: not a text file list")
        try:
            yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not UTF-8 text ({exc.reason} at column {exc.start + 1})") from None


def _parse_rows(reader, path: str) -> list[tuple[int, str, str]]:
    """csv rows -> (line number, path, label or ''); blank rows and a header 'path[,label]' on line 1 skipped.
    DataError naming the file and the line for a malformed row."""
    rows = []
    for row in reader:
        number, cells = reader.line_num, [c.strip() for c in row]
        if not cells or not any(cells):
            continue
        if len(cells) > 2:
            raise DataError(f"{path}:{number}: expected 'path[,label]', got {len(cells)} columns: {row!r}"[:500])
        if number == 1 and cells[0].lower() in ("path", "file", "filename") and cells[-1].lower() in (
                "label", "class", cells[0].lower()):
            continue
        if not cells[0]:
            raise DataError(f"{path}:{number}: empty path")
        rows.append((number, cells[0], cells[1] if len(cells) > 1 else ""))
    return rows


def _read_rows(path: str) -> list[tuple[int, str, str]]:
    """A CSV/TSV/text list -> (line number, path, label or ''), read through a bounded reader (_open_list,
    _list_lines); a header row 'path[,label]' is skipped. Tab-delimited when the file ends in .tsv or its first
    non-blank line holds a tab."""
    with _open_list(path) as handle:
        lines, head = _list_lines(handle, path), []
        for line in lines:
            head.append(line)
            if line.strip():
                break
        delimiter = "\t" if path.endswith(".tsv") or "\t" in (head[-1] if head else "") else ","
        reader = csv.reader(itertools.chain(head, lines), delimiter=delimiter)
        try:
            return _parse_rows(reader, path)
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not a CSV row ({exc})") from None


def note_label(found: dict, key, raw_path: str, label: str, number: int, where: str) -> None:
    """Record `label` (line `number` of `where`) for the image `key` in found {key: (label, line)}; the same image
    named again with another label is an error naming the file, both labels and both lines (a repeat with the same
    label keeps the first line)."""
    if key in found and found[key][0] != label:
        raise DataError(f"{where}:{number}: {_shown(raw_path)} appears again with label {_shown(label)} "
                        f"(line {found[key][1]} gave {_shown(found[key][0])})")
    found.setdefault(key, (label, number))


def _check_conflicting_labels(rows: list[tuple[int, str, str]], path: str) -> None:
    """A file list naming one image twice (however spelt: './a.jpg', 'a.jpg', its absolute path) with two
    different labels is ambiguous: refused as data.labels refuses it."""
    base, found = os.path.dirname(os.path.abspath(path)), {}
    for number, raw_path, label in rows:
        note_label(found, os.path.normpath(os.path.join(base, raw_path)), raw_path, label, number, path)


def _filelist_index(source: str, path: str) -> dict:
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{source}: file list {path!r} names no images")
    _check_conflicting_labels(rows, path)
    labels, classes = _class_table([label for _, _, label in rows], path)
    names = [os.path.normpath(p) for _, p, _ in rows]
    return {"names": names, "labels": labels, "classes": classes, "split_of": ["train"] * len(names)}


def _brace_expression_count(expr: str, ceiling: int) -> int:
    """How many strings braceexpand makes of `{expr}` (a range a..b[..step], a comma sequence, or literal braces
    around a pattern), mirroring its parser, capped at `ceiling`."""
    match = int_range_re.match(expr)
    if match:
        start, end, step = match.groups()
        return min(abs(int(end) - int(start)) // ((int(step) or 1) if step else 1) + 1, ceiling)
    match = char_range_re.match(expr)
    if match:
        return len(make_char_range(*match.groups()))
    pieces, start, depth, pos = [], 0, 0, 0
    while pos < len(expr):
        if expr[pos] == "\\":
            pos += 2
            continue
        depth += {"{": 1, "}": -1}.get(expr[pos], 0)
        if expr[pos] == "," and depth == 0:
            pieces.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth or not pieces:
        return brace_count(expr, ceiling)
    return min(sum(brace_count(piece, ceiling) for piece in pieces + [expr[start:]]), ceiling)


def brace_count(pattern: str, ceiling: int) -> int:
    """How many strings braceexpand(pattern) yields, counted without making them (braceexpand builds every value
    of a range at once: `{00000000..99999999}` is 10^8 strings before the first), capped at `ceiling`.
    UnbalancedBracesError as braceexpand raises it."""
    start, depth, pos, total = 0, 0, 0, 1
    while pos < len(pattern):
        if pattern[pos] == "\\":
            pos += 2
            continue
        if pattern[pos] == "{":
            start = pos if depth == 0 else start
            depth += 1
        elif pattern[pos] == "}":
            depth -= 1
            if depth == 0:
                total = min(total * _brace_expression_count(pattern[start + 1:pos], ceiling), ceiling)
                start = pos + 1
        pos += 1
    if depth:
        raise UnbalancedBracesError(f"Unbalanced braces: {pattern!r}")
    return total


def brace_depth(pattern: str) -> int:
    """How deeply `pattern` nests braces (backslash escapes skipped), in one pass: the parsers recurse once per
    level and rescan each level's text, so a deep nest is refused before either runs."""
    depth = deepest = pos = 0
    while pos < len(pattern):
        if pattern[pos] == "\\":
            pos += 2
            continue
        depth += {"{": 1, "}": -1}.get(pattern[pos], 0)
        deepest, pos = max(deepest, depth), pos + 1
    return deepest


def _shown(pattern: str) -> str:
    """A user string (a pattern, a path, a label) as error messages quote it: its repr, cut at 200 characters."""
    return repr(pattern) if len(pattern) <= 200 else f"{pattern[:200]!r}... ({len(pattern):,} characters)"


def _too_many_shards(pattern: str, what: str) -> DataError:
    return DataError(f"webdataset pattern {_shown(pattern)} {what} more than {limit('MAX_SHARDS'):,} shard paths; "
                     f"{how_to_raise('MAX_SHARDS')}")


def expand_pattern(pattern: str) -> list[str]:
    """'shards-{000..003}.tar' or a glob -> sorted shard paths, at most MAX_SHARDS: the brace expansion is counted
    before it is made and globs are read lazily, so a pattern of 10^8 shards is a DataError naming the pattern and
    the limit, not gigabytes of strings; unbalanced or too deeply nested braces and NUL bytes are a DataError too."""
    cap = limit("MAX_SHARDS")
    if "\0" in pattern:  # found by fuzzing: glob raises ValueError on it
        raise DataError(f"webdataset pattern {_shown(pattern)} holds a NUL byte")
    if brace_depth(pattern) > MAX_BRACE_DEPTH:
        raise DataError(f"webdataset pattern {_shown(pattern)} nests braces more than {MAX_BRACE_DEPTH} deep")
    try:
        if brace_count(pattern, cap + 1) > cap:
            raise _too_many_shards(pattern, "expands to")
        parts = list(braceexpand(pattern))
    except (ValueError, RecursionError) as exc:  # UnbalancedBracesError is a ValueError, as is int() of 5000 digits
        reason = "has unbalanced braces" if isinstance(exc, UnbalancedBracesError) else \
            "nests braces too deeply" if isinstance(exc, RecursionError) else f"is not a usable pattern ({exc})"
        raise DataError(f"webdataset pattern {_shown(pattern)} {reason}"[:1000]) from None
    paths = []
    for part in parts:
        paths.extend(sorted(itertools.islice(glob.iglob(part), cap + 1)) if any(c in part for c in "*?[") else [part])
        if len(paths) > cap:
            raise _too_many_shards(pattern, "matches")
    return paths


def _member_problem(member: tarfile.TarInfo, shard_size: int) -> str:
    """Why an image member cannot be indexed ('' when it can): its header claims bytes past the shard's end, or
    more than max_image_file_bytes()."""
    if member.offset_data + member.size > shard_size:
        return f"its header claims {member.size:,} bytes, past the end of the {shard_size:,}-byte shard"
    if member.size > max_image_file_bytes():
        return f"{member.size:,} bytes exceed the image file size cap of {max_image_file_bytes():,}"
    return ""


def _tar_members(shard: str) -> tuple[list[tuple[str, int, int]], dict[str, int], list[tuple[str, str]]]:
    """One shard -> ([(member, data offset, size)] of images, {key: label} from .cls members, skipped)."""
    images, labels, skipped = [], {}, []
    try:
        shard_size = os.stat(shard).st_size
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key_part, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key_part)
                if ext.lower() in TAR_IMAGE_EXTENSIONS:
                    reason = _member_problem(member, shard_size)
                    if reason:
                        skipped.append((f"{shard}/{member.name}", reason))
                        continue
                    images.append((member.name, member.offset_data, member.size))
                elif ext.lower() == "cls":
                    if member.size > CLS_MAX_BYTES:
                        raise DataError(f"tar shard {shard!r}: member {member.name!r} is {member.size:,} bytes; a "
                                        f".cls member holds one class number (at most {CLS_MAX_BYTES} bytes)")
                    text = tar.extractfile(member).read(CLS_MAX_BYTES).decode("utf-8", "replace").strip()
                    if not CLASS_NUMBER.fullmatch(text) or int(text) < 0:
                        skipped.append((f"{shard}/{member.name}", f"label {text[:20]!r} is not a class number"))
                        continue
                    check_class_numbers([int(text)], f"tar shard {shard!r}: member {member.name!r}")
                    labels[key] = int(text)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(f"tar shard {shard!r} cannot be read: {exc}") from None
    return images, labels, skipped


def _webdataset_index(source: str, pattern: str, workers: int) -> dict:
    shards = expand_pattern(pattern)
    missing = [s for s in shards if not os.path.isfile(s)]
    if not shards or missing:
        raise DataError(f"{source}: shard files missing: {(missing or [pattern])[:5]} "
                        f"(expected e.g. webdataset:/data/shards-{{000000..000127}}.tar)")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_tar_members, shards))
    names, raw, shard_of, offsets, lengths, skipped = [], [], [], [], [], []
    for number, (images, labels, bad) in enumerate(results):
        skipped.extend(bad)
        for member, offset, size in images:
            key = os.path.join(os.path.dirname(member), os.path.basename(member).partition(".")[0])
            names.append(member)
            raw.append(labels.get(key, -1))
            shard_of.append(number)
            offsets.append(offset)
            lengths.append(size)
    if not names:
        raise DataError(f"{source}: the shards hold no image members (KEY.jpg|jpeg|png|webp)")
    top = max(raw)
    return {"names": names, "labels": raw, "classes": [str(i) for i in range(top + 1)] if top >= 0 else [],
            "split_of": ["train"] * len(names), "shards": [os.path.abspath(s) for s in shards],
            "shard": shard_of, "offset": offsets, "length": lengths, "skipped": skipped}


# ------------------------------------------------------------------------------------------------ cache
def cache_dir() -> Path:
    """$SSL_KIT_CACHE/index (default ~/.cache/ssl_kit/index); an unusable $SSL_KIT_CACHE is a ConfigError naming it
    (limits.cache_root: the same behaviour on every path)."""
    return cache_root(Path.home() / ".cache" / "ssl_kit") / "index"


def _cache_file(source: str) -> Path:
    return cache_dir() / (cache_key("index", source) + ".npz")


def _check_cached_index(index: FileIndex) -> None:
    """A cached index must be self-consistent before it is trusted (a crafted or damaged file raises ValueError):
    offsets ascend from 0 to the blob's end, one label per image (-1 or a class), split and shard positions in
    range."""
    count, offsets = len(index.offsets) - 1, index.offsets
    if index.blob.dtype != np.uint8 or offsets.dtype != np.int64 or index.labels.dtype != np.int64 or count < 0:
        raise ValueError("unexpected array types")
    if offsets[0] != 0 or offsets[-1] != len(index.blob) or (np.diff(offsets) < 0).any():
        raise ValueError("name offsets do not cover the name buffer")
    if index.labels.shape != (count,) or ((index.labels < -1) | (index.labels >= len(index.classes))).any():
        raise ValueError("labels do not match the images and classes")
    if any(p.dtype != np.int64 or ((p < 0) | (p >= count)).any() for p in index.splits.values()):
        raise ValueError("split positions out of range")
    if index.shards:
        if any(a is None or a.shape != (count,) for a in (index.shard, index.offset, index.length)):
            raise ValueError("tar member arrays do not match the images")
        if ((index.shard < 0) | (index.shard >= len(index.shards))).any() or (index.offset < 0).any() \
                or (index.length < 0).any():
            raise ValueError("tar member positions out of range")


def _read_cache(path: Path, source: str) -> Optional[FileIndex]:
    """The index stored at `path`, or None when what it was built from changed (its stamps differ). Raises
    ValueError/OSError/... when the file is damaged, crafted or from another format version."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("source") != source:
            raise ValueError(f"not a format-{CACHE_FORMAT} index of {source}")
        if file_stamps([s[0] for s in meta["stamps"]]) != meta["stamps"]:
            return None
        arrays = {k: data[k] for k in data.files if k != "meta"}
    splits = {k[len("split_"):]: v for k, v in arrays.items() if k.startswith("split_")}
    index = FileIndex(source, str(meta["root"]), arrays["blob"], arrays["offsets"], arrays["labels"],
                      [str(c) for c in meta["classes"]], splits, [str(s) for s in meta["shards"]],
                      arrays.get("shard"), arrays.get("offset"), arrays.get("length"),
                      [(str(a), str(b)) for a, b in meta["skipped"]])
    _check_cached_index(index)
    return index


def _load_cache(source: str) -> Optional[FileIndex]:
    """The cached index of `source` when it is still valid; None (rebuild) when absent or stale; a damaged,
    crafted or other-version cache file is rebuilt with a warning, never trusted."""
    path = _cache_file(source)
    if not path.is_file():
        return None
    try:
        return _read_cache(path, source)
    except Exception as exc:  # numpy, zipfile and json raise many types for damaged bytes
        warnings.warn(f"index cache {str(path)!r} is unreadable or invalid ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); rebuilding the index")
        return None


def _save_cache(index: FileIndex, stamped: list[str]) -> None:
    """Best effort: an unwritable cache folder only costs a rebuild next time."""
    path = _cache_file(index.source)
    meta = {"format": CACHE_FORMAT, "source": index.source, "root": index.root, "classes": index.classes,
            "shards": index.shards, "skipped": [list(s) for s in index.skipped], "stamps": file_stamps(stamped)}
    arrays = {"blob": index.blob, "offsets": index.offsets, "labels": index.labels,
              **{f"split_{k}": v for k, v in index.splits.items()}}
    if index.shards:
        arrays.update(shard=index.shard, offset=index.offset, length=index.length)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"index cache {str(path)!r} not written ({exc}); the index will be rebuilt next time")


# ------------------------------------------------------------------------------------------------ build
def _assemble(source: str, root: str, built: dict, skipped: list[tuple[str, str]]) -> FileIndex:
    blob, offsets = _pack(built["names"])
    split_of = np.asarray(built["split_of"])
    splits = {s: np.flatnonzero(split_of == s).astype(np.int64) for s in SPLIT_FOLDERS if (split_of == s).any()}
    if "train" not in splits:
        raise DataError(f"{source}: no images found under {root!r} (image suffixes: {sorted(IMAGE_SUFFIXES)})")
    tar = {}
    if "shards" in built:
        tar = dict(shards=built["shards"], shard=np.asarray(built["shard"], dtype=np.int32),
                   offset=np.asarray(built["offset"], dtype=np.int64), length=np.asarray(built["length"], dtype=np.int64))
    return FileIndex(source, root, blob, offsets, np.asarray(built["labels"], dtype=np.int64), built["classes"],
                     splits, skipped=skipped, **tar)


class IndexBuild(NamedTuple):
    """What a kind's index builder found: the table (names, labels, classes, split_of[, shards, shard, offset,
    length]), the folder relative names resolve against, the paths whose mtimes validate the cached index, and the
    files left out as (path, reason)."""

    table: dict
    root: str
    stamped: list[str]
    skipped: list[tuple[str, str]]


def _existing_folder(source: str, location: str) -> str:
    if not os.path.isdir(location):
        raise DataError(f"{source}: root folder {location!r} does not exist")
    return os.path.realpath(location)


def index_imagefolder(source: str, location: str, arg: str, workers: int) -> IndexBuild:
    """imagefolder:ROOT -> ROOT/<class>/**/<image>, split folders ROOT/train|val|test when present."""
    root = _existing_folder(source, location)
    table, mtimes, skipped = _folder_index(source, root, workers)
    return IndexBuild(table, root, sorted(mtimes), skipped)


def index_images(source: str, location: str, arg: str, workers: int) -> IndexBuild:
    """images:ROOT -> every image under ROOT, unlabeled."""
    root = _existing_folder(source, location)
    table, mtimes, skipped = _images_index(source, root, workers)
    return IndexBuild(table, root, sorted(mtimes), skipped)


def index_filelist(source: str, location: str, arg: str, workers: int) -> IndexBuild:
    """filelist:FILE -> its `path[,label]` rows."""
    if not os.path.exists(location):
        raise DataError(f"{source}: file list {location!r} does not exist")
    if not os.path.isfile(location):
        raise DataError(f"{source}: file list {location!r} is not a regular file (a folder, device, FIFO or socket)")
    return IndexBuild(_filelist_index(source, location), os.path.dirname(location), [location], [])


def index_webdataset(source: str, location: str, arg: str, workers: int) -> IndexBuild:
    """webdataset:PATTERN -> the image members of the tar shards (random access by offset)."""
    table = _webdataset_index(source, arg, workers)
    return IndexBuild(table, "", table["shards"], table["skipped"])


def build_index(kind: str, arg: str, workers: int = 8, use_cache: bool = True) -> FileIndex:
    """The index of `kind:arg` (a file-indexed kind, see kinds.py), from the cache when nothing changed."""
    builder = dataset_kind(kind).index
    if builder is None:
        raise DataError(f"{kind!r} is not a streamed source (streamed: {', '.join(streamed_kinds())})")
    location = os.path.abspath(os.path.expanduser(arg))
    source = f"{kind}:{location}"
    if use_cache:
        cached = _load_cache(source)
        if cached is not None:
            return cached
    built = builder(source, location, arg, workers)
    for path, reason in built.skipped[:20]:
        warnings.warn(f"{source}: skipped {path}: {reason}")
    index = _assemble(source, built.root, built.table, built.skipped)
    if use_cache:
        _save_cache(index, built.stamped)
    return index


# ------------------------------------------------------------------------------------------ labels CSV
def apply_labels_csv(index: FileIndex, csv_path: str) -> FileIndex:
    """Labels for a subset from a CSV of `path,label` rows (header optional). Paths are relative to the CSV's
    folder or to the index root (absolute paths work too); labels are class names, or class numbers.

    Images the CSV does not name become unlabeled (-1): that is the point, a labeled subset of a large pool.
    Rows naming files that are not in the index are ignored with one warning that counts them and names the
    first five; if no row matches, or a row repeats a path with another label, or (imagefolder) a label is not
    one of the folder classes, a DataError says so. An empty label marks the image unlabeled.
    """
    if index.shards:
        raise DataError(f"data.labels {csv_path!r}: tar shards carry their labels in KEY.cls members")
    rows = _read_rows(csv_path)
    if not rows:
        raise DataError(f"data.labels {csv_path!r} names no images (expected `path,label` rows)")
    base = os.path.dirname(os.path.abspath(csv_path))
    lookup = {index.name(i): i for i in range(len(index))}
    found: dict[int, tuple[str, int]] = {}
    extra = []
    for number, raw_path, label in rows:
        candidates = [os.path.normpath(raw_path)]
        candidates.insert(0, os.path.normpath(os.path.relpath(os.path.join(base, raw_path), index.root)))
        position = next((lookup[c] for c in candidates if c in lookup), None)
        if position is None:
            extra.append(raw_path)
            continue
        note_label(found, position, raw_path, label, number, csv_path)
    if not found:
        raise DataError(f"data.labels {csv_path!r}: none of its {len(rows)} rows names an image of {index.source} "
                        f"(paths are relative to the CSV's folder or to {index.root!r}; first row: {rows[0][1]!r})")
    if extra:
        warnings.warn(f"data.labels {csv_path!r}: {len(extra)} rows name files not in {index.source}, ignored: "
                      f"{extra[:5]}")
    positions = sorted(found)
    raw = [found[p][0] for p in positions]
    if index.classes:
        lookup_cls = {c: i for i, c in enumerate(index.classes)}
        unknown = sorted({r for r in raw if r and r not in lookup_cls})
        if unknown:
            raise DataError(f"data.labels {csv_path!r}: labels {unknown[:10]} are not classes of {index.source} "
                            f"({index.classes[:10]})")
        values, classes = [lookup_cls[r] if r else -1 for r in raw], index.classes
    else:
        values, classes = _class_table(raw, csv_path)
    labels = np.full(len(index), -1, dtype=np.int64)
    labels[positions] = values
    return index.with_labels(labels, classes)


# ----------------------------------------------------------------------------------------------- storage
def decoded_bytes(count: int, image_size: int, channels: int = 3) -> int:
    """Bytes of `count` uint8 images of channels×size×size: what the in-memory path would hold."""
    return int(count) * channels * image_size * image_size


def choose_storage(storage: str, count: int, image_size: int, channels: int, budget_gb: float) -> str:
    """'memory' or 'stream' for data.storage auto|memory|stream: auto streams when the decoded set at the stage's
    image size exceeds memory_budget_gb."""
    if storage not in ("auto", "memory", "stream"):
        raise DataError(f"data.storage must be auto, memory or stream, got {storage!r}")
    if storage != "auto":
        return storage
    return "stream" if decoded_bytes(count, image_size, channels) > budget_gb * 2 ** 30 else "memory"
