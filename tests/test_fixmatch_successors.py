"""The FixMatch successors on the weak/strong base: DeFixMatch, ReFixMatch, SequenceMatch, CRMatch. Each loss equals
its paper's formula computed naively here (values and gradients); a step of each method on fixed logits equals a
hand computation of its total loss; each trains a few steps on digits with its own defaults and logs pseudo-label
metrics."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_semi_method, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.losses import (crmatch_feature_distance_loss, defixmatch_loss, kl_consistency_loss,
                            refixmatch_low_confidence_loss, sequencematch_loss)
from ssl_kit.methods.base import Progress
from ssl_kit.methods.crmatch import rotation_batch
from ssl_kit.runner import run_recipe

METHODS = ("defixmatch", "refixmatch", "sequencematch", "crmatch")
SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 3, "batch_size": 8, "ema_decay": 0.9, "log_every": 1})
B, N, K = 8, 16, 10  # labeled rows, unlabeled rows (mu 2), classes (digits)


# ------------------------------------------------------------------------------------------------ naive formulas
def _log_softmax_row(row: torch.Tensor) -> torch.Tensor:
    return row - torch.log(torch.exp(row).sum())


def _softmax_row(row: torch.Tensor) -> torch.Tensor:
    return torch.exp(row) / torch.exp(row).sum()


def _naive_ce(logits, targets, weights):
    """(1/N) Σ_n w_n · −log softmax(logits_n)[y_n], one row at a time."""
    total = 0.0
    for row, y, w in zip(logits, targets, weights):
        total = total - w * _log_softmax_row(row)[y]
    return total / logits.shape[0]


def _naive_kl(logits, targets, weights):
    """(1/N) Σ_n w_n Σ_k t_nk (log t_nk − log softmax(logits_n)_k), 0 · log 0 = 0."""
    total = 0.0
    for row, t, w in zip(logits, targets, weights):
        log_q = _log_softmax_row(row)
        total = total + w * sum(tk * (math.log(tk) - lq) for tk, lq in zip(t.tolist(), log_q) if tk > 0)
    return total / logits.shape[0]


def _mask(logits, threshold):
    return [float(_softmax_row(row).max() >= threshold) for row in logits]


def _logits(*shape, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).requires_grad_()


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _same_grads(got, want) -> bool:
    """Gradients of the method's loss and of the hand formula agree (None: that leaf is not in the graph)."""
    return all((g is None and w is None) or (g is not None and w is not None and _close(g, w))
               for g, w in zip(got, want))


def _close(a, b, atol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=atol)


# ------------------------------------------------------------------------------------------------ losses
def test_defixmatch_loss_is_the_unlabeled_minus_the_labeled_pseudo_label_loss():
    weak_u, strong_u, weak_x, strong_x = _logits(N, K, seed=1), _logits(N, K, seed=2), _logits(B, K, seed=3), \
        _logits(B, K, seed=4)
    mask_u, mask_x = _mask(weak_u.detach(), 0.7), _mask(weak_x.detach(), 0.7)
    assert 0 < sum(mask_u) < N and 0 < sum(mask_x) < B
    pseudo_u, pseudo_x = weak_u.argmax(1), weak_x.argmax(1)
    debiased, unlabeled, labeled = defixmatch_loss(strong_u, pseudo_u, strong_x, pseudo_x, torch.tensor(mask_u),
                                                   torch.tensor(mask_x))
    naive_u, naive_x = _naive_ce(strong_u, pseudo_u, mask_u), _naive_ce(strong_x, pseudo_x, mask_x)
    assert _close(unlabeled, naive_u) and _close(labeled, naive_x) and _close(debiased, naive_u - naive_x)
    for got, want in zip(_grads(debiased, strong_u, strong_x), _grads(naive_u - naive_x, strong_u, strong_x)):
        assert _close(got, want)
    soft_u = torch.softmax(weak_u.detach(), 1)  # soft targets (N, K) work too; no weights = all ones
    assert _close(defixmatch_loss(strong_u, soft_u, strong_x, pseudo_x)[1],
                  -(soft_u * F.log_softmax(strong_u, 1)).sum(1).mean())
    with pytest.raises(ValueError, match="same number of classes"):
        defixmatch_loss(strong_u, pseudo_u, strong_x[:, :5], pseudo_x)


