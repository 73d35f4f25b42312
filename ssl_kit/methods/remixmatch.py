"""ReMixMatch (Berthelot, Carlini, Cubuk, Kurakin, Sohn, Zhang & Raffel, ICLR 2020), as USB runs it (`remixmatch`):

- distribution alignment: the weak view's prediction p is multiplied by p_target / p_model and renormalised, p_model
  the mean prediction on unlabeled images over the last `da_len` batches (gathered over ranks; a buffer, so it is
  checkpointed), p_target the labeled split's class distribution (USB p_target_type 'gt'; `uniform` optional);
- the guess: the aligned prediction sharpened with T (MixMatch's `sharpen`); it is computed without gradient and
  with BatchNorm running statistics left untouched (USB's freeze_bn);
- augmentation anchoring: `num_augmentations` strong views of each unlabeled image take the weak view's guess as
  target; `augment: randaugment` (default): the repo's strong view, RandAugment + Cutout; `augment: ctaugment`: the
  paper's CTAugment (data/ctaugment.py) + Cutout, its bin weights (buffer `ctaugment.rates`, checkpointed) updated
  each step from a probe: the labeled batch under uniformly drawn CTAugment ops, classified without gradient by the
  network in eval mode (the reference classifies it with its EMA network, which ssl_kit's trainer owns), probes
  and predictions gathered over ranks so every rank applies the same update;
- MixUp (MixMatch's `mixup`, λ' = max(λ, 1 − λ), λ ~ Beta(α, α), one permutation over the whole set) of the labeled
  images (one-hot targets), the strong views and the weak view (the guess as target; USB and the paper's code mix
  the weak view too); soft cross-entropy on the mixed labeled rows (L_X) and unlabeled rows (L_U, weight λ_u);
- the first strong view before mixing towards the guess (L_Û1, weight kl_loss_ratio) and rotation prediction of a
  randomly rotated (0/90/180/270°) copy of it by a linear head `rot_head` (weight rot_loss_ratio; 0 = no head).

L = L_X + ramp · (λ_u L_U + kl_loss_ratio L_Û1) + rot_loss_ratio L_rot, ramp = min(1, step / (unsup_warmup · steps)).
Passes: the guess (no gradient), the mixed batch in one pass (USB interleaves and updates BatchNorm statistics
from the first chunk only; as ssl_kit's `mixmatch`), then the first strong view and its rotated copy
in one pass (`joint_forward`; false: two passes, as USB) with BatchNorm running statistics frozen (USB freezes them
there too); with ctaugment, one more no-gradient pass over the probed labeled batch (eval mode). It stands on the
weak/strong base for the strong view (`strong:` keys); it has no confidence gate."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..common import distributed as dist
from ..common.modes import eval_mode
from ..data.augment import random_translate_flip, to_unit_float
from ..data.ctaugment import CTAugment
from ..data.loader import Batch
from ..data.randaugment import cutout
from ..losses import linear_rampup, mixup, sharpen
from ..losses.remixmatch import remixmatch_distribution_alignment, remixmatch_loss
from .abc_balanced import labeled_class_counts
from .base import Progress
from .crmatch import rotation_batch
from .mixmatch import frozen_bn_statistics
from .registry import register
from .semi import USB_SGD
from .weak_strong import WeakStrongConfig, WeakStrongMethod

_USB = "semilearn/algorithms/remixmatch/remixmatch.py, config/classic_cv/remixmatch/remixmatch_cifar10_40_0.yaml"


class ReMixMatchConfig(WeakStrongConfig):
    """ReMixMatch keys; defaults from USB's classic_cv configs (cifar10_40, cifar100_400 and stl10_40 agree on them;
    cifar100 uses weight decay 1e-3)."""

    method: Literal["remixmatch"]

    recommended = USB_SGD
    recommended_source = ("ReMixMatch (Berthelot et al. 2020; the paper used Adam) / USB classic-cv config (" + _USB +
                          "): SGD Nesterov momentum 0.9, lr 0.03 (no batch scaling), weight decay 5e-4, "
                          "lr · cos(7πk/16K), uratio 1, ulb_loss_ratio 1.5")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu × labeled batch (USB uratio 1)")
    lambda_u: float = Field(1.5, ge=0, description="weight of the cross-entropy on the mixed unlabeled rows (USB "
                                                   "ulb_loss_ratio 1.5; the paper's λ_U)")
    temperature: float = Field(0.5, gt=0, description="sharpening of the aligned guess (USB T 0.5)")
    kl_loss_ratio: float = Field(0.5, ge=0, description="weight of the first strong view's pre-mixup loss "
                                                        "towards the guess (USB kl_loss_ratio 0.5; the paper's "
                                                        "λ_Û1)")
    rot_loss_ratio: float = Field(0.5, ge=0, description="weight of the rotation-prediction loss; 0: no rotation "
                                                         "head (USB rot_loss_ratio 0.5; the paper's λ_r)")
    mixup_alpha: float = Field(0.75, ge=0, description="Beta(α, α) of the mixup coefficient; 0 = no mixing (USB "
                                                       "mixup_alpha 0.75, the paper's α)")
    mixup_manifold: bool = Field(False, description="mix backbone features instead of images (USB mixup_manifold; "
                                                    "false for images)")
    unsup_warmup: float = Field(1 / 64, ge=0, le=1, description="fraction of the steps over which λ_u and "
                                                                "kl_loss_ratio ramp up linearly (USB unsup_warm_up "
                                                                "0.015625)")
    num_augmentations: int = Field(2, ge=1, description="K strong views per unlabeled image, anchored to the weak "
                                                        "view's guess (USB's two strong views; the paper's K 8)")
    da_len: int = Field(128, ge=1, description="p_model = mean prediction on unlabeled images over the last da_len "
                                               "batches (the paper's 128; USB keeps an EMA, momentum 0.999, "
                                               "instead)")
    joint_forward: bool = Field(True, description="the first strong view and its rotated copy in one pass; false: "
                                                  "two passes, as USB (BatchNorm statistics frozen in both)")
    da_target: Literal["labeled", "uniform"] = Field("labeled", description="p_target: the labeled split's class "
                                                                            "distribution (the paper; USB "
                                                                            "p_target_type 'gt') or uniform")
    augment: Literal["randaugment", "ctaugment"] = Field(
        "randaugment", description="strong views: the repo's RandAugment + Cutout (`strong:`), or the paper's "
                                   "default CTAugment (depth 2, threshold 0.8, decay 0.99; weights updated from a "
                                   "probe of the labeled batch) + Cutout (strong.cutout)")


class PredictionHistory(nn.Module):
    """ReMixMatch's distribution alignment with p_model the mean over the last `length` batches of the mean
    prediction on unlabeled images (rows written so far only: the first step uses its own batch, as USB's first
    p_model). Buffers: `history` (length, K), `pointer`, `filled`, `p_target` (K,)."""

    def __init__(self, p_target: Tensor, length: int) -> None:
        super().__init__()
        self.register_buffer("p_target", p_target.float().clone())
        self.register_buffer("history", torch.zeros(length, p_target.shape[0]))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def p_model(self) -> Tensor:
        """(K,) mean of the recorded batch means (uniform before any batch)."""
        n = int(self.filled)
        if n == 0:
            return torch.full_like(self.p_target, 1.0 / self.p_target.shape[0])
        return self.history[:n].mean(dim=0)

    @torch.no_grad()
    def forward(self, probs: Tensor) -> Tensor:
        """probs (N, K) -> aligned (N, K); the batch's mean (over all ranks) is recorded first, as USB."""
        self.history[self.pointer] = dist.gather_no_grad(probs.detach().float()).mean(dim=0)
        self.pointer.copy_((self.pointer + 1) % self.history.shape[0])
        self.filled.copy_(torch.clamp(self.filled + 1, max=self.history.shape[0]))
        return remixmatch_distribution_alignment(probs, self.p_model, self.p_target)


