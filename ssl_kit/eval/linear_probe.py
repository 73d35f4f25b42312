"""Linear probe on cached features: BatchNorm without affine (as a fixed standardisation with the training
statistics, which is what BN(affine=False) computes in eval mode) + Linear, trained with SGD + cosine schedule.
Learning rate and weight decay are chosen on a validation split carved from the training set, never on test.

Features memory-mapped from a streamed split's float16 cache (see mapped.py) are never materialised: the
standardisation is accumulated chunk by chunk in float64, every epoch reads its minibatches from the file a window
of rows at a time, and the validation split and the scoring read their rows the same way. The shuffle is the same
global permutation as in memory (each window of it is read in ascending row order, then put back in permutation
order), not a shuffle of blocks: image files are indexed class by class, so blocks of neighbouring rows would give
single-class minibatches. The batches are therefore exactly the in-memory ones; only the float64 statistics differ
from the float32 ones in the last bits."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from ..common.metrics import ClassificationTally
from ..data.builtin import stratified_holdout
from ..data.splits import labeled_indices
from ..errors import DataError
from .mapped import chunk_rows, column_stats, gather, is_mapped, row_chunks

LR_GRID = (0.3, 0.1, 0.03)
WD_GRID = (0.0, 1e-4, 1e-3)


@dataclass
class LinearModel:
    mean: Tensor  # (F,)
    std: Tensor  # (F,)
    weight: Tensor  # (K, F)
    bias: Tensor  # (K,)

    def logits(self, features: Tensor, rows: Optional[Tensor] = None) -> Tensor:
        """features (N, F) -> logits (N, K), or of features[rows] only -> (len(rows), K)."""
        return torch.cat(list(self.logit_chunks(features, rows)))

    def logit_chunks(self, features: Tensor, rows: Optional[Tensor] = None) -> Iterator[Tensor]:
        """logits of features (N, F) (or features[rows]) in order: one (N, K) block for features in memory, chunks
        of chunk_rows for a mapped cache (each freshly read chunk standardised in place)."""
        if is_mapped(features):
            for chunk in row_chunks(features, rows):
                yield self._logits(chunk.sub_(self.mean).div_(self.std))
            return
        features = features if rows is None else features[rows]
        yield self._logits((features - self.mean) / self.std)

    def metrics(self, features: Tensor, labels: Tensor, num_classes: int, rows: Optional[Tensor] = None) -> dict:
        """classification_metrics of features[rows] (all when None) against labels (N,), tallied chunk by chunk:
        a mapped test set's N × K logits are never held at once."""
        labels = labels if rows is None else labels[rows]
        tally, start = ClassificationTally(num_classes), 0
        for logits in self.logit_chunks(features, rows):
            tally.add(logits, labels[start:start + logits.shape[0]])
            start += logits.shape[0]
        return tally.result()

    def _logits(self, standardised: Tensor) -> Tensor:
        """standardised features (N, F) -> logits (N, K)."""
        return standardised @ self.weight.T + self.bias


def probe_batch_size(n: int) -> int:
    """256, or about 64 steps per epoch for large sets (50k features -> 782): large banks need fewer steps."""
    return max(256, math.ceil(n / 64))


def fit_linear(features: Tensor, labels: Tensor, num_classes: int, lr: float = 0.1, weight_decay: float = 0.0,
               epochs: int = 100, batch_size: int | None = None, seed: int = 0) -> LinearModel:
    """SGD (momentum 0.9, nesterov) with cosine decay on standardised features. features (N, F), labels (N,)."""
    return fit_linear_grid(features, labels, num_classes, [(lr, weight_decay)], epochs, batch_size, seed)[0]


