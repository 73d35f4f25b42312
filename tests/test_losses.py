"""Losses against straightforward, independent implementations (values and gradients), hand-computed examples and
their documented edge behaviour."""
import math

import pytest
import torch

from ssl_kit.losses import dino_loss, fixmatch_loss, info_nce_loss, kd_loss, mae_loss, nt_xent_loss


def reference_nt_xent(z1, z2, t):
    """Loop over the 2N anchors: -log(exp(s_ip/t) / Σ_{k≠i} exp(s_ik/t))."""
    z = torch.cat([z1, z2])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        sims = torch.stack([z[i] @ z[k] / t for k in range(n2) if k != i])
        pos = z[i] @ z[partner] / t
        total = total - (pos - torch.logsumexp(sims, 0))
    return total / n2


@pytest.mark.parametrize("n,d,t", [(2, 3, 0.1), (5, 8, 0.5), (8, 4, 1.0), (3, 16, 2.0)])
def test_nt_xent_matches_reference_values_and_gradients(n, d, t):
    torch.manual_seed(n * d)
    z1 = torch.randn(n, d, requires_grad=True)
    z2 = torch.randn(n, d, requires_grad=True)
    ours = nt_xent_loss(z1, z2, t)
    g1, g2 = torch.autograd.grad(ours, [z1, z2])
    ref = reference_nt_xent(z1, z2, t)
    r1, r2 = torch.autograd.grad(ref, [z1, z2])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g1, r1, atol=1e-5) and torch.allclose(g2, r2, atol=1e-5)


def test_nt_xent_scale_invariant_and_identical_pairs():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 6), torch.randn(4, 6)
    assert nt_xent_loss(z1, z2).item() == pytest.approx(nt_xent_loss(10 * z1, 0.1 * z2).item(), rel=1e-5)
    # orthogonal, identical pairs: positive sim 1, 2N-2 negatives at sim 0
    e = torch.eye(4)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 6))
    assert nt_xent_loss(e, e, t).item() == pytest.approx(expected, rel=1e-6)


def reference_info_nce(q, k, queue, t):
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    losses = []
    for i in range(q.shape[0]):
        if queue is None:
            logits = torch.stack([q[i] @ k[j] for j in range(k.shape[0])]) / t
            losses.append(-(logits[i] - torch.logsumexp(logits, 0)))
        else:
            neg = queue / queue.norm(dim=1, keepdim=True)
            logits = torch.cat([(q[i] @ k[i]).view(1), neg @ q[i]]) / t
            losses.append(-(logits[0] - torch.logsumexp(logits, 0)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("use_queue", [False, True])
@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_matches_reference(use_queue, t):
    torch.manual_seed(1)
    q = torch.randn(6, 5, requires_grad=True)
    k = torch.randn(6, 5)
    queue = torch.randn(11, 5) if use_queue else None
    ours = info_nce_loss(q, k, queue, t)
    ref = reference_info_nce(q, k, queue, t)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(torch.autograd.grad(ours, q)[0], torch.autograd.grad(ref, q)[0], atol=1e-5)


def test_contrastive_bf16_autocast_is_stable():
    torch.manual_seed(0)
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = nt_xent_loss(z1.bfloat16(), z2.bfloat16(), 0.05)
    assert low.dtype == torch.float32 and math.isfinite(low.item())
    assert low.item() == pytest.approx(nt_xent_loss(z1, z2, 0.05).item(), rel=0.05)


@pytest.mark.parametrize("call,message", [
    (lambda: nt_xent_loss(torch.randn(3, 4), torch.randn(3, 5)), "same shape"),
    (lambda: nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), 0.0), "temperature must be a number > 0"),
    (lambda: nt_xent_loss(torch.randn(3), torch.randn(3)), "2-D"),
    (lambda: nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4).double()), "float64"),
    (lambda: info_nce_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 3)), "dimension 3"),
    (lambda: info_nce_loss(torch.randn(3, 4), torch.randn(3, 4), temperature=-1), "> 0"),
    (lambda: fixmatch_loss(torch.randn(3, 4), torch.randn(3, 4), 1.5), r"threshold must be in \[0, 1\]"),
    (lambda: kd_loss(torch.randn(3, 4), torch.randn(3, 5)), "same shape"),
    (lambda: mae_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4)), r"mask must be \(N, L\)"),
    (lambda: dino_loss([torch.randn(2, 4)], [torch.randn(2, 4)], torch.zeros(4)), "i != j"),
])
def test_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_fixmatch_loss_hand_computed():
    logits_weak = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 8.0]], requires_grad=True)
    logits_strong = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]], requires_grad=True)
    loss, mask = fixmatch_loss(logits_weak, logits_strong, threshold=0.95)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    ce0 = -math.log(math.e / (math.e + 2))
    ce2 = -math.log(math.e ** 2 / (math.e ** 2 + math.e + 1))
    assert loss.item() == pytest.approx((ce0 + ce2) / 3, rel=1e-6)  # mean over all N, masked rows count as 0
    loss.backward()
    assert logits_weak.grad is None or torch.count_nonzero(logits_weak.grad) == 0
    assert torch.count_nonzero(logits_strong.grad[1]) == 0 and torch.count_nonzero(logits_strong.grad[0]) > 0


