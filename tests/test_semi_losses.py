"""Semi-supervised loss terms against the papers' formulas computed naively (loops over samples and classes):
values, gradients, hand-computed cases, schedules and argument errors."""
import math

import pytest
import torch

from ssl_kit.losses import (cosine_rampup, dash_mask, dash_threshold, dash_weak_loss, distribution_alignment,
                            linear_rampup, mean_teacher_loss, mixmatch_loss, mixmatch_targets, mixup,
                            random_logit_interpolation, relative_threshold, sharpen, sigmoid_rampup, simmatch_in_loss,
                            simmatch_unfold_aggregate, tsa_mask, tsa_threshold, uda_loss)


def softmax_row(row, t=1.0):
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# ---------------------------------------------------------------- sharpen and ramps

def test_sharpen_hand_computed_and_limits():
    p = torch.tensor([[0.5, 0.3, 0.2]])
    expected = torch.tensor([[0.25, 0.09, 0.04]]) / 0.38  # p^(1/0.5) renormalised
    assert close(sharpen(p, 0.5), expected)
    assert close(sharpen(p, 1.0), p)
    assert sharpen(p, 0.01).argmax().item() == 0 and sharpen(p, 0.01)[0, 0].item() > 0.999999
    batched = torch.rand(2, 3, 4)
    assert close(sharpen(batched, 0.3)[1], sharpen(batched[1], 0.3))  # (..., K): rows independent


def test_ramps_start_middle_end():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(1000, 100) == 1.0
    assert linear_rampup(0, 8) == 0.0 and linear_rampup(2, 8) == 0.25 and linear_rampup(9, 8) == 1.0
    assert cosine_rampup(0, 10) == pytest.approx(0.0) and cosine_rampup(5, 10) == pytest.approx(0.5)
    assert cosine_rampup(2.5, 10) == pytest.approx(0.5 - 0.5 * math.cos(math.pi / 4))
    assert cosine_rampup(10, 10) == pytest.approx(1.0) and cosine_rampup(30, 10) == pytest.approx(1.0)
    for ramp in (sigmoid_rampup, linear_rampup, cosine_rampup):
        assert ramp(0, 0) == 1.0  # no ramp


# ---------------------------------------------------------------- Mean Teacher

def reference_mean_teacher(s, t):
    n, k = s.shape
    total = 0.0
    for i in range(n):
        ps, pt = torch.softmax(s[i], 0), torch.softmax(t[i], 0).detach()
        total = total + sum((ps[c] - pt[c]) ** 2 for c in range(k)) / k
    return total / n


def test_mean_teacher_matches_reference_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    s = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 4, requires_grad=True)
    ours = mean_teacher_loss(s, t)
    ref = reference_mean_teacher(s, t)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    g_ours, = torch.autograd.grad(ours, s, retain_graph=True)
    g_ref, = torch.autograd.grad(ref, s)
    assert close(g_ours, g_ref)
    ours.backward()
    assert t.grad is None and s.grad is not None
    # hand-computed: 2 classes, student uniform, teacher (e/(1+e), 1/(1+e)): both squared gaps are equal
    gap = math.e / (1 + math.e) - 0.5
    assert mean_teacher_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(gap ** 2)
    assert mean_teacher_loss(t.detach(), t.detach()).item() == 0.0


# ---------------------------------------------------------------- UDA and TSA

def reference_uda(weak, strong, threshold, temperature):
    n, k = weak.shape
    total, mask = 0.0, []
    for i in range(n):
        p = softmax_row(weak[i].tolist())
        target = softmax_row(weak[i].tolist(), temperature)
        keep = 1.0 if max(p) >= threshold else 0.0
        log_q = torch.log_softmax(strong[i], 0)
        total = total + keep * -sum(target[c] * log_q[c] for c in range(k))
        mask.append(keep)
    return total / n, mask


@pytest.mark.parametrize("threshold,temperature", [(0.8, 0.4), (0.5, 1.0), (0.0, 0.2)])
def test_uda_matches_reference_values_gradients_and_mask(threshold, temperature):
    torch.manual_seed(3)
    weak = (3 * torch.randn(8, 5)).requires_grad_()
    strong = torch.randn(8, 5, requires_grad=True)
    loss, mask = uda_loss(weak, strong, threshold, temperature)
    ref, ref_mask = reference_uda(weak.detach(), strong, threshold, temperature)
    assert mask.tolist() == ref_mask
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    g, = torch.autograd.grad(loss, strong, retain_graph=True)
    assert close(g, torch.autograd.grad(ref, strong)[0])
    loss.backward()
    assert weak.grad is None


