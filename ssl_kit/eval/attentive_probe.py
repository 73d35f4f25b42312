"""Attentive probe on a frozen ViT's patch tokens: one learned query attends over the last block's normalised patch
tokens (multi-head, 64 channels a head), and a linear layer classifies the pooled vector. This is CAPI's
AttnPoolClassifier (facebookresearch/capi, eval_classification.py: the "attentive IN1k" numbers of the CAPI paper;
V-JEPA's attentive probe wraps the same cross-attention in a full transformer block), trained as CAPI trains it:
AdamW (β 0.9, 0.95), a linear warm-up over the first 10% of the steps then a cosine to 0, minibatches of 128, no
weight decay on biases, a grid of learning rates (per 256 images) × weight decays. Three things differ from CAPI, each
as the linear probe (linear_probe.py) does it: the tokens are standardised per channel with the training tokens'
statistics; the grid point is chosen on a stratified 20% of the training images and then refit on all of them (CAPI:
a random 10%, no refit); and the grid has three learning rates above CAPI's, for runs far shorter than its 12,500
steps.

Every grid point trains at once, on the same minibatches, stacked along a leading G axis (the linear probe's GridSGD
idea). The forward is computed in an equivalent, cheaper order. A head's attention logit of token x is
q · (W_k x + b_k) = x · (W_kᵀ q) + q · b_k, whose second term is the same for every token and cancels in the softmax;
and Σ_l a_l (W_v x_l + b_v) = W_v (Σ_l a_l x_l) + b_v since the weights a sum to 1. So the (N, L, 2D) keys and values
are never formed: two (N, L, D) contractions a head instead of a (N · L, D) × (D, 2D) matrix product, with the same
values and gradients as CAPI's module (tests/test_attentive_probe.py).

A token set is a (N, L · D) tensor, each row one image's L tokens of width D: float16 in memory, or a streamed
split's on-disk float16 cache opened as a memory map (mapped.py), of which a minibatch of rows is read at a time, so
the probe's memory is bounded by its minibatch whatever the set's size. Each minibatch trains in float32 on the
probe's device. The tokens are extracted once; CAPI instead re-crops and re-embeds every training image at every
step."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..common.metrics import ClassificationTally
from ..errors import DataError
from .linear_probe import few_shot_index, validation_split
from .mapped import gather, row_chunks

HEAD_DIM = 64  # CAPI: num_heads = in_dim // 64
CAPI_BATCH_SIZE = 128
# Learning rates per 256 images (the rate of a minibatch of B is lr · B / 256, as CAPI's base_lr): CAPI's grid, and
# three above it, since a probe of 100 epochs of a small set takes far fewer steps than CAPI's 12,500 (on digits the
# chosen rate sat at the top of CAPI's grid: docs/evaluation.md)
BASE_LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2) + (2e-2, 5e-2, 1e-1)
WD_GRID = (5e-4, 1e-3, 5e-2)
NO_SWEEP = (1e-3, 5e-4)  # with the sweep off: CAPI's middle learning rate (per 256 images), its lowest decay
WARMUP_FRACTION = 0.1  # CAPI: 1,250 warm-up iterations of 12,500
BETAS = (0.9, 0.95)
EPS = 1e-8
SCORE_CHUNK = 512


def probe_heads(dim: int) -> int:
    """Attention heads for tokens of width `dim`: dim // 64 as CAPI (which requires a multiple of 64), else the
    largest divisor of dim not above that (1 for a 96-wide ViT)."""
    heads = max(1, dim // HEAD_DIM)
    while dim % heads:
        heads -= 1
    return heads


class AttentiveGrid(nn.Module):
    """G attentive probes of tokens (B, L, D) into K classes, one per grid point, stacked along a leading axis. The
    parameters are CAPI's AttnPoolClassifier's, stacked: query (G, D), kv_weight (G, 2D, D) (keys, then values),
    kv_bias (G, 2D), weight (G, K, D), bias (G, K); initialised as CAPI's (truncated normal, std 0.02; biases 0).
    The tokens are first standardised per channel by the buffers `mean`, `std` (D,), the training tokens' statistics
    (as the linear probe standardises its features; CAPI does not)."""

    def __init__(self, groups: int, dim: int, num_classes: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.heads = probe_heads(dim)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.query = nn.Parameter(torch.empty(groups, dim))
        self.kv_weight = nn.Parameter(torch.empty(groups, 2 * dim, dim))
        self.kv_bias = nn.Parameter(torch.zeros(groups, 2 * dim))
        self.weight = nn.Parameter(torch.empty(groups, num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(groups, num_classes))
        for param in (self.query, self.kv_weight, self.weight):
            nn.init.trunc_normal_(param, std=0.02, generator=generator)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, L, D) -> logits (G, B, K)."""
        groups, dim = self.query.shape
        heads = self.heads
        head_dim = dim // heads
        tokens = (tokens - self.mean) / self.std
        key_weight = self.kv_weight[:, :dim].reshape(groups, heads, head_dim, dim)
        value_weight = self.kv_weight[:, dim:].reshape(groups, heads, head_dim, dim)
        key_query = torch.einsum("ghe,ghed->ghd", self.query.reshape(groups, heads, head_dim), key_weight)
        scores = torch.einsum("bld,ghd->gbhl", tokens, key_query) * head_dim ** -0.5  # the key bias cancels
        pooled = torch.einsum("gbhl,bld->gbhd", scores.softmax(dim=-1), tokens)  # (G, B, H, D)
        values = torch.einsum("gbhd,ghed->gbhe", pooled, value_weight).reshape(groups, tokens.shape[0], dim)
        values = values + self.kv_bias[:, None, dim:]
        return torch.einsum("gbd,gkd->gbk", values, self.weight) + self.bias[:, None]