def test_kl_consistency_and_the_refixmatch_low_confidence_term_match_the_formula():
    strong, weak = _logits(N, K, seed=5), _logits(N, K, seed=6).detach()
    targets = torch.softmax(weak / 0.5, dim=1)
    weights = torch.tensor(_mask(weak, 0.8))
    assert 0 < weights.sum() < N
    loss = refixmatch_low_confidence_loss(strong, targets, weights)
    naive = _naive_kl(strong, targets, (1 - weights).tolist())  # only the rows below the threshold
    assert _close(loss, naive)
    assert _close(_grads(loss, strong)[0], _grads(naive, strong)[0])
    # KL, not cross-entropy: zero where the strong prediction equals the target, one-hot targets (0 log 0) included
    one_hot = F.one_hot(weak.argmax(1), K).float()
    assert _close(kl_consistency_loss(torch.log(targets), targets, torch.ones(N)), 0.0)
    assert _close(kl_consistency_loss(strong, one_hot, torch.ones(N)), F.cross_entropy(strong, weak.argmax(1)))
    with pytest.raises(ValueError, match=r"targets must be distributions of shape \(16, 10\)"):
        kl_consistency_loss(strong, targets[:, :3], weights)
    with pytest.raises(ValueError, match=r"weights must have shape \(16,\)"):
        kl_consistency_loss(strong, targets, weights[:3])


def test_sequencematch_loss_is_three_masked_kls_along_the_chain():
    medium, strong = _logits(N, K, seed=7), _logits(N, K, seed=8)
    weak = _logits(N, K, seed=9).detach()
    t_weak, t_medium = torch.softmax(weak / 0.5, 1), torch.softmax(medium.detach() / 0.5, 1)
    weights = torch.tensor(_mask(weak, 0.8))
    losses = sequencematch_loss(medium, strong, t_weak, t_medium, weights)
    naive = (_naive_kl(medium, t_weak, weights.tolist()), _naive_kl(strong, t_medium, weights.tolist()),
             _naive_kl(strong, t_weak, weights.tolist()))
    for got, want in zip(losses, naive):
        assert _close(got, want)
    for got, want in zip(_grads(sum(losses), medium, strong), _grads(sum(naive), medium, strong)):
        assert _close(got, want)
    with pytest.raises(ValueError, match="logits_medium and logits_strong must have the same shape"):
        sequencematch_loss(medium[:3], strong, t_weak, t_medium, weights)


