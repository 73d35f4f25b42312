"""Weighted kNN on L2-normalised features with faiss: cosine similarity, votes exp(sim / T) per class."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..common.metrics import classification_metrics


def _faiss_index(bank: np.ndarray, ivf: bool, use_gpu: bool):
    import faiss

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
    bank_np = F.normalize(bank.float(), dim=1).numpy().astype(np.float32)
    index = _faiss_index(np.ascontiguousarray(bank_np), ivf, use_gpu)
    k = min(k, bank.shape[0])
    sims, ids = [], []
    normalised = F.normalize(queries.float(), dim=1).numpy().astype(np.float32)
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


def knn_scores(similarities: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Class scores (N, K) = Σ over neighbours of exp(sim / T) added to each neighbour's class.
    similarities, neighbour_labels: (N, k)."""
    weights = torch.exp(similarities / temperature)
    scores = torch.zeros(similarities.shape[0], num_classes)
    return scores.scatter_add_(1, neighbour_labels.long(), weights)


def knn_classify(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, ivf: bool = False) -> dict:
    """Weighted kNN accuracy of test features against the training bank."""
    sims, ids = knn_search(train_features, test_features, k, ivf)
    scores = knn_scores(sims, train_labels[ids], num_classes, temperature)
    result = classification_metrics(scores, test_labels, num_classes)
    result["k"] = int(ids.shape[1])
    return result
