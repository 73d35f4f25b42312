"""Feature matrices that stay on disk: a streamed split's float16 feature cache (N, F) opened as a memory map and
read a chunk of rows at a time as float32, so the linear probe and kNN never hold N × F float32 at once.

A mapped tensor is an ordinary float16 torch tensor over a private (copy-on-write) mapping of the .npy file: slicing
and indexing it read only the rows asked for, and the file is never written. Resident memory stays bounded because
every read below converts its rows to float32 and then drops the mapping's pages from this process (MADV_DONTNEED:
the pages stay in the page cache, a later read maps them again without touching the disk). In-memory tensors take
`gather` unchanged (plain indexing), so in-memory sets give exactly the numbers they always did.

Chunk size: $SSL_KIT_EVAL_CHUNK_ROWS rows, else as many rows as fit `CHUNK_BYTES` (8 MiB) as float32.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from ..limits import knob

CHUNK_ROWS_ENV = "SSL_KIT_EVAL_CHUNK_ROWS"
CHUNK_BYTES = 8 * 2 ** 20
GATHER_PIECE = 64  # rows of a scattered read between page releases: a fault maps up to 64 KiB around each row
FAULT_AROUND_BYTES = 2 ** 17  # released beyond a row range's ends: Linux maps pages around a faulting one (64 KiB)


class _Mapping:
    """The mmap under a mapped tensor: where its rows start and how long they are, to release row ranges."""

    def __init__(self, mapping: mmap.mmap, offset: int, row_bytes: int) -> None:
        self.mapping, self.offset, self.row_bytes = mapping, offset, row_bytes

    def release(self, start: int, stop: int) -> None:
        """Drop the pages holding rows [start, stop), and those the kernel mapped around them, from this process
        (they stay in the page cache)."""
        first = max(0, self.offset + start * self.row_bytes - FAULT_AROUND_BYTES) // mmap.PAGESIZE * mmap.PAGESIZE
        last = min(len(self.mapping), self.offset + stop * self.row_bytes + FAULT_AROUND_BYTES)
        if last > first and hasattr(self.mapping, "madvise"):
            self.mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def chunk_rows(dim: int) -> int:
    """Rows per chunk for features of width `dim`: $SSL_KIT_EVAL_CHUNK_ROWS, else CHUNK_BYTES of float32 rows
    (8,192 rows of 256 features, 4,096 of 512)."""
    rows = knob(CHUNK_ROWS_ENV)
    return max(1, CHUNK_BYTES // (4 * max(1, dim))) if rows is None else rows


def open_mapped(path: str | Path) -> Tensor:
    """A float16 .npy feature cache (N, F) as a read-only view of the file (a private mapping nothing writes to)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(handle)
        if fortran_order or dtype != np.float16 or len(shape) != 2:
            raise DataError(f"{path}: expected a C-ordered float16 (N, F) feature cache, got {dtype} {shape}")
        offset = handle.tell()
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    array = np.frombuffer(mapping, np.float16, count=shape[0] * shape[1], offset=offset).reshape(shape)
    tensor = torch.from_numpy(array)
    tensor._ssl_kit_mapping = _Mapping(mapping, offset, shape[1] * 2)  # marks the tensor as mapped
    return tensor


def is_mapped(features: Tensor) -> bool:
    """Whether `features` is a feature cache opened by open_mapped (the chunked, bounded-memory paths apply)."""
    return getattr(features, "_ssl_kit_mapping", None) is not None


def release(features: Tensor, start: int, stop: int) -> None:
    """Drop the pages of rows [start, stop) of a mapped cache from this process's resident memory (no-op for
    in-memory tensors)."""
    mapping = getattr(features, "_ssl_kit_mapping", None)
    if mapping is not None:
        mapping.release(start, stop)


def read_block(features: Tensor, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of features (N, F) as float32 (stop - start, F)."""
    block = features[start:stop].float()
    release(features, start, stop)
    return block


def gather(features: Tensor, rows: Tensor) -> Tensor:
    """features[rows] -> (len(rows), F). A mapped cache is read in ascending row order (one forward sweep over the
    file, GATHER_PIECE rows between page releases) and returned as float32 in the order of `rows`; an in-memory
    tensor is plainly indexed."""
    if not is_mapped(features):
        return features[rows]
    ascending, order = torch.sort(rows)
    out = torch.empty(len(rows), features.shape[1])
    for start in range(0, len(rows), GATHER_PIECE):
        piece = ascending[start:start + GATHER_PIECE]
        out[order[start:start + GATHER_PIECE]] = features[piece].float()
        release(features, int(piece[0]), int(piece[-1]) + 1)
    return out


def row_chunks(features: Tensor, rows: Optional[Tensor] = None, size: Optional[int] = None) -> Iterator[Tensor]:
    """float32 chunks (≤ size, F) of features[rows] (all rows when None) in order; size defaults to chunk_rows."""
    size = size or chunk_rows(features.shape[1])
    count = features.shape[0] if rows is None else len(rows)
    for start in range(0, count, size):
        yield read_block(features, start, start + size) if rows is None else gather(features, rows[start:start + size])


def column_stats(features: Tensor, rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-feature mean and population std (F,), (F,) of features[rows], accumulated in float64 over chunks of
    half the usual rows (so a chunk's float64 copy fits the float32 budget) with Chan's parallel update of count,
    mean and sum of squared deviations; returned as float32."""
    count, mean, squares = 0, torch.zeros(features.shape[1], dtype=torch.float64), None
    for chunk in row_chunks(features, rows, size=max(1, chunk_rows(features.shape[1]) // 2)):
        n, chunk_mean, chunk_squares = _moments(chunk)
        delta, total = chunk_mean - mean, count + n
        mean = mean + delta * (n / total)
        squares = chunk_squares if squares is None else squares + chunk_squares + delta.pow(2) * (count * n / total)
        count = total
    if count == 0:
        raise DataError("no feature rows to standardise")
    return mean.float(), (squares / count).sqrt().float()


def _moments(chunk: Tensor) -> tuple[int, Tensor, Tensor]:
    """Row count, mean (F,) and sum of squared deviations (F,) of chunk (n, F), in float64."""
    chunk = chunk.double()
    chunk_mean = chunk.mean(0)
    return chunk.shape[0], chunk_mean, chunk.sub_(chunk_mean).pow_(2).sum(0)  # in place: one float64 copy


def concat_features(parts: list[Tensor], folder: str | Path) -> Tensor:
    """Rows of `parts` (each (N_i, F)) one after the other -> (ΣN_i, F). In memory: torch.cat, as before. When any
    part is a mapped cache: a new float16 cache written chunk by chunk to an unnamed file in `folder` and opened
    mapped (the file is unlinked at once and its space freed with the last reference), so pooling large streamed
    domains holds no more than a chunk."""
    if not any(is_mapped(part) for part in parts):
        return torch.cat(parts)
    dims = {int(part.shape[1]) for part in parts}
    if len(dims) != 1:
        raise DataError(f"cannot pool features of different widths {sorted(dims)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(suffix=".pooled.f16.npy", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": (sum(int(part.shape[0]) for part in parts), dims.pop())}
            np.lib.format.write_array_header_2_0(out, header)
            for part in parts:
                for chunk in row_chunks(part):
                    out.write(chunk.numpy().astype(np.float16).tobytes())
        return open_mapped(name)
    finally:
        os.unlink(name)