def test_uda_hand_computed_mask_and_sharpening():
    weak = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # max probs 0.881 and 0.5
    strong = torch.zeros(2, 2)
    loss, mask = uda_loss(weak, strong, threshold=0.8, temperature=0.4)
    assert mask.tolist() == [1.0, 0.0]
    # target of row 0 = softmax([2, 0] / 0.4) = softmax([5, 0]); CE to a uniform student = log 2 whatever the target
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=1e-6)
    strong = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    q = softmax_row([1.0, 0.0])
    for t in (0.4, 1.0):
        target = softmax_row([2.0 / t, 0.0])
        expected = -(target[0] * math.log(q[0]) + target[1] * math.log(q[1])) / 2
        assert uda_loss(weak, strong, 0.8, t)[0].item() == pytest.approx(expected, rel=1e-6)
    assert uda_loss(weak, strong, 0.8, 0.4)[0].item() != pytest.approx(uda_loss(weak, strong, 0.8, 1.0)[0].item())


@pytest.mark.parametrize("schedule,start,middle,end", [
    ("linear", 0.1, 0.1 + 0.9 * 0.5, 1.0),
    ("exp", 0.1 + 0.9 * math.exp(-5), 0.1 + 0.9 * math.exp(-2.5), 1.0),
    ("log", 0.1, 0.1 + 0.9 * (1 - math.exp(-2.5)), 0.1 + 0.9 * (1 - math.exp(-5))),
    ("none", 1.0, 1.0, 1.0),
])
def test_tsa_threshold_start_middle_end(schedule, start, middle, end):
    assert tsa_threshold(schedule, 0.0, 10) == pytest.approx(start)
    assert tsa_threshold(schedule, 0.5, 10) == pytest.approx(middle)
    assert tsa_threshold(schedule, 1.0, 10) == pytest.approx(end)
    values = [tsa_threshold(schedule, i / 20, 10) for i in range(21)]
    assert values == sorted(values)  # never decreases


def test_tsa_mask_uses_the_correct_class_probability():
    logits = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 2])
    p_big = softmax_row([3.0, 0.0, 0.0])[0]  # 0.9094
    # row 0: confident and right -> dropped; row 1: confident but wrong (correct-class prob 0.045) -> kept;
    # row 2: correct-class prob 1/3 -> kept
    assert tsa_mask(logits, targets, 0.5).tolist() == [0.0, 1.0, 1.0]
    assert tsa_mask(logits, targets, p_big).tolist() == [1.0, 1.0, 1.0]  # ≤ keeps equality
    assert tsa_mask(logits, targets, 0.2).tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- MixMatch

def test_mixup_lambda_prime_at_least_half_and_reconstructs_the_pairs():
    n = 6
    eye = torch.eye(n)
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        mixed_x, mixed_y, lam = mixup(eye.clone(), eye.clone(), alpha=0.75, generator=g)
        assert 0.5 <= lam <= 1.0
        assert torch.equal(mixed_x, mixed_y)  # the same permutation and λ' for inputs and targets
        for i in range(n):
            row = mixed_x[i]
            partner = [j for j in range(n) if j != i and row[j] > 0]
            if partner:  # λ' on the own row, 1 − λ' on the partner's
                assert row[i].item() == pytest.approx(lam) and row[partner[0]].item() == pytest.approx(1 - lam)
            else:
                assert row[i].item() == pytest.approx(1.0)
        columns = (mixed_x > 0).float() * (eye == 0).float()
        assert (columns.sum(0) <= 1).all()  # each row is somebody's partner at most once: a permutation


def test_mixup_is_deterministic_under_a_generator_and_alpha_controls_lambda():
    x, y = torch.randn(8, 3, 4, 4), torch.softmax(torch.randn(8, 5), 1)
    a = mixup(x, y, 0.5, torch.Generator().manual_seed(7))
    b = mixup(x, y, 0.5, torch.Generator().manual_seed(7))
    c = mixup(x, y, 0.5, torch.Generator().manual_seed(8))
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] != c[2]
    torch.manual_seed(1)
    d = mixup(x, y, 0.5)
    torch.manual_seed(1)
    assert mixup(x, y, 0.5)[2] == d[2]  # global RNG: reproducible under torch.manual_seed
    mx, my, lam = mixup(x, y, 0.0)
    assert lam == 1.0 and torch.equal(mx, x) and torch.equal(my, y)
    g = torch.Generator().manual_seed(0)
    wide = [mixup(x, y, 100.0, g)[2] for _ in range(50)]  # Beta(100, 100) concentrates at 0.5
    narrow = [mixup(x, y, 0.05, g)[2] for _ in range(50)]  # Beta(0.05, 0.05) at the ends: λ' near 1
    assert max(wide) < 0.65 and sum(narrow) / 50 > 0.9


