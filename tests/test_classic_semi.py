"""Π-model, VAT and ICT: each loss against the paper's formula computed naively (values and gradients); VAT's
adversarial direction (norm ε per sample, the naive power iteration, the top eigenvector of the KL's Hessian, more
KL than a random direction, unchanged under bf16 autocast); BatchNorm running statistics left to the labeled pass;
ICT's mixing coefficient and teacher; each method training on its own defaults on digits."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import build_semi_method, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.losses import (entropy_minimization_loss, ict_loss, ict_mix_coefficient, ict_targets, interpolate,
                            mean_teacher_loss, mixup, vat_loss, virtual_adversarial_perturbation)
from ssl_kit.methods.base import Progress

DATA = {"dataset": "digits", "image_size": 16, "labels_per_class": 4}
TRAIN = {"steps": 6, "batch_size": 8, "log_every": 1, "progress": False, "eval_every_epochs": 0}


def _method(name: str, **overrides):
    """The method on its own defaults (recommended optimizer and schedule: no optimizer/schedule keys given)."""
    stage = tiny_stage(name, name, data=DATA, train=TRAIN, **overrides)
    stage.pop("optimizer"), stage.pop("schedule")
    return build_semi_method(stage)


def _progress(step: int, total: int = 100) -> Progress:
    return Progress(step=step, total_steps=total, epoch=0, steps_per_epoch=10)


def _bn_state(net: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


def _after_labeled_pass_only(method, batch, seed: int) -> list[torch.Tensor]:
    """BN running statistics of a copy of the network after one forward of the labeled weak view (seed replayed)."""
    net = copy.deepcopy(method.net)
    torch.manual_seed(seed)
    with torch.no_grad():
        net(method.weak_view(batch.x))
    return _bn_state(net)


# ------------------------------------------------------------------------------------------------ losses, naively
def _naive_kl(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for n in range(q_logits.shape[0]):
        q, p = torch.softmax(q_logits[n], 0), torch.softmax(p_logits[n], 0)
        total = total + sum(q[k] * torch.log(q[k] / p[k]) for k in range(q.shape[0]))
    return total / q_logits.shape[0]


def test_pi_model_consistency_is_the_papers_squared_error_values_and_gradients():
    torch.manual_seed(0)
    second = (torch.randn(6, 5) * 2).requires_grad_(True)
    first = (torch.randn(6, 5) * 2).requires_grad_(True)
    ours = mean_teacher_loss(second, first)  # Π-model: the first view is the target, without gradient
    ours.backward()
    grad_ours = second.grad.clone()
    assert first.grad is None
    a, b = second.detach().clone().requires_grad_(True), first.detach()
    naive = sum((torch.softmax(a[n], 0)[k] - torch.softmax(b[n], 0)[k]) ** 2 for n in range(6) for k in range(5)) / 30
    naive.backward()  # Laine & Aila: (1 / (C·|B|)) Σ ‖z_i − z̃_i‖²
    assert ours.item() == pytest.approx(naive.item(), rel=1e-5) and ours.item() > 0.01
    torch.testing.assert_close(grad_ours, a.grad, rtol=1e-4, atol=1e-7)


def test_vat_kl_and_entropy_terms_equal_the_formulas_values_and_gradients():
    torch.manual_seed(1)
    clean = (torch.randn(5, 4) * 2).requires_grad_(True)
    perturbed = (torch.randn(5, 4) * 2).requires_grad_(True)
    kl = vat_loss(clean, perturbed)
    kl.backward()
    assert clean.grad is None  # the clean prediction is the target
    p = perturbed.detach().clone().requires_grad_(True)
    naive = _naive_kl(clean.detach(), p)
    naive.backward()
    assert kl.item() == pytest.approx(naive.item(), rel=1e-5) and kl.item() > 0.1
    torch.testing.assert_close(perturbed.grad, p.grad, rtol=1e-4, atol=1e-7)
    assert vat_loss(clean.detach(), clean.detach()).item() == pytest.approx(0.0, abs=1e-7)

    logits = (torch.randn(5, 4) * 2).requires_grad_(True)
    entropy = entropy_minimization_loss(logits)
    entropy.backward()
    z = logits.detach().clone().requires_grad_(True)
    naive_h = -sum(torch.softmax(z[n], 0)[k] * torch.log(torch.softmax(z[n], 0)[k])
                   for n in range(5) for k in range(4)) / 5
    naive_h.backward()
    assert entropy.item() == pytest.approx(naive_h.item(), rel=1e-5)
    torch.testing.assert_close(logits.grad, z.grad, rtol=1e-4, atol=1e-7)
    assert entropy_minimization_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4))


def _small_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def test_vat_perturbation_is_the_naive_power_iteration_with_norm_eps():
    """In float64: at ξ = 1e-6 float32 cannot resolve x + ξd (see the next test)."""
    net, x = _small_net().double(), torch.randn(6, 3, 2, 2, dtype=torch.float64)
    r = virtual_adversarial_perturbation(net, x, xi=1e-6, eps=2.5, iterations=1,
                                         generator=torch.Generator().manual_seed(7))
    assert r.shape == x.shape and not r.requires_grad
    torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((6,), 2.5, dtype=torch.float64))
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).double()  # the same random start
    for n in range(6):  # one sample at a time: g = ∇_r KL(p(x) ‖ p(x + r)) at r = ξ d / ‖d‖
        start = (1e-6 * d[n] / d[n].norm()).requires_grad_(True)
        kl = _naive_kl(net(x[n:n + 1]).detach(), net(x[n:n + 1] + start))
        (g,) = torch.autograd.grad(kl, start)
        expected = 2.5 * g / g.norm()
        cosine = F.cosine_similarity(r[n].flatten(), expected.flatten(), dim=0)
        assert cosine.item() > 0.9999, (n, cosine.item())


def test_vat_perturbation_in_float32_follows_float64_with_a_resolvable_xi():
    """float32 reproduces the float64 direction once ξ is above its resolution (ξ = 1e-4 here); USB's 1e-6 is not."""
    net, x = _small_net(), torch.randn(6, 3, 2, 2)
    exact = virtual_adversarial_perturbation(copy.deepcopy(net).double(), x.double(), xi=1e-4,
                                             generator=torch.Generator().manual_seed(7))
    fp32 = virtual_adversarial_perturbation(net, x, xi=1e-4, generator=torch.Generator().manual_seed(7))
    assert F.cosine_similarity(fp32.double().flatten(1), exact.flatten(1), dim=1).min() > 0.99


