"""Weighted kNN on L2-normalised features with faiss: cosine similarity, votes exp(sim / T) per class.

A memory-mapped bank or query set (a streamed split's float16 cache, see mapped.py) is searched exactly in chunks:
for each chunk of queries, every chunk of the bank in turn is read as float32 and searched, and each query keeps the
top k of all chunks seen so far, so one bank chunk and one query chunk are in float32 at a time."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.metrics import ClassificationTally
from .mapped import chunk_rows, is_mapped, read_block, row_chunks

SCORE_CHUNK = 65_536  # test rows scored at a time: 65,536 × K float32 class scores (250 MiB at K = 1,000)


def _faiss_index(bank: np.ndarray, ivf: bool, use_gpu: bool):
    import faiss  # deferred: optional native library (faiss), loaded only when a kNN index is built

    dim = bank.shape[1]
    if ivf:
        nlist = max(1, int(np.sqrt(bank.shape[0])))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(bank)
        index.nprobe = min(nlist, 16)
    else:
        index = faiss.IndexFlatIP(dim)
    if use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(bank)
    return index


def knn_search(bank: Tensor, queries: Tensor, k: int, ivf: bool = False, use_gpu: bool = True,
               chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Top-k cosine neighbours. bank (M, F), queries (N, F) -> similarities (N, k), indices (N, k)."""
    bank_np = F.normalize(bank.float(), dim=1).numpy().astype(np.float32, copy=False)
    index = _faiss_index(np.ascontiguousarray(bank_np), ivf, use_gpu)
    k = min(k, bank.shape[0])
    sims, ids = [], []
    normalised = F.normalize(queries.float(), dim=1).numpy().astype(np.float32, copy=False)
    for start in range(0, normalised.shape[0], chunk):
        s, i = index.search(np.ascontiguousarray(normalised[start:start + chunk]), k)
        sims.append(torch.from_numpy(s))
        ids.append(torch.from_numpy(i))
    return torch.cat(sims), torch.cat(ids)


def torch_knn_search(bank: Tensor, queries: Tensor, k: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The same top-k cosine search as knn_search with plain torch matmuls, `chunk` queries at a time so that the
    (chunk, M) similarity block bounds memory. -> similarities (N, k), indices (N, k)."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    sims, ids = [], []
    for start in range(0, queries.shape[0], chunk):
        top = torch.topk(queries[start:start + chunk] @ bank.T, k, dim=1)
        sims.append(top.values)
        ids.append(top.indices)
    return torch.cat(sims), torch.cat(ids)


def merge_topk(best: tuple[Tensor, Tensor] | None, found: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The k largest of two (similarities (N, a), indices (N, a)) and (N, b) candidate lists, sorted descending;
    `best` None starts the list with `found`."""
    if best is None:
        return found
    sims, ids = torch.cat([best[0], found[0]], dim=1), torch.cat([best[1], found[1]], dim=1)
    top = torch.topk(sims, min(k, sims.shape[1]), dim=1)
    return top.values, ids.gather(1, top.indices)


def chunked_knn_search(bank: Tensor, queries: Tensor, k: int, rows: int | None = None,
                       use_gpu: bool = True) -> tuple[Tensor, Tensor]:
    """Exact top-k cosine neighbours as knn_search, reading `rows` (default chunk_rows) bank and query rows at a
    time, so either may be a memory-mapped cache. bank (M, F), queries (N, F) -> similarities (N, k), indices
    (N, k) into the bank."""
    rows = max(rows or chunk_rows(bank.shape[1]), k)
    k = min(k, bank.shape[0])
    sims, ids = [], []
    for query_chunk in row_chunks(queries, size=rows):
        best = None
        for start in range(0, bank.shape[0], rows):
            found_sims, found_ids = knn_search(read_block(bank, start, start + rows), query_chunk, k,
                                               use_gpu=use_gpu)
            best = merge_topk(best, (found_sims, found_ids + start), k)
        sims.append(best[0])
        ids.append(best[1])
    return torch.cat(sims), torch.cat(ids)


def knn_scores(similarities: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores (N, K) = Σ over neighbours of exp(sim / T) added to each neighbour's class.
    similarities, neighbour_labels: (N, k)."""
    weights = torch.exp(similarities / temperature)
    scores = torch.zeros(similarities.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


def knn_classify(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, ivf: bool = False) -> dict:
    """Weighted kNN accuracy of test features (N, F) against the training bank (M, F); labels (N,), (M,). A
    memory-mapped bank or test set is searched exactly in chunks (chunked_knn_search; `ivf` does not apply)."""
    if is_mapped(train_features) or is_mapped(test_features):
        sims, ids = chunked_knn_search(train_features, test_features, k)
    else:
        sims, ids = knn_search(train_features, test_features, k, ivf)
    tally = ClassificationTally(num_classes)  # class scores chunk by chunk: N × K of them are never held
    for start in range(0, ids.shape[0], SCORE_CHUNK):
        rows = slice(start, start + SCORE_CHUNK)
        tally.add(knn_scores(sims[rows], train_labels[ids[rows]], num_classes, temperature), test_labels[rows])
    result = tally.result()
    result["k"] = int(ids.shape[1])
    return result