class GridAdamW:
    """AdamW on stacked parameters (G, ...) with a learning rate and a weight decay per grid point (lrs, decays (G,)),
    each slice following exactly a torch.optim.AdamW run of its own (decoupled decay, bias-corrected moments). The
    rate follows a linear warm-up over the first WARMUP_FRACTION of `total_steps` (from 1/warm-up steps of it) and
    then a cosine to 0. `decayed`: the parameters that take weight decay (not the biases)."""

    def __init__(self, params: list[nn.Parameter], decayed: list[nn.Parameter], lrs: Tensor, decays: Tensor,
                 total_steps: int) -> None:
        self.params, self.decayed = params, {id(p) for p in decayed}
        self.lrs, self.decays = lrs, decays
        self.total, self.warmup = max(1, total_steps), max(1, round(WARMUP_FRACTION * total_steps))
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    def rate_factor(self) -> float:
        """The schedule's factor at the current step (0-based): warm-up, then cosine."""
        if self.steps < self.warmup:
            return (self.steps + 1) / self.warmup
        progress = (self.steps - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = BETAS
        lrs = self.lrs * self.rate_factor()
        self.steps += 1
        correction1, correction2 = 1 - beta1 ** self.steps, 1 - beta2 ** self.steps
        for param, (mean, square) in zip(self.params, self.moments):
            shape = (-1,) + (1,) * (param.dim() - 1)
            rate = lrs.view(shape)
            if id(param) in self.decayed:
                param.mul_(1 - rate * self.decays.view(shape))
            mean.mul_(beta1).add_(param.grad, alpha=1 - beta1)
            square.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            param.sub_(rate * (mean / correction1) / ((square / correction2).sqrt() + EPS))
            param.grad = None


def token_rows(tokens: Tensor, rows: Tensor, dim: int) -> Tensor:
    """tokens[rows] of a token set (N, L · D), in memory or a mapped cache (mapped.py) -> float32 (len(rows), L, D)."""
    return gather(tokens, rows).float().view(len(rows), -1, dim)


def token_statistics(tokens: Tensor, rows: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std (D,), (D,) of the tokens of images `rows` of a token set (N, L · D), over images
    and positions, accumulated in float64 a chunk of rows at a time (never a float32 copy of the set)."""
    total = torch.zeros(dim, dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in row_chunks(tokens, rows):
        chunk = chunk.double().view(-1, dim)
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    count = len(rows) * tokens.shape[1] // dim
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def minibatches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices (≤ batch_size,) of one shuffled pass over `count` rows."""
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, batch_size):
        yield order[start:start + batch_size]


def fit_attentive_grid(tokens: Tensor, labels: Tensor, dim: int, num_classes: int, configs: list[tuple[float, float]],
                       epochs: int = 100, batch_size: int = CAPI_BATCH_SIZE, seed: int = 0,
                       device: torch.device | str = "cpu", rows: Optional[Tensor] = None) -> AttentiveGrid:
    """One attentive probe per (lr, weight_decay) in `configs`, trained together on the images `rows` (all when
    None) of a token set (N, L · D) of width `dim`, labels (N,), with the same minibatches: the summed loss keeps
    each probe's gradient its own. The learning rates are per 256 images: a minibatch of B (min(batch_size,
    len(rows))) trains at lr · B / 256."""
    rows = torch.arange(tokens.shape[0]) if rows is None else rows
    if len(rows) == 0:
        raise DataError("attentive probe: no training images")
    generator = torch.Generator().manual_seed(seed)
    model = AttentiveGrid(len(configs), dim, num_classes, generator)
    mean, std = token_statistics(tokens, rows, dim)
    model.mean.copy_(mean)
    model.std.copy_(std)
    model.to(device)
    steps = epochs * math.ceil(len(rows) / batch_size)
    rates = torch.tensor([c[0] for c in configs], device=device) * min(batch_size, len(rows)) / 256
    optimizer = GridAdamW(list(model.parameters()), [model.query, model.kv_weight, model.weight], rates,
                          torch.tensor([c[1] for c in configs], device=device), steps)
    for _ in range(epochs):
        for index in minibatches(len(rows), batch_size, generator):
            logits = model(token_rows(tokens, rows[index], dim).to(device))  # (G, B, K)
            target = labels[rows[index]].to(device).repeat(len(configs))
            loss = F.cross_entropy(logits.reshape(-1, num_classes), target) * len(configs)
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def grid_metrics(model: AttentiveGrid, tokens: Tensor, labels: Tensor, num_classes: int,
                 rows: Optional[Tensor] = None) -> list[dict]:
    """classification_metrics of every grid point of `model` on the images `rows` (all when None) of a token set
    (N, L · D), labels (N,), scored SCORE_CHUNK images at a time."""
    rows = torch.arange(tokens.shape[0]) if rows is None else rows
    tallies = [ClassificationTally(num_classes) for _ in range(model.query.shape[0])]
    for start in range(0, len(rows), SCORE_CHUNK):
        chunk = rows[start:start + SCORE_CHUNK]
        logits = model(token_rows(tokens, chunk, model.query.shape[1]).to(model.query.device))
        for tally, group_logits in zip(tallies, logits):
            tally.add(group_logits, labels[chunk])
    return [tally.result() for tally in tallies]


def select_attentive(tokens: Tensor, labels: Tensor, dim: int, num_classes: int, epochs: int, batch_size: int,
                     seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """BASE_LR_GRID × WD_GRID scored by top-1 on a stratified validation split -> {'lr', 'weight_decay', 'val_top1'};
    ties go to the earlier (smaller) learning rate."""
    train_index, val_index = validation_split(labels, seed=seed)
    configs = [(lr, wd) for lr in BASE_LR_GRID for wd in WD_GRID]
    model = fit_attentive_grid(tokens, labels, dim, num_classes, configs, epochs, batch_size, seed, device,
                               train_index)
    scores = [m["top1"] for m in grid_metrics(model, tokens, labels, num_classes, val_index)]
    best = max(range(len(configs)), key=lambda g: (scores[g], -g))
    return {"lr": configs[best][0], "weight_decay": configs[best][1], "val_top1": scores[best]}


def attentive_probe(train_tokens: Tensor, train_labels: Tensor, test_tokens: Tensor, test_labels: Tensor,
                    num_classes: int, dim: int, epochs: int = 100, sweep: bool = True,
                    labels_per_class: Optional[int] = None, seed: int = 0, batch_size: int = CAPI_BATCH_SIZE,
                    device: torch.device | str = "cpu") -> dict:
    """Fit on (a few-shot subset of) the training token set (N, L · D) of width `dim`, report test top1 / top5 /
    balanced / per-class, as linear_probe reports them; the lr/wd come from the validation split, the final probe
    is refit on all the training tokens given. Token sets in memory or mapped (mapped.py), float16 or float32; the
    probes train on `device`, a minibatch at a time."""
    if labels_per_class is not None:
        index = few_shot_index(train_labels, labels_per_class, seed)
        train_tokens, train_labels = gather(train_tokens, index), train_labels[index]  # few: in memory
    chosen = select_attentive(train_tokens, train_labels, dim, num_classes, epochs, batch_size, seed, device) \
        if sweep else {"lr": NO_SWEEP[0], "weight_decay": NO_SWEEP[1]}
    model = fit_attentive_grid(train_tokens, train_labels, dim, num_classes, [(chosen["lr"], chosen["weight_decay"])],
                               epochs, batch_size, seed, device)
    result = grid_metrics(model, test_tokens, test_labels, num_classes)[0]
    result.update({"chosen_lr": chosen["lr"], "chosen_weight_decay": chosen["weight_decay"],
                   "train_size": int(train_tokens.shape[0]), "heads": model.heads})
    if "val_top1" in chosen:
        result["val_top1"] = chosen["val_top1"]
    return result