def test_fixmatch_threshold_edges():
    weak, strong = torch.randn(10, 4), torch.randn(10, 4)
    assert fixmatch_loss(weak, strong, 0.0)[1].sum() == 10
    assert fixmatch_loss(weak, strong, 1.0)[1].sum() == 0


def test_kd_loss_hand_computed_and_properties():
    s = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    t = torch.tensor([[3.0, 2.0, 1.0]], requires_grad=True)
    T = 2.0
    p_t = torch.softmax(t / T, 1)
    p_s = torch.softmax(s / T, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() * T * T
    loss = kd_loss(s, t, T)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert kd_loss(t.detach(), t.detach(), 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_temperature_squared_keeps_gradient_scale():
    torch.manual_seed(0)
    s = torch.randn(64, 10, requires_grad=True)
    t = torch.randn(64, 10)
    grads = []
    for T in (4.0, 8.0):
        g, = torch.autograd.grad(kd_loss(s, t, T), s)
        grads.append(g.norm().item())
    # soft-target gradients scale as 1/T² (Hinton et al.); the T² factor cancels that, so doubling T keeps the
    # gradient magnitude (without the factor the ratio would be ~4)
    assert 0.85 < grads[0] / grads[1] < 1.2


def test_mae_loss_hand_computed_norm_pix_on_and_off():
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0]]])  # (1, 2 patches, 2 pixels)
    pred = torch.zeros(1, 2, 2)
    mask = torch.tensor([[1.0, 0.0]])
    assert mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx((1 + 9) / 2)
    # patch 0: mean 2, unbiased var 2 -> normalised ±1/sqrt(2 + 1e-6); MSE vs 0 = 1/(2 + 1e-6)
    assert mae_loss(pred, target, mask, norm_pix=True).item() == pytest.approx(1 / (2 + 1e-6), rel=1e-6)
    mask_both = torch.ones(1, 2)
    assert mae_loss(pred, target, mask_both, norm_pix=False).item() == pytest.approx((5 + 4) / 2)


def reference_dino(student, teacher, center, ts, tt):
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        p = torch.softmax((t - center) / tt, dim=1)
        for j, s in enumerate(student):
            if i == j:
                continue
            total += torch.sum(-p * torch.log_softmax(s / ts, dim=1), dim=1).mean()
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_student", [2, 4, 6])
def test_dino_loss_matches_reference(n_student):
    torch.manual_seed(n_student)
    student = [torch.randn(5, 7, requires_grad=True) for _ in range(n_student)]
    teacher = [torch.randn(5, 7, requires_grad=True) for _ in range(2)]
    center = torch.randn(1, 7)
    ours = dino_loss(student, teacher, center, 0.1, 0.04)
    ref = reference_dino(student, [t.detach() for t in teacher], center, 0.1, 0.04)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    ours.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None for s in student)
