"""Semi-supervised learning on imbalanced data (issue 28 part 3): DebiasPL, ACR and ABC on the weak/strong base.
Each term equals its paper's formula computed naively here (values and gradients), one step per method is checked by
hand on fixed logits, and each method trains a few steps on long-tailed digits with the minority metrics reported."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import build_semi_method, semi_batch, tiny_stage
from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.engine.checkpoint import resolve_checkpoint
from ssl_kit.errors import ConfigError
from ssl_kit.losses import (abc_keep_probs, abc_loss, abc_unlabeled_keep_probs, acr_tau, adaptive_marginal_loss,
                            adjusted_pseudo_labels, anchor_distances, bernoulli_mask, debiased_probs,
                            debiased_pseudo_labels, logit_adjusted_loss, logit_adjustment, prior_update,
                            symmetric_kl)
from ssl_kit.methods.base import Progress
from ssl_kit.runner import run_recipe

K = 5
LONG_TAIL = {"dataset": "digits", "image_size": 16, "labels_per_class": 20, "long_tail": {"ratio": 10}}


def _naive_ce(logits, labels):
    """−log softmax(logits)[label] per row, written out."""
    return -(logits - torch.logsumexp(logits, dim=1, keepdim=True)).gather(1, labels[:, None]).squeeze(1)


# ---------------------------------------------------------------------------------------------------- DebiasPL terms
def test_debiased_pseudo_label_is_the_counterfactual_softmax():
    torch.manual_seed(0)
    logits, prior = torch.randn(6, K) * 2, torch.softmax(torch.randn(K), 0)
    expected = torch.exp(logits - 0.4 * prior.log())
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(debiased_pseudo_labels(logits, prior, 0.4), expected, atol=1e-6)
    assert torch.allclose(debiased_probs(torch.softmax(logits, 1), prior, 0.4), expected, atol=1e-6)
    assert torch.allclose(debiased_pseudo_labels(logits, prior, 0.0), torch.softmax(logits, 1), atol=1e-6)
    probs = torch.softmax(logits, 1)
    assert torch.allclose(prior_update(prior, probs, 0.9), 0.9 * prior + 0.1 * probs.mean(0), atol=1e-7)
    with pytest.raises(ValueError, match=r"prior must have shape \(5,\)"):
        debiased_pseudo_labels(logits, prior[:3])
    with pytest.raises(ValueError, match="every entry > 0"):
        debiased_pseudo_labels(logits, torch.zeros(K))


def test_adaptive_marginal_loss_value_and_gradient():
    torch.manual_seed(1)
    logits = torch.randn(6, K, requires_grad=True)
    targets, weights = torch.randint(0, K, (6,)), torch.tensor([1.0, 0, 1, 1, 0, 1])
    prior = torch.softmax(torch.randn(K), 0)
    loss = adaptive_marginal_loss(logits, targets, prior, 0.4, weights)
    naive = (_naive_ce(logits + 0.4 * torch.log(prior), targets) * weights).sum() / 6
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    g, = torch.autograd.grad(loss, logits)
    g_naive, = torch.autograd.grad(naive, logits)
    assert torch.allclose(g, g_naive, atol=1e-7)
    # a rarely predicted class (small p̂) must win by a larger margin: equal logits cost it more
    flat, skewed = torch.zeros(1, 2), torch.tensor([0.9, 0.1])
    assert adaptive_marginal_loss(flat, torch.tensor([1]), skewed) > adaptive_marginal_loss(flat, torch.tensor([0]),
                                                                                            skewed)


# --------------------------------------------------------------------------------------------------------- ACR terms
def test_logit_adjustment_and_adjusted_loss():
    torch.manual_seed(2)
    prior = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    adj = logit_adjustment(prior, 2.0)
    assert torch.allclose(adj, torch.log(prior ** 2 + 1e-12)) and torch.isfinite(adj).all()
    logits, labels = torch.randn(7, K, requires_grad=True), torch.randint(0, K, (7,))
    loss = logit_adjusted_loss(logits, labels, adj)
    naive = _naive_ce(logits + adj, labels).mean()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(naive, logits)[0], atol=1e-7)
    expected = torch.exp(logits - adj)
    assert torch.allclose(adjusted_pseudo_labels(logits, adj), expected / expected.sum(1, keepdim=True), atol=1e-6)


def test_anchor_distances_and_tau_follow_acr():
    prior = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    estimate = torch.tensor([0.1, 0.15, 0.2, 0.25, 0.3])
    kl = torch.nn.KLDivLoss(reduction="sum")  # as the ACR code: 0.5 KL(input=log q, target=p) + 0.5 KL(log p, q)
    naive = [0.5 * kl(a.log(), estimate) + 0.5 * kl(estimate.log(), a)
             for a in (prior, torch.full((K,), 0.2), prior.flip(0))]
    d = anchor_distances(estimate, prior)
    assert torch.allclose(d, torch.stack(naive), atol=1e-6)
    assert symmetric_kl(prior, prior).item() == pytest.approx(0.0, abs=1e-7)
    assert symmetric_kl(prior, estimate).item() == pytest.approx(symmetric_kl(estimate, prior).item())
    tau = acr_tau(d, 0.0, 2.0)
    assert tau.item() == pytest.approx(2.0 * math.exp(d[0]) / sum(math.exp(x) for x in d.tolist()), rel=1e-6)
    # consistent unlabeled data: small d_con, small τ (little debiasing); reversed: τ near τ_max
    assert acr_tau(anchor_distances(prior, prior)) < acr_tau(anchor_distances(prior.flip(0), prior))
    with pytest.raises(ValueError, match=r"distances must be \[d_con, d_uni, d_rev\]"):
        acr_tau(torch.zeros(2))


# --------------------------------------------------------------------------------------------------------- ABC terms
def test_abc_keep_probabilities_and_loss():
    counts = torch.tensor([40.0, 20, 10, 4, 0])
    keep = abc_keep_probs(counts)
    assert torch.allclose(keep, torch.tensor([0.1, 0.2, 0.4, 1.0, 1.0]))  # min/n_c; an absent class: 1
    assert torch.allclose(abc_unlabeled_keep_probs(keep, 0.0), torch.ones(K))
    assert torch.allclose(abc_unlabeled_keep_probs(keep, 1.0), keep)
    assert torch.allclose(abc_unlabeled_keep_probs(keep, 0.5), 1 - 0.5 * (1 - keep))
    assert bernoulli_mask(torch.tensor([0.0, 1.0, 1.0])).tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="at least one class > 0"):
        abc_keep_probs(torch.zeros(3))
    torch.manual_seed(3)
    lx, ls = torch.randn(4, K, requires_grad=True), torch.randn(6, K, requires_grad=True)
    y, yu = torch.randint(0, K, (4,)), torch.randint(0, K, (6,))
    ml, mu = torch.tensor([1.0, 0, 1, 1]), torch.tensor([0.0, 1, 1, 0, 0, 1])
    loss = abc_loss(lx, y, ls, yu, ml, mu)
    naive = (_naive_ce(lx, y) * ml).sum() / 4 + (_naive_ce(ls, yu) * mu).sum() / 6
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(loss, (lx, ls)), torch.autograd.grad(naive, (lx, ls))):
        assert torch.allclose(a, b, atol=1e-7)


# ------------------------------------------------------------------------------------------- hand-built method steps
def _method(name: str, **overrides):
    return build_semi_method(tiny_stage(name, name, data=LONG_TAIL, train={"steps": 4, "batch_size": 8}, **overrides))


def _batch(data, b: int = 4, mu: int = 2) -> Batch:
    return semi_batch(data, b, mu)


def _fixed_outputs(method, outputs):
    """Make the method's forward return `outputs` (the logits a step then works on)."""
    method.views = lambda batch: (None, None, None)
    method.forward_views = lambda *args, network=None: outputs