def test_vat_power_iteration_finds_the_top_eigenvector_of_the_kl_hessian():
    """For logits W·x the Hessian of KL(p(x) ‖ p(x + r)) at r = 0 is Wᵀ(diag q − q qᵀ)W per sample; repeated power
    iterations converge to its top eigenvector."""
    torch.manual_seed(4)
    linear = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    r = virtual_adversarial_perturbation(linear, x, xi=1e-6, eps=1.0, iterations=30,
                                         generator=torch.Generator().manual_seed(0))
    w = linear.weight.detach()
    for n in range(3):
        q = torch.softmax(w @ x[n], 0)
        hessian = w.T @ (torch.diag(q) - torch.outer(q, q)) @ w
        top = torch.linalg.eigh(hessian).eigenvectors[:, -1]
        assert abs(torch.dot(r[n], top).item()) > 0.999


def test_vat_direction_increases_the_kl_more_than_random_directions_of_the_same_norm():
    net, x, eps = _small_net().double(), torch.randn(8, 3, 2, 2, dtype=torch.float64), 0.5
    with torch.no_grad():
        clean = net(x)

    def per_sample_kl(r):
        with torch.no_grad():
            log_q, log_p = F.log_softmax(clean, 1), F.log_softmax(net(x + r), 1)
            return (log_q.exp() * (log_q - log_p)).sum(1)

    generator = torch.Generator().manual_seed(2)
    random_kls = []
    for _ in range(20):
        d = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        random_kls.append(per_sample_kl(eps * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)))
    random_kls = torch.stack(random_kls)
    one = per_sample_kl(virtual_adversarial_perturbation(net, x, eps=eps, generator=torch.Generator().manual_seed(1)))
    assert (one > random_kls.mean(dim=0)).all() and one.mean() > 3 * random_kls.mean()
    two = per_sample_kl(virtual_adversarial_perturbation(net, x, eps=eps, iterations=2,
                                                         generator=torch.Generator().manual_seed(1)))
    assert (two > random_kls.max(dim=0).values).all()  # every sample: more than the worst of 20 random directions