def test_crmatch_feature_distance_pushes_apart_positively_similar_features():
    strong, weak = _logits(N, 6, seed=10), _logits(N, 6, seed=11)
    weights = torch.tensor([1.0, 0.0] * (N // 2))
    loss = crmatch_feature_distance_loss(strong, weak, weights)
    naive = 0.0
    for s, w, m in zip(strong, weak, weights.tolist()):
        naive = naive + m * torch.clamp((s * w).sum() / (s.norm() * w.norm()), min=0.0)
    naive = naive / N
    assert _close(loss, naive)
    for got, want in zip(_grads(loss, strong, weak), _grads(naive, strong, weak)):  # both views get gradient
        assert _close(got, want)
    usb = (F.cosine_embedding_loss(strong, weak, -torch.ones(N), reduction="none") * weights).mean()  # USB's call
    assert _close(loss, usb)
    assert _close(crmatch_feature_distance_loss(strong, -strong), 0.0)  # opposite features cost nothing
    with pytest.raises(ValueError, match=r"weights must have shape \(16,\)"):
        crmatch_feature_distance_loss(strong, weak, weights[:2])


def test_rotation_batch_rotates_like_usb_rotnet():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    rotated, labels = rotation_batch(images)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for i, image in enumerate(images):  # USB's rotate_img on one (C, H, W) image
        usb = [image, image.rot90(1, [1, 2]), image.rot90(2, [1, 2]), image.rot90(1, [2, 1])]
        for r in range(4):
            assert torch.equal(rotated[r * 2 + i], usb[r])
    with pytest.raises(ValueError, match="square"):
        rotation_batch(images[..., :3])


# ------------------------------------------------------------------------------------------------ methods
def _method(method: str, **overrides):
    return build_semi_method(tiny_stage(method, method, **{**SEMI, "mu": 2, **overrides}))


def _batch(data) -> Batch:
    return semi_batch(data, B, N // B)


PROGRESS = Progress(step=0, total_steps=10, epoch=0, steps_per_epoch=10)


def test_defaults_follow_usb():
    cfgs = {m: validate_recipe({"stages": [tiny_stage(m, m, **SEMI)]}).stages[0] for m in METHODS}
    assert all(c.threshold == 0.95 and c.mu == 7 for c in cfgs.values())
    assert cfgs["defixmatch"].lambda_u == 0.5 and cfgs["refixmatch"].lambda_u == 1.0
    assert cfgs["refixmatch"].temperature == cfgs["sequencematch"].temperature == 0.5
    policy = cfgs["sequencematch"].threshold_policy
    assert policy.policy == "flexmatch" and policy.flexmatch_warmup
    assert cfgs["sequencematch"].medium.num_ops == 1 < cfgs["sequencematch"].strong.num_ops
    assert cfgs["crmatch"].rot_loss_ratio == 1.0 and cfgs["refixmatch"].threshold_policy.policy == "fixed"


def test_defixmatch_step_equals_the_hand_computed_debiased_loss():
    model, data = _method("defixmatch", threshold=0.7)
    batch = _batch(data)
    lx, lxs, lw, ls = _logits(B, K, seed=1), _logits(B, K, seed=2), _logits(N, K, seed=3), _logits(N, K, seed=4)
    model.forward_all = lambda batch: (lx, lxs, lw, ls)
    out = model.training_step(batch, PROGRESS)
    mask_u, mask_x = _mask(lw.detach(), 0.7), _mask(lx.detach(), 0.7)
    assert 0 < sum(mask_u) < N and 0 < sum(mask_x) < B
    supervised = 0.5 * (_naive_ce(lx, batch.y, [1.0] * B) + _naive_ce(lxs, batch.y, [1.0] * B))
    debiased = _naive_ce(ls, lw.argmax(1), mask_u) - _naive_ce(lxs, lx.argmax(1), mask_x)
    total = supervised + 0.5 * debiased
    assert _close(out["loss"], total) and _close(out["mask_rate_labeled"], sum(mask_x) / B)
    grads = _grads(out["loss"], lx, lxs, lw, ls)
    assert grads[2] is None  # no gradient through the weak view's pseudo-labels
    assert _same_grads(grads, _grads(total, lx, lxs, lw, ls))


def test_refixmatch_step_equals_the_hand_computed_loss():
    model, data = _method("refixmatch", threshold=0.7)
    batch = _batch(data)
    lx, lw, ls = _logits(B, K, seed=1), _logits(N, K, seed=3), _logits(N, K, seed=4)
    model.forward_views = lambda *views: (lx, lw, ls)
    out = model.training_step(batch, PROGRESS)
    mask = _mask(lw.detach(), 0.7)
    targets = torch.stack([_softmax_row(row / 0.5) for row in lw.detach()])
    total = _naive_ce(lx, batch.y, [1.0] * B) + _naive_ce(ls, lw.argmax(1), mask) + \
        _naive_kl(ls, targets, [1 - m for m in mask])
    assert _close(out["loss"], total) and out["low_confidence_loss"] > 0
    for got, want in zip(_grads(out["loss"], lx, ls), _grads(total, lx, ls)):
        assert _close(got, want)


def test_sequencematch_step_equals_the_hand_computed_loss():
    model, data = _method("sequencematch", threshold=0.7, threshold_policy={"policy": "fixed"}, lambda_u=2.0)
    batch = _batch(data)
    lx, lw, lm, ls = _logits(B, K, seed=1), _logits(N, K, seed=3), _logits(N, K, seed=5), _logits(N, K, seed=4)
    model.forward_all = lambda batch: (lx, lw, lm, ls)
    out = model.training_step(batch, PROGRESS)
    mask = _mask(lw.detach(), 0.7)
    t_weak = torch.stack([_softmax_row(row / 0.5) for row in lw.detach()])
    t_medium = torch.stack([_softmax_row(row / 0.5) for row in lm.detach()])
    total = _naive_ce(lx, batch.y, [1.0] * B) + 2.0 * (
        _naive_ce(ls, lw.argmax(1), mask) + _naive_kl(lm, t_weak, mask) + _naive_kl(ls, t_medium, mask) +
        _naive_kl(ls, t_weak, mask))
    assert _close(out["loss"], total)
    for got, want in zip(_grads(out["loss"], lx, lm, ls), _grads(total, lx, lm, ls)):
        assert _close(got, want)


def test_crmatch_step_equals_the_hand_computed_loss():
    model, data = _method("crmatch", threshold=0.7, rot_loss_ratio=0.5)
    batch = _batch(data)
    first = (_logits(5 * B, K, seed=1), _logits(5 * B, 6, seed=2), _logits(5 * B, 4, seed=3))  # labeled + rotated
    weak = (_logits(N, K, seed=4), _logits(N, 6, seed=5), _logits(N, 4, seed=6))
    strong = (_logits(N, K, seed=7), _logits(N, 6, seed=8), _logits(N, 4, seed=9))
    seen = {}

    def fixed(labeled_and_rotated, u_weak, u_strong, network):
        seen["rows"] = labeled_and_rotated.shape[0]
        return first, weak, strong

    model.forward_views = fixed
    out = model.training_step(batch, PROGRESS)
    assert seen["rows"] == 5 * B  # B labeled + 4 rotations of B unlabeled images
    mask = _mask(weak[0].detach(), 0.7)
    distance = sum(m * max(F.cosine_similarity(s, w, dim=0), torch.tensor(0.0))
                   for s, w, m in zip(strong[1], weak[1], mask)) / N
    rotation = _naive_ce(first[2][B:], [r for r in range(4) for _ in range(B)], [1.0] * 4 * B)
    total = _naive_ce(first[0][:B], batch.y, [1.0] * B) + _naive_ce(strong[0], weak[0].argmax(1), mask) + \
        distance + 0.5 * rotation
    assert _close(out["loss"], total)
    leaves = (first[0], first[2], weak[1], strong[0], strong[1])
    for got, want in zip(_grads(out["loss"], *leaves), _grads(total, *leaves)):
        assert _close(got, want)
    without, _ = _method("crmatch", rot_loss_ratio=0.0)
    assert without.rot_head is None and model.rot_head is not None


@pytest.mark.parametrize("method", ["defixmatch", "sequencematch"])
def test_joint_pass_splits_back_into_the_views_in_order(method):
    model, data = _method(method)
    model.eval()  # batch norm on running statistics: the joint pass equals separate passes
    batch = _batch(data)
    torch.manual_seed(1)
    joint = model.forward_all(batch)
    torch.manual_seed(1)
    x, u_weak, u_strong = model.views(batch)
    extra = model.strong_view(batch.x) if method == "defixmatch" else model.medium_view(batch.u)
    order = (x, extra, u_weak, u_strong) if method == "defixmatch" else (x, u_weak, extra, u_strong)
    for got, images in zip(joint, order):
        assert torch.allclose(got, model.net(images), atol=1e-5)


def test_each_method_trains_on_its_defaults_and_logs_pseudo_labels(tmp_path):
    """One recipe, one stage per method (each from a fresh backbone): a runner and a report for all four."""
    stages = [tiny_stage(method, method, mu=2, **SEMI) for method in METHODS]
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "successors", "stages": stages}), tmp_path / "r")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for method in METHODS:
        own = [r for r in records if r.get("stage") == method]
        steps = [r for r in own if r.get("kind") == "step"]
        assert len(steps) == 3, method
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["unsupervised_loss"]) for r in steps), method
        epochs = [r for r in own if r.get("kind") == "epoch"]
        assert epochs and all(0 <= r["pseudo/mask_rate"] <= 1 and len(r["pseudo/mask_rate_per_class"]) == 10
                              for r in epochs), method
        assert 0 <= summary[f"{method}/test/top1"] <= 1
