"""One cache-key function for every on-disk cache ssl_kit keeps under `$SSL_KIT_CACHE` (the file index of a
streamed source, the float16 features of a streamed split): what a cached result depends on is stamped, so a
change to any of it misses the cache instead of serving a stale result.

    cache_key(kind, *parts)      sha256 over the cache kind, CACHE_FORMAT and the parts (spec, weights, stamps ...)
    file_stamps(paths)           [path, mtime_ns, size] of each path (-1, -1 when it cannot be stat-ed)
    content_stamp(index, rows)   one digest over the name, size and mtime_ns of every file the rows read (or of
                                 every tar shard they read), plus the index's names and labels

A file rewritten in place under the same name (re-processed data, a regenerated crop set) changes its size or its
mtime_ns, hence the stamp and the key. What a stamp cannot see: a rewrite that keeps both the size and the
nanosecond mtime (only a deliberate `os.utime` back-dating does that). CACHE_FORMAT is part of every key and of
every cache file's metadata: a cache written by another format version is never read.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

CACHE_FORMAT = 2
STAT_CHUNK = 4096  # files stat-ed per thread task


def cache_key(kind: str, *parts: object) -> str:
    """The name of a cache entry of `kind` ('index', 'features'): 32 hex digits over the format and the parts."""
    digest = hashlib.sha256(f"ssl_kit-cache/{kind}/v{CACHE_FORMAT}".encode())
    for part in parts:
        digest.update(b"\0" + str(part).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def file_stamps(paths: Iterable[str]) -> list[list]:
    """[path, mtime_ns, size] of each path; a path that cannot be stat-ed stamps as [path, -1, -1]."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append([path, st.st_mtime_ns, st.st_size])
        except OSError:
            out.append([path, -1, -1])
    return out


def _stamp_chunks(paths: list[str], workers: int) -> list[list]:
    """file_stamps of many paths, in STAT_CHUNK chunks on a thread pool (stat releases the GIL)."""
    chunks = [paths[i:i + STAT_CHUNK] for i in range(0, len(paths), STAT_CHUNK)]
    if len(chunks) <= 1:
        return file_stamps(paths)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [stamp for part in pool.map(file_stamps, chunks) for stamp in part]


def content_stamp(index, positions: np.ndarray, workers: int = 8) -> str:
    """A digest of what images `positions` of `index` (a sources.FileIndex) decode to, as far as the file system can tell: the index's
    source, names and labels of those rows, and the name, size and mtime_ns of each file they read (for tar shards,
    of each shard, whose member offsets are in the index)."""
    positions = np.asarray(positions, dtype=np.int64)
    digest = hashlib.sha256(f"{index.source}\0{index.root}".encode("utf-8", "surrogateescape"))
    for array in (index.blob, index.offsets, index.labels, positions):
        digest.update(np.ascontiguousarray(array).tobytes())
    if index.shards:
        used = sorted({int(s) for s in np.unique(index.shard[positions])}) if len(positions) else []
        stamps = file_stamps([index.shards[s] for s in used])
        digest.update(np.ascontiguousarray(index.offset[positions]).tobytes())
        digest.update(np.ascontiguousarray(index.length[positions]).tobytes())
    else:
        stamps = _stamp_chunks([index.path(int(p)) for p in positions], workers)
    for path, mtime_ns, size in stamps:
        digest.update(f"\0{path}\0{mtime_ns}\0{size}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()
