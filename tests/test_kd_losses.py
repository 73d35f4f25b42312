"""Decoupled KD, multi-teacher KD and the FitNets hint loss against the papers' formulas computed naively (loops over
samples and classes): values, gradients, the KD = TCKD + (1 − p_t)·NCKD decomposition, hand-computed cases."""
import math

import pytest
import torch

from ssl_kit.losses import dkd_loss, hint_loss, kd_loss, multi_teacher_kd_loss


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def reference_dkd_terms(s, t, y, temperature):
    """Per-sample TCKD and NCKD (each × T²) and the teacher's target probability, written from the DKD paper:
    b = [p_y, 1 − p_y] from softmax over all classes; p̂ = softmax over the non-target classes alone."""
    n, k = s.shape
    tckd, nckd, p_target = [], [], []
    for i in range(n):
        ps = torch.softmax(s[i] / temperature, 0)
        pt = torch.softmax(t[i] / temperature, 0).detach()
        c = int(y[i])
        bs, bt = [ps[c], 1 - ps[c]], [pt[c], 1 - pt[c]]
        tckd.append(sum(bt[j] * (torch.log(bt[j]) - torch.log(bs[j])) for j in range(2)) * temperature ** 2)
        others = [j for j in range(k) if j != c]
        hat_s = torch.softmax(torch.stack([s[i, j] for j in others]) / temperature, 0)
        hat_t = torch.softmax(torch.stack([t[i, j] for j in others]) / temperature, 0).detach()
        nckd.append(sum(hat_t[j] * (torch.log(hat_t[j]) - torch.log(hat_s[j])) for j in range(k - 1))
                    * temperature ** 2)
        p_target.append(pt[c])
    return tckd, nckd, p_target


@pytest.mark.parametrize("alpha,beta,temperature", [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 2.0)])
def test_dkd_matches_reference_values_and_gradients(alpha, beta, temperature):
    torch.manual_seed(int(10 * temperature))
    s = torch.randn(6, 5, requires_grad=True)
    t = (2 * torch.randn(6, 5)).requires_grad_()
    y = torch.randint(0, 5, (6,))
    ours = dkd_loss(s, t, y, alpha, beta, temperature)
    tckd, nckd, _ = reference_dkd_terms(s, t, y, temperature)
    ref = sum(alpha * a + beta * b for a, b in zip(tckd, nckd)) / 6
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert close(torch.autograd.grad(ours, s, retain_graph=True)[0], torch.autograd.grad(ref, s)[0])
    ours.backward()
    assert t.grad is None and s.grad is not None


def test_kd_decomposes_into_tckd_and_weighted_nckd():
    """The DKD paper's eq.: KD = TCKD + (1 − p_t^T) · NCKD per sample, with p_t^T the teacher's target probability."""
    torch.manual_seed(5)
    s, t = torch.randn(5, 7), 3 * torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    temperature = 4.0
    for i in range(5):
        si, ti, yi = s[i:i + 1], t[i:i + 1], y[i:i + 1]
        tckd = dkd_loss(si, ti, yi, alpha=1.0, beta=0.0, temperature=temperature)
        nckd = dkd_loss(si, ti, yi, alpha=0.0, beta=1.0, temperature=temperature)
        p_t = torch.softmax(ti / temperature, 1)[0, yi].item()
        kd = kd_loss(si, ti, temperature)
        assert kd.item() == pytest.approx(tckd.item() + (1 - p_t) * nckd.item(), rel=1e-5)
        if p_t < 0.99:  # DKD with α = β = 1 is not KD: it drops the (1 − p_t) coupling of NCKD
            assert dkd_loss(si, ti, yi, 1.0, 1.0, temperature).item() != pytest.approx(kd.item(), rel=1e-3)


def test_dkd_hand_computed_cases():
    # teacher sure of the target, indifferent among the others; student uniform: NCKD = 0, DKD = α · TCKD
    s, y = torch.zeros(1, 3), torch.tensor([0])
    t = torch.tensor([[2.0, 0.0, 0.0]])
    bt = [math.e ** 2 / (math.e ** 2 + 2), 2 / (math.e ** 2 + 2)]
    bs = [1 / 3, 2 / 3]
    tckd = sum(p * math.log(p / q) for p, q in zip(bt, bs))
    assert dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=1.0).item() == pytest.approx(tckd, rel=1e-6)
    # the teacher prefers class 1 among the non-targets: NCKD = Σ q log(q / ½) with q = softmax([1, 0])
    t = torch.tensor([[0.0, 1.0, 0.0]])
    q = [math.e / (math.e + 1), 1 / (math.e + 1)]
    nckd = sum(p * math.log(2 * p) for p in q)
    bt = [1 / (math.e + 2), (math.e + 1) / (math.e + 2)]
    tckd = sum(p * math.log(p / r) for p, r in zip(bt, bs))
    assert dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=1.0).item() == pytest.approx(nckd, rel=1e-6)
    assert dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=1.0).item() == pytest.approx(tckd + 8 * nckd, rel=1e-6)
    # T² scaling: logits scaled by T give the same distributions, so the loss grows by exactly T²
    assert dkd_loss(s, 2 * t, y, 1.0, 8.0, 2.0).item() == pytest.approx(4 * (tckd + 8 * nckd), rel=1e-6)