def test_mixmatch_targets_average_then_sharpen():
    v1 = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    v2 = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    mean = torch.tensor([[0.7, 0.3], [0.3, 0.7]])
    expected = mean ** 2 / (mean ** 2).sum(1, keepdim=True)
    assert close(mixmatch_targets([v1, v2], 0.5), expected)
    assert close(mixmatch_targets(torch.stack([v1, v2]), 0.5), expected)
    with_grad = v1.clone().requires_grad_()
    assert not mixmatch_targets([with_grad, v2]).requires_grad


def reference_mixmatch(lx, tx, lu, tu):
    b, k = lx.shape
    loss_x = sum(-sum(tx[i, c] * torch.log_softmax(lx[i], 0)[c] for c in range(k)) for i in range(b)) / b
    u = lu.shape[0]
    loss_u = sum(sum((torch.softmax(lu[i], 0)[c] - tu[i, c]) ** 2 for c in range(k)) for i in range(u)) / (u * k)
    return loss_x, loss_u


def test_mixmatch_loss_matches_reference_values_and_gradients():
    torch.manual_seed(4)
    lx, lu = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    tx = torch.softmax(torch.randn(3, 4), 1).requires_grad_()
    tu = torch.softmax(torch.randn(5, 4), 1)
    loss_x, loss_u = mixmatch_loss(lx, tx, lu, tu)
    ref_x, ref_u = reference_mixmatch(lx, tx.detach(), lu, tu)
    assert loss_x.item() == pytest.approx(ref_x.item(), rel=1e-6)
    assert loss_u.item() == pytest.approx(ref_u.item(), rel=1e-6)
    assert close(torch.autograd.grad(loss_x, lx, retain_graph=True)[0], torch.autograd.grad(ref_x, lx)[0])
    assert close(torch.autograd.grad(loss_u, lu, retain_graph=True)[0], torch.autograd.grad(ref_u, lu)[0])
    (loss_x + loss_u).backward()
    assert tx.grad is None


# ---------------------------------------------------------------- AdaMatch

def test_relative_threshold_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6]])
    assert relative_threshold(probs, 0.9).item() == pytest.approx(0.9 * 0.75)
    assert relative_threshold(probs.requires_grad_(), 1.0).requires_grad is False


def test_random_logit_interpolation_per_element_lambda_and_gradients():
    joint = torch.ones(16, 5, requires_grad=True)
    separate = torch.zeros(16, 5, requires_grad=True)
    out = random_logit_interpolation(joint, separate, torch.Generator().manual_seed(0))
    lam = out.detach()
    assert ((lam >= 0) & (lam < 1)).all() and lam.unique().numel() == 80  # one λ per element
    assert 0.35 < lam.mean().item() < 0.65
    out.sum().backward()
    assert close(joint.grad, lam) and close(separate.grad, 1 - lam)
    again = random_logit_interpolation(joint, separate, torch.Generator().manual_seed(0))
    assert torch.equal(again, out)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    mixed = random_logit_interpolation(a, b)
    assert ((mixed >= torch.minimum(a, b) - 1e-6) & (mixed <= torch.maximum(a, b) + 1e-6)).all()


def test_distribution_alignment_hand_computed():
    probs = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    source, target = torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2])
    # ratio (0.625, 2.5): row 0 -> (0.3125, 1.25)/1.5625, row 1 -> (0.5, 0.5)
    expected = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    assert close(distribution_alignment(probs, source, target), expected)
    assert close(distribution_alignment(probs, target, target), probs)


# ---------------------------------------------------------------- Dash

