"""Linear probe on cached features: BatchNorm without affine (as a fixed standardisation with the training
statistics, which is what BN(affine=False) computes in eval mode) + Linear, trained with SGD + cosine schedule.
Learning rate and weight decay are chosen on a validation split carved from the training set, never on test."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.builtin import stratified_holdout
from ..errors import DataError
from .metrics import classification_metrics

LR_GRID = (0.3, 0.1, 0.03)
WD_GRID = (0.0, 1e-4, 1e-3)


@dataclass
class LinearModel:
    mean: Tensor  # (F,)
    std: Tensor  # (F,)
    weight: Tensor  # (K, F)
    bias: Tensor  # (K,)

    def logits(self, features: Tensor) -> Tensor:
        """features (N, F) -> logits (N, K)."""
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias


def probe_batch_size(n: int) -> int:
    """256, or about 64 steps per epoch for large sets (50k features -> 782): large banks need fewer steps."""
    return max(256, math.ceil(n / 64))


def fit_linear(features: Tensor, labels: Tensor, num_classes: int, lr: float = 0.1, weight_decay: float = 0.0,
               epochs: int = 100, batch_size: int | None = None, seed: int = 0) -> LinearModel:
    """SGD (momentum 0.9, nesterov) with cosine decay on standardised features. features (N, F), labels (N,)."""
    return fit_linear_grid(features, labels, num_classes, [(lr, weight_decay)], epochs, batch_size, seed)[0]


def fit_linear_grid(features: Tensor, labels: Tensor, num_classes: int, configs: list[tuple[float, float]],
                    epochs: int = 100, batch_size: int | None = None, seed: int = 0) -> list[LinearModel]:
    """One linear model per (lr, weight_decay) in `configs`, all trained at once as a (G, K, F) weight tensor on the
    same mini-batches: a grid search costs about one fit. Each model sees exactly what a separate SGD run with
    momentum 0.9 (nesterov), cosine decay and an L2 term 0.5·wd·‖W‖² would; features (N, F), labels (N,)."""
    if features.shape[0] == 0:
        raise DataError("linear probe: no training features")
    features = features.float()
    batch_size = batch_size or probe_batch_size(features.shape[0])
    mean = features.mean(0)
    std = features.std(0, unbiased=False).clamp_min(1e-6)
    x = (features - mean) / std
    groups = len(configs)
    lrs = torch.tensor([c[0] for c in configs]).view(groups, 1, 1)
    decays = torch.tensor([c[1] for c in configs]).view(groups, 1, 1)
    weight = torch.zeros(groups, num_classes, x.shape[1])
    bias = torch.zeros(groups, 1, num_classes)
    momentum_w, momentum_b = torch.zeros_like(weight), torch.zeros_like(bias)
    generator = torch.Generator().manual_seed(seed)
    total = epochs * max(1, math.ceil(x.shape[0] / batch_size))
    step = 0
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        shuffled_x, shuffled_y = x[order], labels[order]  # one gather per epoch; batches are contiguous views
        for start in range(0, x.shape[0], batch_size):
            xb, yb = shuffled_x[start:start + batch_size], shuffled_y[start:start + batch_size]
            # gradient of the mean cross-entropy in closed form: (softmax − onehot) / B, per model; the G models
            # are stacked into one (G·K, F) matrix so that each step is two plain matmuls
            logits = (xb @ weight.view(-1, weight.shape[2]).T).view(-1, groups, num_classes) + bias.transpose(0, 1)
            residual = torch.softmax(logits, dim=2)  # (B, G, K)
            residual[torch.arange(yb.numel()), :, yb] -= 1.0
            residual /= yb.numel()
            grad_w = (residual.reshape(yb.numel(), -1).T @ xb).view_as(weight) + decays * weight  # (G, K, F)
            grad_b = residual.sum(dim=0).unsqueeze(1)  # (G, 1, K)
            rate = lrs * (0.5 * (1 + math.cos(math.pi * step / total)))
            for param, grad, buffer in ((weight, grad_w, momentum_w), (bias, grad_b, momentum_b)):
                buffer.mul_(0.9).add_(grad)
                param.sub_(rate * (grad + 0.9 * buffer))  # nesterov
            step += 1
    return [LinearModel(mean, std, weight[g].clone(), bias[g, 0].clone()) for g in range(groups)]


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
    models = fit_linear_grid(features[train_index], labels[train_index], num_classes, configs, epochs, seed=seed)
    best = None
    for (lr, wd), model in zip(configs, models):
        accuracy = (model.logits(features[val_index]).argmax(1) == labels[val_index]).float().mean().item()
        if best is None or accuracy > best["val_top1"]:
            best = {"lr": lr, "weight_decay": wd, "val_top1": accuracy}
    return best


def few_shot_index(labels: Tensor, per_class: int, seed: int) -> Tensor:
    from ..data.splits import labeled_indices

    return labeled_indices(labels, per_class, seed)


def linear_probe(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 num_classes: int, epochs: int = 100, sweep: bool = True, labels_per_class: int | None = None,
                 seed: int = 0) -> dict:
    """Fit on (a few-shot subset of) the training features, report test top1/top5/balanced/per-class.
    The chosen lr/wd come from the validation split; the final model is refit on all training features given."""
    if labels_per_class is not None:
        index = few_shot_index(train_labels, labels_per_class, seed)
        train_features, train_labels = train_features[index], train_labels[index]
    chosen = select_hyperparameters(train_features, train_labels, num_classes, epochs, seed) if sweep \
        else {"lr": 0.1, "weight_decay": 0.0}
    model = fit_linear(train_features, train_labels, num_classes, chosen["lr"], chosen["weight_decay"], epochs, seed=seed)
    result = classification_metrics(model.logits(test_features), test_labels, num_classes)
    result.update({"chosen_lr": chosen["lr"], "chosen_weight_decay": chosen["weight_decay"],
                   "train_size": int(train_features.shape[0])})
    if "val_top1" in chosen:
        result["val_top1"] = chosen["val_top1"]
    result["_model"] = model
    return result