def test_vat_perturbation_is_computed_in_full_precision_under_bf16_autocast():
    """ξ = 1e-6 is below bf16's resolution: under autocast the power iteration must still see the perturbation."""
    net, x = _small_net(), torch.randn(6, 3, 2, 2)
    fp32 = virtual_adversarial_perturbation(net, x, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = virtual_adversarial_perturbation(net, x, generator=torch.Generator().manual_seed(5))
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, fp32)


def test_ict_targets_and_loss_equal_the_formulas_values_and_gradients():
    torch.manual_seed(5)
    student = (torch.randn(6, 4) * 2).requires_grad_(True)
    teacher = (torch.randn(6, 4) * 2).requires_grad_(True)
    lam, order = 0.3, torch.tensor([2, 0, 1, 5, 3, 4])
    for mixing in ("logits", "probabilities"):
        s = student.detach().clone().requires_grad_(True)
        loss = ict_loss(s, teacher, lam, order, mixing)
        loss.backward()
        assert teacher.grad is None
        naive_s = student.detach().clone().requires_grad_(True)
        total = 0.0
        for n in range(6):
            t_a, t_b = teacher[n].detach(), teacher[order[n]].detach()
            target = (torch.softmax(lam * t_a + (1 - lam) * t_b, 0) if mixing == "logits"
                      else lam * torch.softmax(t_a, 0) + (1 - lam) * torch.softmax(t_b, 0))
            total = total + ((torch.softmax(naive_s[n], 0) - target) ** 2).sum()
        naive = total / (6 * 4)
        naive.backward()
        assert loss.item() == pytest.approx(naive.item(), rel=1e-5), mixing
        torch.testing.assert_close(s.grad, naive_s.grad, rtol=1e-4, atol=1e-7)
    by_logits, by_probs = ict_targets(teacher, lam, order, "logits"), ict_targets(teacher, lam, order, "probabilities")
    assert (by_logits - by_probs).abs().max() > 1e-3  # the two readings differ
    x = torch.randn(6, 1, 2, 2)
    torch.testing.assert_close(interpolate(x, lam, order), lam * x + (1 - lam) * x[order])


def test_ict_mix_coefficient_is_beta_alpha_alpha_without_folding():
    generator = torch.Generator().manual_seed(0)
    first = ict_mix_coefficient(0.5, generator)
    draws = torch.tensor([first] + [ict_mix_coefficient(0.5, generator) for _ in range(3999)], dtype=torch.float64)
    assert draws.min() >= 0 and draws.max() <= 1
    assert (draws < 0.5).float().mean().item() == pytest.approx(0.5, abs=0.04)  # λ below ½ kept (MixMatch folds)
    assert draws.mean().item() == pytest.approx(0.5, abs=0.02)
    assert draws.var().item() == pytest.approx(0.25 / (2 * 0.5 + 1), abs=0.01)  # Var Beta(α, α) = 1 / (4(2α + 1))
    assert ict_mix_coefficient(0.0) == 1.0
    again = torch.Generator().manual_seed(0)
    assert ict_mix_coefficient(0.5, again) == first