def test_dash_threshold_formula_and_floor():
    rho0, gamma, c = 2.0, 1.27, 1.0001
    assert dash_threshold(0, rho0) == pytest.approx(c * rho0)
    assert dash_threshold(3, rho0) == pytest.approx(c * rho0 * gamma ** -3)
    assert dash_threshold(9, rho0, update_every=10) == pytest.approx(c * rho0)
    assert dash_threshold(10, rho0, update_every=10) == pytest.approx(c * rho0 / gamma)
    assert dash_threshold(25, rho0, update_every=10) == pytest.approx(c * rho0 / gamma ** 2)
    assert dash_threshold(10_000, rho0) == 0.05  # rho_min floor
    assert dash_threshold(10_000, rho0, rho_min=0.0) == pytest.approx(c * rho0 * gamma ** -10_000)


def test_dash_weak_loss_and_mask():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = []
    for row in logits.tolist():
        p, target = softmax_row(row), softmax_row(row, 0.5)
        expected.append(-sum(t * math.log(q) for t, q in zip(target, p)))
    assert close(dash_weak_loss(logits, 0.5), torch.tensor(expected))
    hard = dash_weak_loss(logits, hard_label=True)
    assert close(hard, torch.tensor([-math.log(softmax_row([2.0, 0.0, 0.0])[0]), math.log(3)]))
    assert dash_mask(hard, math.log(3)).tolist() == [1.0, 1.0]  # ≤ keeps equality
    assert dash_mask(hard, 0.5).tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- SimMatch

def reference_unfold_aggregate(emb, bank, labels, probs, t, alpha):
    n, m, k = emb.shape[0], bank.shape[0], probs.shape[1]
    instance, classes = torch.zeros(n, m), torch.zeros(n, k)
    for i in range(n):
        q = softmax_row([float(emb[i] @ bank[j]) for j in range(m)], t)
        scaled = [q[j] * float(probs[i, labels[j]]) for j in range(m)]
        for j in range(m):
            instance[i, j] = scaled[j] / sum(scaled)
        for c in range(k):
            agg = sum(q[j] for j in range(m) if labels[j] == c)
            classes[i, c] = alpha * float(probs[i, c]) + (1 - alpha) * agg
    return instance, classes


