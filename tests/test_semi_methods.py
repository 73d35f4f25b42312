"""The classic semi-supervised methods users compare FixMatch with: Pseudo-Label, Mean Teacher, UDA, MixMatch, Dash.
Each trains a few steps on digits end to end with its pseudo-label metrics logged; what is specific to each method is
checked against a hand computation."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_semi_method, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.errors import ConfigError
from ssl_kit.losses import uda_loss
from ssl_kit.methods.base import Progress
from ssl_kit.methods.dash import DashThreshold
from ssl_kit.methods.mixmatch import frozen_bn_statistics
from ssl_kit.runner import run_recipe

SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 6, "batch_size": 16, "ema_decay": 0.9, "log_every": 1})
EXTRA = {"pseudo_label": {"threshold": 0.3, "mu": 2},
         "mean_teacher": {"mu": 2},
         "uda": {"mu": 2, "tsa_schedule": "linear", "threshold_policy": {"policy": "softmatch"}},
         "mixmatch": {"mu": 2, "num_augmentations": 2},
         "dash": {"mu": 2, "warmup_steps": 2, "rho_window": 2, "rho_update_every": 1, "gamma": 1.5}}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(EXTRA))
def test_method_trains_on_digits_and_logs_pseudo_labels(method, tmp_path):
    stage = tiny_stage(method, method, **SEMI, **EXTRA[method])
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": method, "stages": [stage]}), tmp_path / "r")
    records = _records(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    assert len(steps) == 6 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(math.isfinite(r["unsupervised_loss"]) for r in steps if "unsupervised_loss" in r)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    assert epochs and all(0 <= r["pseudo/mask_rate"] <= 1 for r in epochs)
    assert all("pseudo/accuracy" in r and len(r["pseudo/mask_rate_per_class"]) == 10 for r in epochs)
    assert 0 <= summary[f"{method}/test/top1"] <= 1
    assert 0 <= summary[f"{method}/sweep/quantity@0.5"] <= 1


def _method(method: str, **overrides):
    return build_semi_method(tiny_stage(method, method, **{**SEMI, **EXTRA[method], **overrides}))


def _batch(data, b: int = 8, mu: int = 2) -> Batch:
    return semi_batch(data, b, mu)


def _progress(step: int, total: int = 100) -> Progress:
    return Progress(step=step, total_steps=total, epoch=0, steps_per_epoch=10)


def test_pseudo_label_ramp_weight_and_hard_targets(tmp_path):
    stage = tiny_stage("pl", "pseudo_label", **SEMI, **EXTRA["pseudo_label"], lambda_u=2.0, unsup_warmup=0.5)
    run_dir, _ = run_recipe(validate_recipe({"seed": 0, "name": "pl", "stages": [stage]}), tmp_path / "r")
    weights = {r["step"]: r["unsup_weight"] for r in _records(run_dir) if r.get("kind") == "step"}
    # USB: λ_u · clip(step / (0.5 · 6 steps), 0, 1), step 0-based (the record's step is 1-based)
    assert weights == pytest.approx({s: 2.0 * min((s - 1) / 3.0, 1.0) for s in range(1, 7)})
    method, data = _method("pseudo_label", threshold=0.0)
    batch = _batch(data)
    torch.manual_seed(1)
    out = method.training_step(batch, _progress(100, 100))
    torch.manual_seed(1)  # same weak views again: hard CE on the unlabeled rows' own argmax, every sample kept
    n = batch.x.shape[0]
    logits = method.net(torch.cat([method.weak_view(batch.x), method.weak_view(batch.u)]))
    expected = F.cross_entropy(logits[:n], batch.y) + \
        0.5 * 0 + 1.0 * F.cross_entropy(logits[n:], logits[n:].argmax(1))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["mask_rate"].item() == 1.0


def test_mean_teacher_is_an_ema_of_the_student_without_gradient():
    method, data = _method("mean_teacher", ema_m=0.99)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    teacher_before = [p.detach().clone() for p in method.teacher.parameters()]
    out = method.training_step(_batch(data), _progress(5))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.net.parameters())
    optimizer.step()
    method.after_optimizer_step(_progress(5))
    m = min(1 - 1 / 7, 0.99)  # reference warm-up of the decay: min(1 − 1/(global_step + 1), α), global_step = 6
    assert method.current_momentum == pytest.approx(m)
    for before, student, teacher in zip(teacher_before, method.net.parameters(), method.teacher.parameters()):
        torch.testing.assert_close(teacher, m * before + (1 - m) * student.detach())
    assert not torch.equal(teacher_before[0], next(method.teacher.parameters()))
    method.after_optimizer_step(_progress(10_000))
    assert method.current_momentum == 0.99
    # the consistency weight: λ_u · sigmoid ramp exp(−5 (1 − t)²), t = step / (0.4 · total)
    assert method.ramp(_progress(20, 100)) == pytest.approx(math.exp(-5 * 0.5 ** 2))
    assert method.ramp(_progress(40, 100)) == 1.0


def test_uda_tsa_masks_confident_labeled_samples_and_matches_uda_loss():
    method, _ = _method("uda", tsa_schedule="linear", threshold_policy={"policy": "fixed"}, threshold=0.6,
                        temperature=0.4)
    logits = torch.log(torch.tensor([[0.9] + [0.1 / 9] * 9, [0.3] + [0.7 / 9] * 9, [0.05] + [0.95 / 9] * 9]))
    y = torch.zeros(3, dtype=torch.long)
    loss, eta, kept = method.supervised_loss(logits, y, _progress(50, 100))
    assert eta == pytest.approx(0.5 * 0.9 + 0.1)  # η_t = α_t (1 − 1/K) + 1/K, α_t = t for 'linear'
    assert kept.tolist() == [0.0, 1.0, 1.0]  # correct-class probability 0.9 > η_t: dropped
    ce = -torch.log(torch.tensor([0.3, 0.05]))
    assert loss.item() == pytest.approx(ce.sum().item() / 3, rel=1e-5)  # USB: mean over all B
    weak, strong = torch.randn(12, 10) * 3, torch.randn(12, 10, requires_grad=True)
    probs, weights = method.gate(torch.softmax(weak, 1), torch.arange(12))
    from ssl_kit.losses import consistency_loss, sharpen
    ours = consistency_loss(strong, sharpen(probs, 0.4), weights)
    reference, mask = uda_loss(weak, strong, threshold=0.6, temperature=0.4)
    torch.testing.assert_close(weights, mask)
    torch.testing.assert_close(ours, reference)


def test_mixmatch_guesses_sharpened_mixed_and_bn_untouched():
    method, data = _method("mixmatch", num_augmentations=3, temperature=0.5, mixup_alpha=0.75)
    batch = _batch(data, b=4, mu=2)
    bn = [m for m in method.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    stats = [m.running_mean.clone() for m in bn]
    views = [method.weak_view(batch.u) for _ in range(3)]
    mean, guess = method.guess(views)
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bn))  # the guessing pass left BN alone
    naive = torch.stack([torch.softmax(method.net(v), 1) for v in views]).mean(0).detach()
    sharpened = naive ** 2 / (naive ** 2).sum(1, keepdim=True)  # p^(1/T), T = 0.5
    torch.testing.assert_close(guess, sharpened, rtol=1e-4, atol=1e-6)
    assert (guess.max(1).values >= naive.max(1).values - 1e-6).all()
    for seed in range(5):
        torch.manual_seed(seed)
        out = method.training_step(batch, _progress(100, 100))
        assert 0.5 <= out["mixup_lambda"].item() <= 1.0
        torch.manual_seed(seed)  # replay: same views, same Beta draw and permutation
        from ssl_kit.losses import mixup
        x = method.weak_view(batch.x)
        us = [method.weak_view(batch.u) for _ in range(3)]
        with frozen_bn_statistics(method.net), torch.no_grad():
            p = torch.stack([torch.softmax(method.net(u), 1) for u in us]).mean(0)
        q = p ** 2 / (p ** 2).sum(1, keepdim=True)
        targets = torch.cat([F.one_hot(batch.y, 10).float(), q, q, q])
        mixed, mixed_t, lam = mixup(torch.cat([x, *us]), targets, 0.75)
        logits = method.net(mixed)
        sup = -(mixed_t[:4] * F.log_softmax(logits[:4], 1)).sum(1).mean()
        unsup = ((torch.softmax(logits[4:], 1) - mixed_t[4:]) ** 2).sum() / (logits[4:].numel())
        assert lam == pytest.approx(out["mixup_lambda"].item())
        assert out["loss"].item() == pytest.approx((sup + 100.0 * unsup).item(), rel=1e-4)


def test_dash_threshold_decreases_by_gamma_then_turns_hard():
    policy = DashThreshold(num_classes=3, temperature=0.5, gamma=2.0, c=1.0, rho_min=0.3, warmup_steps=4,
                           rho_window=2, update_every=2)
    for step, loss in enumerate([9.0, 9.0, 2.0, 4.0]):  # only the last 2 warm-up steps count
        policy.observe_supervised(torch.tensor(loss), step)
    assert policy.rho_init().item() == 3.0
    rhos = []
    for step in range(4, 12):
        policy.schedule(step)
        rhos.append(policy.rho.item())
    assert rhos == pytest.approx([3.0, 3.0, 1.5, 1.5, 0.75, 0.75, 0.375, 0.375])
    assert not policy.hard()
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])
    soft = torch.softmax(torch.log(probs) / 0.5, 1)
    per_sample = -(soft * torch.log(probs)).sum(1)  # CE of the weak prediction against its own soft label
    assert policy.weights(probs, torch.arange(2)).tolist() == (per_sample <= 0.375).float().tolist()
    torch.testing.assert_close(policy.targets(probs), soft)
    policy.schedule(12)
    assert policy.rho.item() == pytest.approx(0.3) and policy.hard()
    assert policy.targets(probs).tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert policy.weights(probs, torch.arange(2)).tolist() == [1.0, 0.0]  # −log 0.9 ≤ 0.3 < −log 0.4


def test_dash_logs_rho_shrinking_after_warmup(tmp_path):
    stage = tiny_stage("dash", "dash", **SEMI, **EXTRA["dash"])
    run_dir, _ = run_recipe(validate_recipe({"seed": 0, "name": "d", "stages": [stage]}), tmp_path / "r")
    steps = [r for r in _records(run_dir) if r.get("kind") == "step"]
    assert all("unsupervised_loss" not in r for r in steps[:2])  # labeled-only warm-up
    rho = [r["dash/rho"] for r in steps[2:]]
    ratios = [a / b for a, b in zip(rho, rho[1:]) if b > 0.05]
    assert ratios and all(r == pytest.approx(1.5) for r in ratios)


@pytest.mark.parametrize("method,key,value,expected", [
    ("mixmatch", "mixup_alpha", -1, r"stages\[mixmatch\]\.mixup_alpha: .*greater than or equal to 0"),
    ("uda", "tsa_schedule", "cubic", r"stages\[uda\]\.tsa_schedule: .*'none', 'linear', 'exp' or 'log'"),
    ("dash", "gamma", 0.9, r"stages\[dash\]\.gamma: .*greater than or equal to 1"),
    ("mean_teacher", "ema_m", 1.0, r"stages\[mean_teacher\]\.ema_m: .*less than 1"),
    ("pseudo_label", "unsup_warmup", 2, r"stages\[pseudo_label\]\.unsup_warmup: .*less than or equal to 1"),
])
def test_config_errors_name_the_key(method, key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        validate_recipe({"seed": 0, "stages": [tiny_stage(method, method, **{key: value})]})