def test_debiaspl_step_by_hand():
    method, data = _method("debiaspl", threshold=0.5, ema_p=0.9)
    batch = _batch(data)
    torch.manual_seed(4)
    x, w, s = torch.randn(4, 10) * 3, torch.randn(8, 10) * 3, torch.randn(8, 10, requires_grad=True)
    q0 = torch.softmax(torch.randn(10), 0)
    method.gate.alignment.prior.copy_(q0)
    _fixed_outputs(method, (x, w, s))
    out = method.training_step(batch, Progress(0, 4, 0, 4))
    p = torch.softmax(w - 0.4 * q0.log(), 1)  # the pseudo-label uses p̂ before this batch
    mask = (p.max(1).values >= 0.5).float()
    q1 = 0.9 * q0 + 0.1 * torch.softmax(w, 1).mean(0)  # p̂ takes the raw predictions in
    assert torch.allclose(method.prior, q1, atol=1e-6)
    unsup = (_naive_ce(s + 0.4 * q1.log(), p.argmax(1)) * mask).mean()  # the marginal loss uses the new p̂
    assert out["loss"].item() == pytest.approx((_naive_ce(x, batch.y).mean() + unsup).item(), rel=1e-5)
    assert 0 < mask.sum() < 8 and "gate.alignment.prior" in method.state_dict()
    with pytest.raises(ConfigError, match="DebiasPL debiases the pseudo-labels itself"):
        validate_recipe({"stages": [tiny_stage("d", "debiaspl", threshold_policy={"distribution_alignment": True})]})


