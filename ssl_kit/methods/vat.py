"""Virtual adversarial training (Miyato et al. 2018), as USB runs it (`vat`, images: vat_embed false): on a weak
view u of each unlabeled image, the adversarial direction r_adv (L2 norm `vat_eps` per sample) is found by
`power_iterations` power-iteration steps of finite size `vat_xi` (`virtual_adversarial_perturbation`); the
prediction on u + r_adv is pulled towards the one on u (KL, `vat_loss`), weighted by λ_u times a linear ramp-up
over `unsup_warmup` of training; plus `lambda_entropy` × the entropy of the prediction on u (VAT + EntMin,
`entropy_minimization_loss`, not ramped).

BatchNorm: as in USB (freeze_bn) and the VAT code (update_batch_stats=False), only the labeled pass updates the
running statistics; the clean, power-iteration and perturbed passes over u use their batch statistics and leave the
running ones as they were (`batch_statistics_only`). The power iteration runs in full float32 (autocast and TF32 off; see losses/vat.py)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.loader import Batch
from ..losses import entropy_minimization_loss, linear_rampup, vat_loss, virtual_adversarial_perturbation
from .base import Progress
from .registry import register
from .semi import USB_SGD, SemiSupervisedConfig, SemiSupervisedMethod


@contextmanager
def batch_statistics_only(module: nn.Module):
    """Every BatchNorm of `module` normalises with the statistics of the batch it sees and leaves its running
    mean/var and counter untouched (USB's freeze_bn, the VAT code's update_batch_stats=False). It sets
    track_running_stats off for the duration (restored on exit) instead of saving and copying the buffers back: an
    in-place copy after a pass that takes gradient would invalidate the tensors its backward saved."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class VATConfig(SemiSupervisedConfig):
    """VAT: CE + λ_u · ramp · KL(p(u) ‖ p(u + r_adv)) + lambda_entropy · H(p(u))."""

    method: Literal["vat"]

    recommended = USB_SGD
    recommended_source = ("USB's VAT config (config/classic_cv/vat/vat_cifar10_40_0.yaml): SGD Nesterov momentum "
                          "0.9, lr 0.03 (no batch scaling), weight decay 5e-4, lr · cos(7πk/16K)")
    mu: int = Field(1, ge=1, description="unlabeled batch = mu × labeled batch (USB uratio 1)")
    lambda_u: float = Field(1.0, ge=0, description="weight of the KL term (USB ulb_loss_ratio: its vat configs leave "
                                                   "the default 1.0; the paper's α 1)")
    lambda_entropy: float = Field(0.06, ge=0, description="weight of the entropy-minimisation term, 0 = plain VAT "
                                                          "(USB ent_loss_ratio 0.06)")
    vat_eps: float = Field(6.0, gt=0, description="L2 norm ε of the adversarial perturbation per sample, on "
                                                  "normalised images (USB vat_eps 6; the paper's CIFAR-10 ε)")
    vat_xi: float = Field(1e-6, gt=0, le=1, description="finite-difference step ξ of the power iteration (USB and "
                                                        "the VAT code: 1e-6)")
    power_iterations: int = Field(1, ge=1, le=10, description="power-iteration steps towards r_adv (USB num_iters 1; "
                                                              "the paper: one suffices)")
    unsup_warmup: float = Field(0.4, ge=0, le=1, description="fraction of the steps over which the KL weight ramps "
                                                             "linearly from 0 to lambda_u (USB unsup_warm_up)")


@register("vat", VATConfig)
class VAT(SemiSupervisedMethod):
    """Virtual adversarial training with entropy minimisation: the prediction on a weak unlabeled view must not move
    under the perturbation of norm ε that moves it most."""

    def perturbed_logits(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised unlabeled views u (N, C, H, W) -> (logits on u, logits on u + r_adv), both with gradient
        (r_adv itself without), BatchNorm running statistics untouched."""
        cfg = self.cfg
        with batch_statistics_only(self.net):
            logits_u = self.net(u)
            r_adv = virtual_adversarial_perturbation(self.net, u, cfg.vat_xi, cfg.vat_eps, cfg.power_iterations)
            logits_adv = self.net(u + r_adv)
        return logits_u, logits_adv

    def training_step(self, batch: Batch, progress: Progress) -> dict[str, Tensor]:
        cfg = self.cfg
        logits_x = self.net(self.weak_view(batch.x))  # the only pass that updates BN running statistics
        logits_u, logits_adv = self.perturbed_logits(self.weak_view(batch.u))
        with torch.no_grad():
            probs = torch.softmax(logits_u.detach().float(), dim=1)
            self.track_pseudo_labels(probs, torch.ones_like(probs[:, 0]), batch.u_y)
        supervised = F.cross_entropy(logits_x.float(), batch.y)
        smoothness = vat_loss(logits_u, logits_adv)
        entropy = entropy_minimization_loss(logits_u)
        weight = cfg.lambda_u * linear_rampup(progress.step, cfg.unsup_warmup * progress.total_steps)
        return {"loss": supervised + weight * smoothness + cfg.lambda_entropy * entropy,
                "supervised_loss": supervised.detach(), "unsupervised_loss": smoothness.detach(),
                "entropy_loss": entropy.detach(), "unsup_weight": torch.tensor(weight)}
