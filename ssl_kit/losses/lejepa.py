"""LeJEPA (Balestriero & LeCun 2025): a prediction loss between views plus SIGReg, no teacher, no stop-gradient.

Each image is seen in Vg global and Vl local views, embedded (projector output, not normalised) as z_v,i ∈ ℝᴰ.

Prediction: every view (global and local) predicts the centre of the image's global views,

    pred = mean_{v, i, d} (c_i,d − z_v,i,d)²,   c_i = mean over the global views of z_v,i   (c keeps its gradient)

SIGReg (sketched isotropic Gaussian regularisation): M random unit directions a_m ∈ ℝᴰ (the slices) project each
view's batch to 1-D samples x = z·a_m; the Epps-Pulley statistic compares their empirical characteristic function
with that of N(0, 1),

    EP = N · ∫ |mean_i e^{i t x_i} − e^{−t²/2}|² e^{−t²/2} dt,

integrated by the trapezoidal rule on `knots` points of [0, t_max] (the integrand is even: twice the half-line), and
SIGReg is its mean over slices and views. The loss is λ·SIGReg + (1 − λ)·pred.

The statistic reads the batch only through the means of cos(t·x) and sin(t·x) over the samples, so the global
batch's statistic is the one of the all-reduced sums (the reference implementation all-reduces them, so does
lightly's `gather_distributed`). `LeJEPALoss` does that under torchrun, with gradients, and draws the slices from a
generator seeded by its call counter, so every rank projects on the same directions without communicating.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._checks import check_positive_int, check_unit_interval, full_precision
from ._distributed import active_world, all_reduce_no_grad, all_reduce_sum_with_grad


def _check_knots(knots: int, t_max: float) -> None:
    if isinstance(knots, bool) or not (isinstance(knots, int) and knots >= 2):
        raise ValueError(f"knots must be an integer >= 2, got {knots!r}")
    if isinstance(t_max, bool) or not (isinstance(t_max, (int, float)) and t_max > 0):
        raise ValueError(f"t_max must be a number > 0, got {t_max!r}")


def _check_views(name: str, z: Tensor) -> None:
    if not hasattr(z, "ndim") or z.ndim != 3 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"{name} must be a 3-D tensor (V views, N images, D) with V >= 1 and N >= 1, got shape "
                         f"{tuple(getattr(z, 'shape', ()))}")


def _check_inputs(global_z: Tensor, local_z: Optional[Tensor]) -> None:
    _check_views("global_z", global_z)
    if local_z is not None:
        _check_views("local_z", local_z)
        if local_z.shape[1:] != global_z.shape[1:]:
            raise ValueError(f"local_z and global_z must have the same N images and D, got shapes "
                             f"{tuple(local_z.shape)} and {tuple(global_z.shape)}")


def _check_directions(directions: Tensor, dim: int) -> None:
    if not hasattr(directions, "ndim") or directions.ndim != 2 or directions.shape[0] != dim:
        raise ValueError(f"directions must be a 2-D tensor (D={dim}, M slices), got shape "
                         f"{tuple(getattr(directions, 'shape', ()))}")


def epps_pulley_grid(knots: int = 17, t_max: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    """The integration grid: t (K,) = linspace(0, t_max, K); phi (K,) = e^{−t²/2}, the characteristic function of
    N(0, 1); weights (K,) = trapezoidal weights over [−t_max, t_max] folded onto t ≥ 0 (dt at both ends, 2·dt
    inside), times phi (the integration window)."""
    _check_knots(knots, t_max)
    t = torch.linspace(0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    trapezoid = torch.full((knots,), 2 * dt, dtype=torch.float32)
    trapezoid[[0, -1]] = dt
    phi = torch.exp(-t.square() / 2)
    return t, phi, trapezoid * phi


def sigreg_directions(dim: int, num_slices: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """M = num_slices random unit directions of ℝᴰ, as the columns of a (D, M) float32 CPU tensor: Gaussian draws
    (from `generator`, else torch's global RNG) divided by their norms."""
    check_positive_int("dim", dim)
    check_positive_int("num_slices", num_slices)
    directions = torch.randn(dim, num_slices, generator=generator)
    return directions / directions.norm(dim=0)


def _cf_sums(z: Tensor, directions: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """z (V, N, D), directions (D, M), t (K,) -> sums over the N samples of cos(t·x) and sin(t·x), each (V, M, K)."""
    x_t = (z @ directions).unsqueeze(-1) * t
    return x_t.cos().sum(dim=1), x_t.sin().sum(dim=1)


def _epps_pulley(cos_sum: Tensor, sin_sum: Tensor, n: int, phi: Tensor, weights: Tensor) -> Tensor:
    """Sums (V, M, K) over n samples -> the statistic averaged over views and slices (scalar)."""
    error = (cos_sum / n - phi).square() + (sin_sum / n).square()
    return ((error @ weights) * n).mean()


def sigreg(z: Tensor, directions: Tensor, knots: int = 17, t_max: float = 3.0) -> Tensor:
    """SIGReg of each view's batch, averaged over views and slices. z: (V, N, D) embeddings of V views of N
    images (or (N, D): one view); directions: (D, M) unit slice directions (`sigreg_directions`). -> scalar >= 0,
    small when every slice of every view looks like a sample of N(0, 1)."""
    z3 = z.unsqueeze(0) if hasattr(z, "ndim") and z.ndim == 2 else z
    _check_views("z", z3)
    _check_directions(directions, z3.shape[-1])
    t, phi, weights = (x.to(z3.device) for x in epps_pulley_grid(knots, t_max))
    with full_precision(z3):
        cos_sum, sin_sum = _cf_sums(z3.float(), directions.to(z3.device, torch.float32), t)
        return _epps_pulley(cos_sum, sin_sum, z3.shape[1], phi, weights)


def lejepa_prediction_loss(global_z: Tensor, local_z: Optional[Tensor] = None) -> Tensor:
    """Mean squared distance of every view (global and local) to its image's centre of the global views.
    global_z: (Vg, N, D); local_z: (Vl, N, D) or None. -> scalar (mean over views, images and dimensions)."""
    _check_inputs(global_z, local_z)
    with full_precision(global_z):
        all_z = _all_views(global_z.float(), None if local_z is None else local_z.float())
        return (global_z.float().mean(dim=0) - all_z).square().mean()


def _all_views(global_z: Tensor, local_z: Optional[Tensor]) -> Tensor:
    return global_z if local_z is None else torch.cat([global_z, local_z])


def lejepa_loss(global_z: Tensor, local_z: Optional[Tensor], directions: Tensor, lambda_: float = 0.05,
                knots: int = 17, t_max: float = 3.0) -> Tensor:
    """LeJEPA: λ · SIGReg(all views) + (1 − λ) · prediction loss. global_z: (Vg, N, D) projections of the global
    views; local_z: (Vl, N, D) of the local views or None; directions: (D, M) the SIGReg slices. Defaults: λ 0.05,
    17 knots on [0, 3] (reference implementation and lightly's LeJEPALoss). -> scalar."""
    check_unit_interval("lambda_", lambda_)
    _check_inputs(global_z, local_z)
    all_z = _all_views(global_z, local_z)
    return lambda_ * sigreg(all_z, directions, knots, t_max) + (1 - lambda_) * lejepa_prediction_loss(global_z,
                                                                                                        local_z)


def _slice_seed(seed: int, step: int) -> int:
    """One 63-bit generator seed per (seed, call) pair."""
    return (seed * 0x9E3779B97F4A7C15 + step) % (1 << 63)


class LeJEPALoss(nn.Module):
    """lejepa_loss with its slices drawn here and SIGReg over the global batch.

    Slices: M = num_slices fresh directions per call, from a CPU generator seeded by (seed, the `step` buffer); the
    buffer counts the calls and is saved with the method, so a resumed run and every rank draw the same directions
    (as the reference's synchronised global step does). Under torchrun (gather_distributed and > 1 ranks) the
    cos/sin sums and the sample count are all-reduced (the sums with gradients): SIGReg is the global batch's on
    every rank; the prediction loss is this rank's mean. The mean over ranks and the engine-averaged gradient equal
    lejepa_loss on the global batch. Single process: exactly lejepa_loss with the drawn directions."""

    def __init__(self, lambda_: float = 0.05, num_slices: int = 1024, knots: int = 17, t_max: float = 3.0,
                 seed: int = 0, gather_distributed: bool = True) -> None:
        super().__init__()
        check_unit_interval("lambda_", lambda_)
        check_positive_int("num_slices", num_slices)
        _check_knots(knots, t_max)
        self.lambda_, self.num_slices, self.seed = lambda_, num_slices, seed
        self.gather_distributed = gather_distributed
        t, phi, weights = epps_pulley_grid(knots, t_max)
        self.register_buffer("t", t, persistent=False)
        self.register_buffer("phi", phi, persistent=False)
        self.register_buffer("weights", weights, persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def next_directions(self, dim: int) -> Tensor:
        """The (D, M) slices of this call (CPU float32); advances the `step` buffer."""
        generator = torch.Generator().manual_seed(_slice_seed(self.seed, int(self.step)))
        self.step += 1
        return sigreg_directions(dim, self.num_slices, generator)

    def terms(self, global_z: Tensor, local_z: Optional[Tensor] = None,
              directions: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """global_z (Vg, n, D), local_z (Vl, n, D) or None: this rank's projections; directions (D, M), default: the
        next drawn slices. -> (SIGReg over the global batch, this rank's prediction loss), scalars."""
        _check_inputs(global_z, local_z)
        if directions is None:
            directions = self.next_directions(global_z.shape[-1])
        _check_directions(directions, global_z.shape[-1])
        all_z = _all_views(global_z, local_z)
        with full_precision(all_z):
            cos_sum, sin_sum = _cf_sums(all_z.float(), directions.to(all_z.device, torch.float32), self.t)
            n = all_z.shape[1]
            if active_world(self.gather_distributed) > 1:
                cos_sum, sin_sum = all_reduce_sum_with_grad(cos_sum), all_reduce_sum_with_grad(sin_sum)
                n = int(all_reduce_no_grad(torch.tensor(float(n), device=all_z.device)))
            statistic = _epps_pulley(cos_sum, sin_sum, n, self.phi, self.weights)
        return statistic, lejepa_prediction_loss(global_z, local_z)

    def weighted(self, sigreg_term: Tensor, prediction: Tensor) -> Tensor:
        """λ · SIGReg + (1 − λ) · prediction."""
        return self.lambda_ * sigreg_term + (1 - self.lambda_) * prediction

    def forward(self, global_z: Tensor, local_z: Optional[Tensor] = None,
                directions: Optional[Tensor] = None) -> Tensor:
        """See `terms`. -> scalar loss."""
        return self.weighted(*self.terms(global_z, local_z, directions))