@contextmanager
def batch_statistics_only(module: nn.Module):
    """Run `module` in training mode on batch statistics while no BatchNorm updates its running mean/var or counter
    (track_running_stats off for the duration). Unlike restoring the buffers afterwards (mixmatch's
    frozen_bn_statistics, for no-gradient passes), nothing saved for the backward pass is modified in place."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def random_rotation(images: Tensor) -> tuple[Tensor, Tensor]:
    """Each image rotated by a random multiple of 90° (counter-clockwise; USB rotates the first strong view by one
    angle drawn from 0/90/180/270). images (N, C, S, S) -> (rotated (N, C, S, S), labels (N,) in 0..3)."""
    n = images.shape[0]
    labels = torch.randint(0, 4, (n,), device=images.device)
    all_four, _ = rotation_batch(images)  # (4N, ...): rotation k of image i at row k · N + i
    return all_four[labels * n + torch.arange(n, device=images.device)], labels


@register("remixmatch", ReMixMatchConfig)
class ReMixMatch(WeakStrongMethod):
    """ReMixMatch: MixMatch with distribution alignment, strong views anchored to the weak view's guess, a
    pre-mixup strong-view loss and rotation prediction."""

    @classmethod
    def context_from(cls, cfg, data, load_record) -> dict:
        out = super().context_from(cfg, data, load_record)
        if cfg.da_target == "labeled":
            out["labeled_labels"] = data.train.labels[data.labeled]
        return out

    def __init__(self, cfg, backbone: nn.Module, info, num_unlabeled: int = 0,
                 labeled_labels: Optional[Tensor] = None) -> None:
        super().__init__(cfg, backbone, info, num_unlabeled)
        k = info.num_classes
        if cfg.da_target == "labeled":
            counts = labeled_class_counts(labeled_labels, k, "remixmatch (da_target labeled)")
            p_target = counts / counts.sum()
        else:
            p_target = torch.full((k,), 1.0 / k)
        self.dist_align = PredictionHistory(p_target, cfg.da_len)
        # USB's ReMixMatch_Net.rot_classifier: one linear layer on the pooled feature
        self.rot_head: Optional[nn.Module] = nn.Linear(backbone.num_features, 4) if cfg.rot_loss_ratio > 0 else None
        self.ctaugment: Optional[CTAugment] = CTAugment() if cfg.augment == "ctaugment" else None

    def unit_weak(self, images: Tensor) -> Tensor:
        """uint8/float (N, C, H, W) -> the weak view's translate/flip, float in [0, 1], not normalised."""
        return random_translate_flip(to_unit_float(images), self.cfg.data.translate, self.cfg.data.hflip)

    def augmented_view(self, images: Tensor) -> Tensor:
        """A strong view (N, C, H, W), normalised: `strong_view` (RandAugment + Cutout), or with ctaugment the
        weak translate/flip, CTAugment's ops drawn from its weights, then Cutout (strong.cutout)."""
        if self.ctaugment is None:
            return self.strong_view(images)
        y = self.unit_weak(images)
        y = self.ctaugment.apply(y, self.ctaugment.sample(y.shape[0]))
        return self.normalize(cutout(y, self.cfg.strong.cutout))

    @torch.no_grad()
    def probe_ctaugment(self, images: Tensor, labels: Tensor) -> Tensor:
        """CTAugment's weight update from labeled images (B, C, H, W) and labels (B,): each image under uniformly
        drawn ops, classified by the network in eval mode; the ops, predictions and labels are gathered over ranks
        (rank order), so every rank applies the same update. -> the probe scores (world · B,)."""
        y = self.unit_weak(images)
        choice = self.ctaugment.probe(y.shape[0])
        with eval_mode(self.net):
            probs = torch.softmax(self.net(self.normalize(self.ctaugment.apply(y, choice))).float(), dim=1)
        return self.ctaugment.update_gathered(choice, probs, labels)

    def threshold_metrics(self) -> dict:
        return {"remixmatch/p_model": [round(float(p), 4) for p in self.dist_align.p_model]}

    @torch.no_grad()
    def guess(self, u_weak: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised weak views (N, C, H, W) -> (aligned prediction (N, K), sharpened guess (N, K)); BatchNorm
        running statistics untouched, p_model takes the batch in."""
        with frozen_bn_statistics(self.net):
            probs = torch.softmax(self.net(u_weak).float(), dim=1)
        aligned = self.dist_align(probs)
        return aligned, sharpen(aligned, self.cfg.temperature)

    def mixed_logits(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, float]:
        """Mix images (or, with mixup_manifold, their backbone features) and targets; classify. -> (logits,
        mixed targets, λ')."""
        if self.cfg.mixup_manifold:
            mixed, mixed_targets, lam = mixup(self.net.backbone(inputs), targets, self.cfg.mixup_alpha)
            return self.net.head(mixed), mixed_targets, lam
        mixed, mixed_targets, lam = mixup(inputs, targets, self.cfg.mixup_alpha)
        return self.net(mixed), mixed_targets, lam

    def strong_and_rotation_logits(self, u_strong: Tensor) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The first strong view (N, C, H, W) -> (its class logits (N, K), rotation logits (N, 4) of a randomly
        rotated copy and their labels (N,), or None without the head); one pass (joint_forward) or two, BatchNorm
        running statistics frozen."""
        with batch_statistics_only(self.net):
            if self.rot_head is None:
                return self.net(u_strong), None, None
            rotated, labels = random_rotation(u_strong)
            if not self.cfg.joint_forward:
                return self.net(u_strong), self.rot_head(self.net.backbone(rotated)), labels
            features = self.net.backbone(torch.cat([u_strong, rotated]))
            n = u_strong.shape[0]
            return self.net.head(features[:n]), self.rot_head(features[n:]), labels

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        b = batch.x.shape[0]
        x, u_weak = self.weak_view(batch.x), self.weak_view(batch.u)
        u_strong = [self.augmented_view(batch.u) for _ in range(cfg.num_augmentations)]
        probe_scores = None if self.ctaugment is None else self.probe_ctaugment(batch.x, batch.y)
        aligned, guess = self.guess(u_weak)
        self.track_pseudo_labels(aligned, torch.ones_like(aligned[:, 0]), batch.u_y)
        targets = torch.cat([F.one_hot(batch.y, self.info.num_classes).float(),
                             guess.repeat(len(u_strong) + 1, 1)])
        logits, mixed_targets, lam = self.mixed_logits(torch.cat([x, *u_strong, u_weak]), targets)
        logits_s, logits_rot, rotation_labels = self.strong_and_rotation_logits(u_strong[0])
        supervised, unsupervised, strong = remixmatch_loss(logits[:b], mixed_targets[:b], logits[b:],
                                                           mixed_targets[b:], logits_s, guess)
        ramp = linear_rampup(progress.step, cfg.unsup_warmup * progress.total_steps)
        loss = supervised + ramp * (cfg.lambda_u * unsupervised + cfg.kl_loss_ratio * strong)
        out = {"supervised_loss": supervised.detach(), "unsupervised_loss": unsupervised.detach(),
               "strong_loss": strong.detach(), "unsup_weight": torch.tensor(ramp), "mixup_lambda": torch.tensor(lam)}
        if logits_rot is not None:
            rotation = F.cross_entropy(logits_rot.float(), rotation_labels)
            loss = loss + cfg.rot_loss_ratio * rotation
            out["rotation_loss"] = rotation.detach()
        if probe_scores is not None:
            out["cta_probe_score"] = probe_scores.mean()
        out["loss"] = loss
        return out
