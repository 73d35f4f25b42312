"""Virtual adversarial training (Miyato et al. 2018, TPAMI), as USB runs it (`vat`): the local distributional
smoothness term KL(p(y|x) ‖ p(y|x + r_adv)), where r_adv of L2 norm ε per sample is the direction in which the
prediction changes fastest, found by power iteration from a random direction with a finite difference of size ξ;
and the entropy-minimisation term of "VAT + EntMin".

The power iteration measures the change of the prediction under a perturbation of norm ξ = 1e-6, far below what
bf16/fp16 autocast or TF32 convolutions resolve: there x + ξd rounds back to x and the direction found is noise (or
zero). Its passes therefore run with autocast off and, on CUDA, TF32 off (restored afterwards)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_2d, check_positive_int, check_same


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")


def unit_per_sample(d: Tensor) -> Tensor:
    """Each sample (row of dimension 0) divided by its L2 norm over all other dimensions (+1e-16, USB's
    `_l2_normalize`, so an all-zero sample stays zero). d: (N, ...) -> (N, ...)."""
    norms = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.ndim - 1)))
    return d / (norms + 1e-16)


@contextmanager
def strict_fp32(device: torch.device):
    """Autocast off on `device`; on CUDA also TF32 off for matmuls and cuDNN convolutions (process-wide flags, put
    back on exit). Inside, float32 tensors are computed in full float32."""
    cuda = device.type == "cuda"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if cuda else None
    try:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def kl_divergence_from_logits(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(q ‖ p) averaged over the N samples: mean_n Σ_k q_nk (log q_nk − log p_nk), q = softmax(reference_logits),
    p = softmax(logits) (USB's `kl_div_with_logit`). Gradients flow into both arguments; callers detach the
    reference. logits: (N, K). -> scalar in the dtype of the inputs (at least float32)."""
    check_2d("reference_logits", reference_logits)
    check_2d("logits", logits)
    if reference_logits.shape != logits.shape:
        raise ValueError(f"reference_logits and logits must have the same shape, got {tuple(reference_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    dtype = torch.promote_types(torch.promote_types(reference_logits.dtype, logits.dtype), torch.float32)
    log_q = F.log_softmax(reference_logits.to(dtype), dim=1)
    log_p = F.log_softmax(logits.to(dtype), dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()


def virtual_adversarial_perturbation(forward: Callable[[Tensor], Tensor], x: Tensor, xi: float = 1e-6,
                                     eps: float = 6.0, iterations: int = 1,
                                     generator: Optional[torch.Generator] = None) -> Tensor:
    """r_adv = ε · g / ‖g‖ per sample (VAT, Algorithm 1): d ~ N(0, I); `iterations` times: g = ∇_r KL(p(x) ‖
    p(x + r)) at r = ξ · d / ‖d‖, d ← g; norms per sample over all non-batch dimensions. p(x) is recomputed here
    without gradient, in the same full-precision mode as the perturbed passes (`strict_fp32`), so the difference
    the finite step measures is the perturbation's alone. The gradient is taken with torch.autograd.grad: no
    parameter's .grad is touched. The caller keeps BatchNorm running statistics out of these passes (USB freezes
    them: `frozen_bn_statistics`).
    forward: inputs (N, ...) -> logits (N, K), e.g. the classifier; x: (N, ...) inputs (normalised images);
    generator: draws d (else torch's global RNG). -> r_adv (N, ...), no gradient, L2 norm ε per sample."""
    _check_positive("xi", xi)
    _check_positive("eps", eps)
    check_positive_int("iterations", iterations)
    if not hasattr(x, "ndim") or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor (N, ...), got {getattr(x, 'dtype', type(x).__name__)} "
                         f"of shape {tuple(getattr(x, 'shape', ()))}")
    x = x.detach()
    device = generator.device if generator is not None else x.device
    d = torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)  # float32 draws
    with strict_fp32(x.device), torch.enable_grad():
        with torch.no_grad():
            reference = forward(x)
        for _ in range(iterations):
            r = (xi * unit_per_sample(d)).requires_grad_(True)
            divergence = kl_divergence_from_logits(reference, forward(x + r))
            (d,) = torch.autograd.grad(divergence, r)
    return eps * unit_per_sample(d.detach())


def vat_loss(clean_logits: Tensor, perturbed_logits: Tensor) -> Tensor:
    """The local distributional smoothness term: KL(softmax(clean) ‖ softmax(perturbed)) averaged over the N
    samples, the clean prediction without gradient (USB: `kl_div_with_logit(ul_y.detach(), y_hat)`).
    clean_logits: (N, K) on x; perturbed_logits: (N, K) on x + r_adv. -> scalar (float32)."""
    check_2d("clean_logits", clean_logits)
    check_2d("perturbed_logits", perturbed_logits)
    check_same("clean_logits", clean_logits, "perturbed_logits", perturbed_logits)
    return kl_divergence_from_logits(clean_logits.detach(), perturbed_logits)


def entropy_minimization_loss(logits: Tensor) -> Tensor:
    """Mean prediction entropy −(1/N) Σ_n Σ_k p_nk log p_nk, p = softmax(logits) (VAT + EntMin; USB's
    `entropy_loss`, weight ent_loss_ratio). Gradient flows into the logits. logits: (N, K). -> scalar (float32)."""
    check_2d("logits", logits)
    log_p = F.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()