class GridSGD:
    """SGD state of G linear models trained at once as a (G, K, F) weight tensor on the same mini-batches: a grid
    search costs about one fit. Each model follows exactly a separate torch.optim.SGD run (momentum 0.9, nesterov,
    cosine decay over `total_steps`, L2 term 0.5·wd·‖W‖²). Features given to `epoch` are already standardised."""

    def __init__(self, configs: list[tuple[float, float]], num_classes: int, dim: int, total_steps: int) -> None:
        self.groups, self.num_classes, self.total = len(configs), num_classes, max(1, total_steps)
        self.lrs = torch.tensor([c[0] for c in configs]).view(-1, 1, 1)
        self.decays = torch.tensor([c[1] for c in configs]).view(-1, 1, 1)
        self.weight = torch.zeros(self.groups, num_classes, dim)
        self.bias = torch.zeros(self.groups, 1, num_classes)
        self.momentum_w, self.momentum_b = torch.zeros_like(self.weight), torch.zeros_like(self.bias)
        self.step = 0

    def epoch(self, x: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator) -> None:
        """One pass over standardised features x (N, F), labels (N,) in a random order."""
        order = torch.randperm(x.shape[0], generator=generator)
        self._batches(x[order], labels[order], batch_size)  # one gather per epoch; batches are contiguous views

    def mapped_epoch(self, features: Tensor, rows: Tensor, labels: Tensor, standardise: Callable[[Tensor], Tensor],
                     batch_size: int, generator: torch.Generator) -> None:
        """The same pass as `epoch` (same permutation, same minibatches) over features[rows] of a mapped cache
        (N, F), labels (len(rows),) aligned with rows: a window of whole minibatches (about chunk_rows rows) is
        read and standardised at a time."""
        order = torch.randperm(len(rows), generator=generator)
        window = batch_size * max(1, chunk_rows(features.shape[1]) // batch_size)
        for start in range(0, len(rows), window):
            picked = order[start:start + window]
            self._batches(standardise(gather(features, rows[picked])), labels[picked], batch_size)

    def _batches(self, x: Tensor, labels: Tensor, batch_size: int) -> None:
        """One update per consecutive minibatch of x (n, F), labels (n,)."""
        for start in range(0, x.shape[0], batch_size):
            self._update(x[start:start + batch_size], labels[start:start + batch_size])

    def _update(self, xb: Tensor, yb: Tensor) -> None:
        groups, k, n = self.groups, self.num_classes, yb.numel()
        # gradient of the mean cross-entropy in closed form, (softmax − onehot) / B per model; the G models are
        # stacked into one (G·K, F) matrix so that each step is two plain matmuls
        logits = (xb @ self.weight.view(-1, self.weight.shape[2]).T).view(n, groups, k) + self.bias.transpose(0, 1)
        residual = torch.softmax(logits, dim=2)  # (B, G, K)
        residual[torch.arange(n), :, yb] -= 1.0
        residual /= n
        grad_w = (residual.reshape(n, -1).T @ xb).view_as(self.weight) + self.decays * self.weight  # (G, K, F)
        grad_b = residual.sum(dim=0).unsqueeze(1)  # (G, 1, K)
        rate = self.lrs * (0.5 * (1 + math.cos(math.pi * self.step / self.total)))
        for param, grad, buffer in ((self.weight, grad_w, self.momentum_w), (self.bias, grad_b, self.momentum_b)):
            buffer.mul_(0.9).add_(grad)
            param.sub_(rate * (grad + 0.9 * buffer))  # nesterov
        self.step += 1

    def models(self, mean: Tensor, std: Tensor) -> list[LinearModel]:
        return [LinearModel(mean, std, self.weight[g].clone(), self.bias[g, 0].clone()) for g in range(self.groups)]


def standardisation(features: Tensor, rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std (N, F) -> (F,), (F,): what BatchNorm without affine computes. On a mapped cache,
    of features[rows] (all rows when None), accumulated in float64 chunks."""
    if is_mapped(features):
        mean, std = column_stats(features, rows)
        return mean, std.clamp_min(1e-6)
    features = features if rows is None else features[rows]
    return features.mean(0), features.std(0, unbiased=False).clamp_min(1e-6)


def fit_linear_grid(features: Tensor, labels: Tensor, num_classes: int, configs: list[tuple[float, float]],
                    epochs: int = 100, batch_size: int | None = None, seed: int = 0,
                    reextract: Optional[Callable[[int], Tensor]] = None,
                    rows: Optional[Tensor] = None) -> list[LinearModel]:
    """One linear model per (lr, weight_decay) in `configs` on features (N, F), labels (N,) (see GridSGD), or on
    features[rows], labels[rows] only. A mapped cache is fitted without materialising it (see the module docstring).
    With `reextract(epoch) -> (N, F)` (the ImageNet protocol: features of freshly augmented training images in the
    same image order), epochs after the first train on those instead; the standardisation stays the first's."""
    if is_mapped(features):
        if reextract is not None:
            raise DataError("linear probe: augmented re-extraction needs the training images in memory")
        return _fit_mapped(features, labels, num_classes, configs, epochs, batch_size, seed, rows)
    if rows is not None:
        features, labels = features[rows], labels[rows]
    if features.shape[0] == 0:
        raise DataError("linear probe: no training features")
    features = features.float()
    batch_size = batch_size or probe_batch_size(features.shape[0])
    mean, std = standardisation(features)
    x = (features - mean) / std
    trainer = GridSGD(configs, num_classes, x.shape[1], epochs * math.ceil(x.shape[0] / batch_size))
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if reextract is not None and epoch > 0:
            x = (reextract(epoch).float() - mean) / std
        trainer.epoch(x, labels, batch_size, generator)
    return trainer.models(mean, std)


def _fit_mapped(features: Tensor, labels: Tensor, num_classes: int, configs: list[tuple[float, float]], epochs: int,
                batch_size: int | None, seed: int, rows: Optional[Tensor]) -> list[LinearModel]:
    """fit_linear_grid on features[rows] of a mapped cache (N, F): statistics in float64 chunks, minibatches read
    from the file every epoch. Same permutation, minibatches and schedule as the in-memory fit."""
    rows = torch.arange(features.shape[0]) if rows is None else rows
    if len(rows) == 0:
        raise DataError("linear probe: no training features")
    batch_size = batch_size or probe_batch_size(len(rows))
    mean, std = standardisation(features, rows)
    trainer = GridSGD(configs, num_classes, features.shape[1], epochs * math.ceil(len(rows) / batch_size))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        # in place on the freshly read window: the same float32 (x - mean) / std as in memory, no second copy
        trainer.mapped_epoch(features, rows, labels[rows], lambda x: x.sub_(mean).div_(std), batch_size, generator)
    return trainer.models(mean, std)


def validation_split(labels: Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Stratified (train, val) indices; every class needs ≥ 2 samples so both sides have one."""
    counts = torch.bincount(labels[labels >= 0])
    if counts.numel() == 0 or int(counts[counts > 0].min()) < 2:
        raise DataError("linear probe: the validation split for the lr/wd sweep needs at least 2 labeled images per "
                        "class; use more labels per class or turn the sweep off (--no-sweep / sweep: false)")
    train_index, val_index = stratified_holdout(labels.numpy(), fraction, seed)
    return torch.from_numpy(train_index), torch.from_numpy(val_index)


def select_hyperparameters(features: Tensor, labels: Tensor, num_classes: int, epochs: int, seed: int = 0) -> dict:
    """Grid over LR_GRID × WD_GRID scored by validation top-1. -> {'lr', 'weight_decay', 'val_top1'}."""
    train_index, val_index = validation_split(labels, seed=seed)
    configs = list(itertools.product(LR_GRID, WD_GRID))
    models = fit_linear_grid(features, labels, num_classes, configs, epochs, seed=seed, rows=train_index)
    best = None
    for (lr, wd), model in zip(configs, models):
        accuracy = model.metrics(features, labels, num_classes, val_index)["top1"]
        if best is None or accuracy > best["val_top1"]:
            best = {"lr": lr, "weight_decay": wd, "val_top1": accuracy}
    return best


def few_shot_index(labels: Tensor, per_class: int, seed: int) -> Tensor:
    return labeled_indices(labels, per_class, seed)


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, epochs: int = 100, sweep: bool = True, labels_per_class: int | None = None,
                 seed: int = 0, augmented: Optional[Callable[[int, Tensor], Tensor]] = None) -> dict:
    """Fit on (a few-shot subset of) the training features, report test top1/top5/balanced/per-class.
    The chosen lr/wd come from the validation split; the final model is refit on all training features given.
    With `augmented(epoch, index) -> features (len(index), F)` of augmented training images, the final fit
    re-extracts them every epoch (lr/wd still chosen on the cached clean features)."""
    index = torch.arange(train_features.shape[0])
    if labels_per_class is not None:
        index = few_shot_index(train_labels, labels_per_class, seed)
        train_features, train_labels = gather(train_features, index), train_labels[index]  # few: in memory
    chosen = select_hyperparameters(train_features, train_labels, num_classes, epochs, seed) if sweep \
        else {"lr": 0.1, "weight_decay": 0.0}
    if augmented is None:
        model = fit_linear(train_features, train_labels, num_classes, chosen["lr"], chosen["weight_decay"], epochs,
                           seed=seed)
    else:
        config = [(chosen["lr"], chosen["weight_decay"])]
        model = fit_linear_grid(augmented(0, index), train_labels, num_classes, config, epochs, seed=seed,
                                reextract=lambda epoch: augmented(epoch, index))[0]
    result = model.metrics(test_features, test_labels, num_classes)
    result.update({"chosen_lr": chosen["lr"], "chosen_weight_decay": chosen["weight_decay"],
                   "train_size": int(train_features.shape[0])})
    if "val_top1" in chosen:
        result["val_top1"] = chosen["val_top1"]
    result["_model"] = model
    return result