def test_dkd_is_finite_for_a_near_one_hot_teacher():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.full((4, 10), -30.0)
    t[torch.arange(4), torch.arange(4)] = 30.0
    loss = dkd_loss(s, t, torch.arange(4), temperature=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()


def reference_multi_teacher(s, teachers, weights, temperature):
    n, k = s.shape
    w = [x / sum(weights) for x in weights]
    total = 0.0
    for i in range(n):
        log_q = torch.log_softmax(s[i] / temperature, 0)
        probs = [torch.softmax(t[i] / temperature, 0) for t in teachers]
        for c in range(k):
            p = sum(w[j] * probs[j][c] for j in range(len(teachers)))
            total = total + p * (torch.log(p) - log_q[c])
    return total / n * temperature ** 2


def test_multi_teacher_kd_matches_reference_and_reduces_to_kd():
    torch.manual_seed(6)
    s = torch.randn(4, 6, requires_grad=True)
    teachers = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    ours = multi_teacher_kd_loss(s, teachers, weights, 3.0)
    ref = reference_multi_teacher(s, [t.detach() for t in teachers], weights, 3.0)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert close(torch.autograd.grad(ours, s, retain_graph=True)[0], torch.autograd.grad(ref, s)[0])
    ours.backward()
    assert all(t.grad is None for t in teachers)
    plain = [t.detach() for t in teachers]
    assert multi_teacher_kd_loss(s, plain[:1]).item() == pytest.approx(kd_loss(s, plain[0]).item(), rel=1e-6)
    # weights are normalised; None means equal weights
    assert multi_teacher_kd_loss(s, plain, [2, 4, 10], 3.0).item() == pytest.approx(ours.item(), rel=1e-6)
    assert multi_teacher_kd_loss(s, plain).item() == pytest.approx(
        multi_teacher_kd_loss(s, plain, [1, 1, 1]).item(), rel=1e-6)
    # a zero weight drops a teacher
    assert multi_teacher_kd_loss(s, plain, [1, 0, 0]).item() == pytest.approx(kd_loss(s, plain[0]).item(), rel=1e-6)


def test_hint_loss_is_elementwise_mse_with_no_teacher_gradient():
    student = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]]], requires_grad=True)  # (1, 2, 1, 2)
    teacher = torch.tensor([[[[0.0, 0.0]], [[3.0, 1.0]]]], requires_grad=True)
    loss = hint_loss(student, teacher)
    assert loss.item() == pytest.approx((1 + 4 + 9 + 1) / 4)
    loss.backward()
    assert teacher.grad is None and close(student.grad, 2 * (student - teacher).detach() / 4)
    assert hint_loss(torch.ones(3, 8), torch.ones(3, 8)).item() == 0.0


@pytest.mark.parametrize("call,message", [
    (lambda: dkd_loss(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(3, dtype=torch.long)), "same shape"),
    (lambda: dkd_loss(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 7])),
     r"targets must be class indices in \[0, 4\), got values in \[0, 7\]"),
    (lambda: dkd_loss(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long)),
     r"targets must have shape \(3,\), got \(2,\)"),
    (lambda: dkd_loss(torch.randn(3, 1), torch.randn(3, 1), torch.zeros(3, dtype=torch.long)), "at least 2 classes"),
    (lambda: dkd_loss(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.long), beta=-1),
     "beta must be a number >= 0, got -1"),
    (lambda: dkd_loss(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.long), temperature=0),
     "temperature must be a number > 0"),
    (lambda: multi_teacher_kd_loss(torch.randn(3, 4), []), "at least one teacher"),
    (lambda: multi_teacher_kd_loss(torch.randn(3, 4), [torch.randn(3, 4), torch.randn(3, 5)]),
     r"student_logits and teacher_logits\[1\] must have the same shape"),
    (lambda: multi_teacher_kd_loss(torch.randn(3, 4), [torch.randn(3, 4)] * 2, [1.0]),
     r"weights must have one entry per teacher \(2\), got 1"),
    (lambda: multi_teacher_kd_loss(torch.randn(3, 4), [torch.randn(3, 4)] * 2, [0, 0]),
     r"weights must be >= 0 and not all 0, got \[0.0, 0.0\]"),
    (lambda: multi_teacher_kd_loss(torch.randn(3, 4), [torch.randn(3, 4)] * 2, [1, -1]), "weights must be >= 0"),
    (lambda: hint_loss(torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)),
     r"student_features \(2, 8, 4, 4\) and teacher_features \(2, 16, 4, 4\) must have the same shape: map the student"),
    (lambda: hint_loss(torch.randn(4), torch.randn(4)), "at least 2 dimensions"),
])
def test_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