def simmatch_inputs(n=4, m=7, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    labels = torch.randint(0, k, (m,), generator=g)
    probs = torch.softmax(torch.randn(n, k, generator=g), 1)
    return emb, bank, labels, probs


@pytest.mark.parametrize("alpha,t", [(0.9, 0.1), (0.5, 0.5), (1.0, 0.1), (0.0, 1.0)])
def test_simmatch_unfold_aggregate_matches_reference(alpha, t):
    emb, bank, labels, probs = simmatch_inputs()
    instance, classes = simmatch_unfold_aggregate(emb, bank, labels, probs, t, alpha)
    ref_instance, ref_classes = reference_unfold_aggregate(emb, bank, labels.tolist(), probs, t, alpha)
    assert close(instance, ref_instance) and close(classes, ref_classes)
    assert close(instance.sum(1), torch.ones(4)) and close(classes.sum(1), torch.ones(4))
    if alpha == 1.0:
        assert torch.equal(classes, probs)


def test_simmatch_unfolding_suppresses_bank_items_of_doubted_classes():
    emb = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two identical neighbours, classes 0 and 1
    labels = torch.tensor([0, 1])
    probs = torch.tensor([[0.9, 0.1]])
    instance, classes = simmatch_unfold_aggregate(emb, bank, labels, probs, 0.1, 0.5)
    assert close(instance, torch.tensor([[0.9, 0.1]]))  # equal similarity, scaled by the class belief
    assert close(classes, torch.tensor([[0.5 * 0.9 + 0.5 * 0.5, 0.5 * 0.1 + 0.5 * 0.5]]))


def test_simmatch_in_loss_matches_reference_values_and_gradients():
    emb, bank, labels, probs = simmatch_inputs(seed=2)
    targets, _ = simmatch_unfold_aggregate(emb, bank, labels, probs)
    student = torch.nn.functional.normalize(torch.randn(4, 5), dim=1).requires_grad_()
    bank = bank.clone().requires_grad_()
    ours = simmatch_in_loss(student, bank, targets, 0.1)
    ref = 0.0
    for i in range(4):
        log_p = torch.log_softmax(torch.stack([student[i] @ bank[j].detach() for j in range(7)]) / 0.1, 0)
        ref = ref - sum(targets[i, j] * log_p[j] for j in range(7))
    ref = ref / 4
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert close(torch.autograd.grad(ours, student, retain_graph=True)[0], torch.autograd.grad(ref, student)[0])
    ours.backward()
    assert bank.grad is None


# ---------------------------------------------------------------- argument errors

V = torch.randn(3, 4)


@pytest.mark.parametrize("call,message", [
    (lambda: sharpen(V, 0.0), "temperature must be a number > 0, got 0.0"),
    (lambda: sigmoid_rampup(-1, 10), "sigmoid_rampup: step must be a number >= 0, got -1"),
    (lambda: linear_rampup(1, -2), "linear_rampup: length must be a number >= 0, got -2"),
    (lambda: mean_teacher_loss(V, torch.randn(3, 5)), "same shape"),
    (lambda: uda_loss(V, V, threshold=1.2), r"threshold must be in \[0, 1\], got 1.2"),
    (lambda: uda_loss(V, V, temperature=-0.4), "temperature must be a number > 0, got -0.4"),
    (lambda: tsa_threshold("cosine", 0.5, 10), "schedule must be one of linear, exp, log, none, got 'cosine'"),
    (lambda: tsa_threshold("linear", 1.5, 10), r"progress must be in \[0, 1\], got 1.5"),
    (lambda: tsa_threshold("linear", 0.5, 1), "num_classes must be an integer >= 2, got 1"),
    (lambda: tsa_mask(V, torch.tensor([0, 1, 4]), 0.5), r"targets must be class indices in \[0, 4\), got values in \[0, 4\]"),
    (lambda: tsa_mask(V, torch.tensor([0.0, 1.0, 2.0]), 0.5), "targets must be an integer tensor"),
    (lambda: mixup(V, V, alpha=-1), "alpha must be a number >= 0, got -1"),
    (lambda: mixup(torch.randn(2, 4), V, alpha=1), "same number of rows"),
    (lambda: mixmatch_targets([V, torch.randn(3, 5)]), r"every view must have shape \(3, 4\), view 1 has \(3, 5\)"),
    (lambda: mixmatch_targets([]), "at least one view"),
    (lambda: mixmatch_loss(V, V, torch.randn(2, 5), torch.randn(2, 5)), "same number of classes"),
    (lambda: mixmatch_loss(V, torch.randn(3, 5), V, V), "logits_x and targets_x must have the same shape"),
    (lambda: relative_threshold(V, 1.5), r"tau must be in \[0, 1\], got 1.5"),
    (lambda: random_logit_interpolation(V, torch.randn(4, 4)), "same shape"),
    (lambda: distribution_alignment(V, torch.ones(3), torch.ones(4)), r"source_mean must have shape \(4,\)"),
    (lambda: dash_threshold(-1, 1.0), "step must be an integer >= 0, got -1"),
    (lambda: dash_threshold(0, 0.0), "rho_init must be a number > 0, got 0.0"),
    (lambda: dash_threshold(0, 1.0, gamma=0.9), "gamma must be a number >= 1"),
    (lambda: dash_threshold(0, 1.0, update_every=0), "update_every must be an integer >= 1, got 0"),
    (lambda: dash_mask(V, 0.5), r"per_sample_loss must be a 1-D tensor \(N,\), got shape \(3, 4\)"),
    (lambda: simmatch_unfold_aggregate(V, torch.randn(5, 3), torch.zeros(5, dtype=torch.long), V),
     "embeddings and bank must have the same dimension D"),
    (lambda: simmatch_unfold_aggregate(V, torch.randn(5, 4), torch.zeros(4, dtype=torch.long), V),
     r"bank_labels must have shape \(5,\), got \(4,\)"),
    (lambda: simmatch_unfold_aggregate(V, torch.randn(0, 4), torch.zeros(0, dtype=torch.long), V), "bank is empty"),
    (lambda: simmatch_unfold_aggregate(V, torch.randn(5, 4), torch.zeros(5, dtype=torch.long), V, smoothing_alpha=2),
     r"smoothing_alpha must be in \[0, 1\], got 2"),
    (lambda: simmatch_in_loss(V, torch.randn(5, 4), torch.randn(3, 6)), r"instance_targets must have shape \(N, M\) = \(3, 5\)"),
])
def test_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bf16_autocast_runs_in_fp32():
    torch.manual_seed(0)
    weak, strong = torch.randn(8, 5), torch.randn(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = uda_loss(weak.bfloat16(), strong.bfloat16(), 0.0)
        mt = mean_teacher_loss(strong.bfloat16(), weak.bfloat16())
    assert low.dtype == torch.float32 and mt.dtype == torch.float32
    assert low.item() == pytest.approx(uda_loss(weak, strong, 0.0)[0].item(), rel=0.05)