def test_acr_step_by_hand_and_tau_estimation():
    method, data = _method("acr", threshold=0.6, est_epoch=0, ema_u=0.5, tau12=1.0, tau2=1.5)
    batch = _batch(data)
    prior = method.labeled_prior
    counts = torch.bincount(data.train.labels[data.labeled], minlength=10).float()
    assert torch.allclose(prior, counts / counts.sum()) and prior[0] > prior[-1]
    torch.manual_seed(5)
    x, xb = torch.randn(4, 10), torch.randn(4, 10, requires_grad=True)
    w, wb = torch.randn(8, 10) * 4, torch.randn(8, 10) * 4
    s, sb = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
    _fixed_outputs(method, ((x, xb), (w, wb), (s, sb)))
    out = method.training_step(batch, Progress(0, 8, 0, 4))  # epoch 0: no estimation yet (epoch > est_epoch)
    assert float(method.tau) == 2.0 and float(method.distance_steps) == 0

    def adj(t):
        return torch.log(prior ** t + 1e-12)

    def conf(q):
        return q.max(1).values >= 0.6

    p, p12 = torch.softmax(w - adj(2.0), 1), torch.softmax(w - adj(1.0), 1)  # τ1 (adaptive, from tau1), τ12
    mask = (conf(p) | conf(torch.softmax(w, 1))).float()
    mask_b = (conf(torch.softmax(wb, 1)) | conf(p12)).float()
    expected = (_naive_ce(x, batch.y).mean() + _naive_ce(xb + adj(1.5), batch.y).mean()
                + (_naive_ce(s, p.argmax(1)) * mask).mean() + (_naive_ce(sb, p12.argmax(1)) * mask_b).mean())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # epoch 1 estimates: the balanced head's confident pseudo-labels move p̂_u and add anchor distances
    method.training_step(batch, Progress(4, 8, 1, 4))
    hist = torch.bincount(wb.argmax(1), weights=conf(torch.softmax(wb, 1)).float(), minlength=10)
    estimate = 0.5 * torch.full((10,), 0.1) + 0.5 * hist / hist.sum()
    assert torch.allclose(method.unlabeled_estimate, estimate, atol=1e-6)
    assert torch.allclose(method.distance_sum, anchor_distances(estimate, prior), atol=1e-6)
    method.training_step(batch, Progress(8, 12, 2, 4))  # epoch 2 starts with τ from epoch 1's mean distances
    assert float(method.tau) == pytest.approx(float(acr_tau(anchor_distances(estimate, prior), 0.0, 2.0)), rel=1e-5)
    assert {"tau", "unlabeled_estimate", "distance_sum", "distance_steps", "epoch"} <= set(method.state_dict())


def test_abc_balances_its_auxiliary_head_and_predicts_with_it():
    method, data = _method("abc", threshold=0.5, abc_threshold=0.5)
    counts = torch.bincount(data.train.labels[data.labeled], minlength=10).float()
    assert torch.allclose(method.keep, counts.min() / counts)
    images = torch.randn(3, data.info.channels, 16, 16)
    net = method.net.eval()
    assert torch.equal(method.classifier(None)(images), net.head(net.backbone(images)))  # the balanced head
    assert method.head() is net.head and method.net.standard_head is not net.head
    batch = _batch(data)
    torch.manual_seed(6)
    x, xa = torch.randn(4, 10), torch.randn(4, 10, requires_grad=True)
    w, wa = torch.randn(8, 10) * 4, torch.randn(8, 10) * 4
    s, sa = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10, requires_grad=True)
    _fixed_outputs(method, ((x, xa), (w, wa), (s, sa)))
    method.keep.fill_(1.0)  # balanced labels: every mask is the confidence mask, so the step is deterministic
    out = method.training_step(batch, Progress(0, 4, 0, 4))
    pw, pa = torch.softmax(w, 1), torch.softmax(wa, 1)
    mask, mask_a = (pw.max(1).values >= 0.5).float(), (pa.max(1).values >= 0.5).float()
    expected = (_naive_ce(x, batch.y).mean() + (_naive_ce(s, pw.argmax(1)) * mask).mean()
                + _naive_ce(xa, batch.y).mean() + (_naive_ce(sa, pa.argmax(1)) * mask_a).mean())
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    method.keep.fill_(0.0)  # never kept: at the end of training no image reaches the auxiliary head
    assert method.auxiliary_loss(xa, batch.y, wa, sa, 1.0)[0].item() == 0.0
    loss, kept = method.auxiliary_loss(xa, batch.y, wa, sa, 0.0)  # at the start: the confident ones, unbalanced
    assert kept.item() == mask_a.mean().item() and loss.item() == pytest.approx(
        (_naive_ce(sa, pa.argmax(1)) * mask_a).mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------- short runs on long-tailed data
@pytest.mark.parametrize("method", ["debiaspl", "acr", "abc"])
def test_each_method_trains_on_long_tailed_digits(method, tmp_path):
    stage = tiny_stage("lt", method, data=LONG_TAIL, train={"steps": 2, "batch_size": 8, "ema_decay": 0.9})
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "lt", "stages": [stage]}), tmp_path / "r")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row.get("kind") == "step"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert 0 <= summary["lt/test/balanced_accuracy"] <= 1 and 0 <= summary["lt/test/minority_recall"] <= 1
    record = resolve_checkpoint(run_dir / "backbone.pt")
    assert record["head"]["num_classes"] == 10
    if method in ("acr", "abc"):  # backbone.pt's head is the balanced head of the evaluated (EMA) network
        checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        ema = checkpoint.get("ema")
        assert ema is not None and "module.head.weight" in ema and "module.standard_head.weight" in ema
        assert torch.equal(record["head"]["state_dict"]["weight"], ema["module.head.weight"])