@pytest.mark.parametrize("call,message", [
    (lambda: virtual_adversarial_perturbation(nn.Identity(), torch.zeros(2, 3), eps=0), r"eps must be a number > 0"),
    (lambda: virtual_adversarial_perturbation(nn.Identity(), torch.zeros(2, 3), xi=-1), r"xi must be a number > 0"),
    (lambda: virtual_adversarial_perturbation(nn.Identity(), torch.zeros(2, 3), iterations=0),
     r"iterations must be an integer >= 1"),
    (lambda: virtual_adversarial_perturbation(nn.Identity(), torch.zeros(2, 3, dtype=torch.long)),
     r"x must be a floating-point tensor"),
    (lambda: vat_loss(torch.zeros(2, 3), torch.zeros(3, 3)), r"clean_logits and perturbed_logits must have the same"),
    (lambda: entropy_minimization_loss(torch.zeros(3)), r"logits must be a 2-D tensor"),
    (lambda: ict_loss(torch.zeros(2, 3), torch.zeros(2, 3), 1.5, torch.tensor([1, 0])), r"lam must be a number in"),
    (lambda: ict_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.5, torch.tensor([0])), r"order must be an int64"),
    (lambda: ict_targets(torch.zeros(2, 3), 0.5, torch.tensor([1, 0]), "mean"), r"target_mixing must be one of"),
    (lambda: ict_mix_coefficient(-1), r"alpha must be a number >= 0"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------ methods
def test_pi_model_step_is_the_formula_and_leaves_bn_to_the_labeled_pass():
    method, data = _method("pi_model")
    assert (method.cfg.lambda_u, method.cfg.unsup_warmup, method.cfg.mu) == (10.0, 0.4, 1)
    batch = semi_batch(data, 8, 1)
    expected_bn = _after_labeled_pass_only(method, batch, seed=3)
    torch.manual_seed(3)
    out = method.training_step(batch, _progress(20, 100))  # linear ramp: 20 / (0.4 · 100) = 0.5
    for got, want in zip(_bn_state(method.net), expected_bn):
        torch.testing.assert_close(got, want)
    torch.manual_seed(3)  # replay: the same three weak views
    logits_x = method.net(method.weak_view(batch.x))
    first, second = method.net(method.weak_view(batch.u)), method.net(method.weak_view(batch.u))
    consistency = ((torch.softmax(second, 1) - torch.softmax(first, 1).detach()) ** 2).mean()
    assert out["unsup_weight"].item() == pytest.approx(5.0)
    assert out["unsupervised_loss"].item() == pytest.approx(consistency.item(), rel=1e-5)
    assert out["unsupervised_loss"].item() > 0  # two different views disagree
    assert out["loss"].item() == pytest.approx((F.cross_entropy(logits_x, batch.y) + 5.0 * consistency).item(),
                                               rel=1e-5)


def test_vat_step_freezes_bn_in_the_perturbation_passes_and_adds_the_terms():
    method, data = _method("vat", vat_eps=0.5)  # ε in the range where the first-order direction dominates
    cfg = method.cfg
    assert (cfg.lambda_u, cfg.lambda_entropy, cfg.vat_xi, cfg.power_iterations, cfg.unsup_warmup) == \
        (1.0, 0.06, 1e-6, 1, 0.4)
    batch = semi_batch(data, 8, 1)
    expected_bn = _after_labeled_pass_only(method, batch, seed=4)
    torch.manual_seed(4)
    out = method.training_step(batch, _progress(100, 100))
    for got, want in zip(_bn_state(method.net), expected_bn):
        torch.testing.assert_close(got, want)  # running mean/var and counter: the labeled pass's only
    assert all(p.grad is None for p in method.net.parameters())  # the power iteration left .grad alone
    torch.manual_seed(4)
    method.weak_view(batch.x)
    u = method.weak_view(batch.u)
    logits_u = method.net(u)
    probs = torch.softmax(logits_u, 1)
    assert out["entropy_loss"].item() == pytest.approx(-(probs * probs.log()).sum(1).mean().item(), rel=1e-5)
    assert out["unsupervised_loss"].item() > 0
    assert out["loss"].item() == pytest.approx(out["supervised_loss"].item() + out["unsupervised_loss"].item()
                                               + 0.06 * out["entropy_loss"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.net.parameters())
    with torch.no_grad():  # the adversarial direction moves the digits CNN's prediction more than a random one
        logits_u, logits_adv = method.perturbed_logits(u)
        d = torch.randn_like(u)
        logits_random = method.net(u + 0.5 * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
    assert vat_loss(logits_u, logits_adv).item() > 5 * vat_loss(logits_u, logits_random).item()  # measured: ~18×


def test_ict_uses_the_ema_teacher_and_the_drawn_mixing_coefficient():
    method, data = _method("ict")
    cfg = method.cfg
    assert (cfg.lambda_u, cfg.mixup_alpha, cfg.sup_mixup_alpha, cfg.unsup_warmup, cfg.rampup, cfg.ema_m) == \
        (100.0, 1.0, 1.0, 0.25, "sigmoid", 0.999)
    batch = semi_batch(data, 8, 1)
    with torch.no_grad():  # a teacher that differs from the student: uniform predictions
        method.teacher.head.weight.zero_(), method.teacher.head.bias.zero_()
    for seed in range(3):
        torch.manual_seed(seed)
        out = method.training_step(batch, _progress(25, 100))  # sigmoid ramp complete at 0.25 · 100
        torch.manual_seed(seed)  # replay: views, the labeled mixup, λ and π
        x, u = method.weak_view(batch.x), method.weak_view(batch.u)
        x, targets, _ = mixup(x, F.one_hot(batch.y, 10).float(), 1.0)
        lam = ict_mix_coefficient(1.0)
        order = torch.randperm(u.shape[0])
        logits = method.net(torch.cat([x, lam * u + (1 - lam) * u[order]]))
        consistency = ((torch.softmax(logits[8:], 1) - 0.1) ** 2).mean()  # the teacher's target: uniform
        supervised = -(targets * F.log_softmax(logits[:8], 1)).sum(1).mean()
        assert out["mix_lambda"].item() == pytest.approx(lam)
        assert out["unsupervised_loss"].item() == pytest.approx(consistency.item(), rel=1e-5)
        assert out["loss"].item() == pytest.approx((supervised + 100.0 * consistency).item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    before = [p.clone() for p in method.teacher.parameters()]
    method.after_optimizer_step(_progress(5))
    m = min(1 - 1 / 7, 0.999)  # Mean Teacher's (and the ICT code's) decay warm-up
    for old, student, teacher in zip(before, method.net.parameters(), method.teacher.parameters()):
        torch.testing.assert_close(teacher, m * old + (1 - m) * student.detach())


@pytest.mark.parametrize("name", ["pi_model", "vat", "ict"])
def test_method_trains_on_its_own_defaults_on_digits(name):
    method, data = _method(name)
    opt = method.cfg.optimizer
    defaults = {"pi_model": ("lambda_u", 10.0), "vat": ("vat_eps", 6.0), "ict": ("lambda_u", 100.0)}[name]
    assert getattr(method.cfg, defaults[0]) == defaults[1]
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay, method.cfg.schedule.name) == \
        (0.03, 0.9, True, 5e-4, "fixmatch_cosine")
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=opt.lr,
                                momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=opt.weight_decay)
    start = [p.detach().clone() for p in method.net.parameters()]
    torch.manual_seed(0)
    for step in range(3):
        batch = semi_batch(data, 8, method.cfg.mu)
        progress = _progress(50 + step, 100)  # past the ramp-up: the unlabeled term counts
        out = method.training_step(batch, progress)
        assert math.isfinite(out["loss"].item()) and math.isfinite(out["unsupervised_loss"].item())
        assert out["unsup_weight"].item() > 0
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_optimizer_step(progress)
    moved = sum((p.detach() - s).abs().sum().item() for p, s in zip(method.net.parameters(), start))
    assert moved > 1e-3
    assert method.epoch_metrics()["pseudo/mask_rate"] == 1.0  # every unlabeled image counted


@pytest.mark.parametrize("method,key,value,expected", [
    ("vat", "vat_eps", 0, r"stages\[vat\]\.vat_eps: .*greater than 0"),
    ("vat", "power_iterations", 0, r"stages\[vat\]\.power_iterations: .*greater than or equal to 1"),
    ("ict", "target_mixing", "mean", r"stages\[ict\]\.target_mixing: .*'logits' or 'probabilities'"),
    ("ict", "mixup_alpha", -0.5, r"stages\[ict\]\.mixup_alpha: .*greater than or equal to 0"),
    ("pi_model", "rampup", "cosine", r"stages\[pi_model\]\.rampup: .*'linear' or 'sigmoid'"),
])
def test_config_errors_name_the_key(method, key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_recipe({"seed": 0, "stages": [tiny_stage(method, method, **{key: value})]})
