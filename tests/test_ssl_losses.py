"""The self-supervised losses (BYOL/SimSiam, Barlow Twins, VICReg, SwAV, SupCon, NNCLR, iBOT patches) against the
papers' formulas written as plain loops, hand-computed cases, and lightly's implementations where lightly has one
(skipped when lightly is not installed): values and gradients, and every ValueError by its message."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.losses import (BarlowTwinsLoss, NNCLRLoss, SupConLoss, SupportSet, SwAVLoss, VICRegLoss,
                            barlow_twins_loss, byol_loss, ibot_patch_loss, nearest_neighbours, nnclr_loss, sinkhorn,
                            supcon_loss, swav_loss, symmetric_byol_loss, vicreg_loss)


def lightly_loss(name):
    module = pytest.importorskip("lightly.loss")
    return getattr(module, name)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


def assert_same_grads(ours, ref, atol=1e-5):
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=atol, rtol=1e-4), (a - b).abs().max()


# ---------------------------------------------------------------- BYOL / SimSiam

def reference_byol(p, z):
    total = 0.0
    for i in range(p.shape[0]):
        total = total + 2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm())
    return total / p.shape[0]


def test_byol_matches_loop_and_lightly_negative_cosine():
    torch.manual_seed(0)
    p, z = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    ours = byol_loss(p, z)
    ref = reference_byol(p, z)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert_same_grads(grads(ours, [p, z]), grads(ref, [p, z]))
    negative_cosine = lightly_loss("NegativeCosineSimilarity")()(p, z)  # −mean cos: byol = 2 + 2·(−cos)
    assert ours.item() == pytest.approx(2 + 2 * negative_cosine.item(), rel=1e-6)
    assert_same_grads(grads(ours, [p, z]), [2 * g for g in grads(negative_cosine, [p, z])])


def test_byol_hand_cases_and_stop_gradient_is_the_callers():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert byol_loss(3 * z, z).item() == pytest.approx(0.0, abs=1e-7)
    assert byol_loss(-z, z).item() == pytest.approx(4.0)
    assert byol_loss(z.flip(1), z).item() == pytest.approx(2.0)  # orthogonal rows
    p = torch.randn(2, 2, requires_grad=True)
    target = torch.randn(2, 2, requires_grad=True)
    byol_loss(p, target.detach()).backward()
    assert target.grad is None and p.grad is not None


def test_symmetric_byol_is_mean_of_both_directions_and_simsiam_relation():
    torch.manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 3) for _ in range(4))
    sym = symmetric_byol_loss(p1, p2, z1, z2)
    assert sym.item() == pytest.approx(0.5 * (byol_loss(p1, z2) + byol_loss(p2, z1)).item(), rel=1e-6)
    simsiam = -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())
    assert (sym.item() - 2) / 2 == pytest.approx(simsiam.item(), rel=1e-5)


# ---------------------------------------------------------------- Barlow Twins

def reference_barlow(z1, z2, lam):
    """Per-dimension loops: BatchNorm-style standardisation (biased var, eps 1e-5), c_ij = Σ_n a_ni b_nj / N."""
    n, d = z1.shape

    def standardise(z):
        cols = []
        for j in range(d):
            col = z[:, j]
            mean = sum(col[i] for i in range(n)) / n
            var = sum((col[i] - mean) ** 2 for i in range(n)) / n
            cols.append((col - mean) / torch.sqrt(var + 1e-5))
        return torch.stack(cols, dim=1)

    a, b = standardise(z1), standardise(z2)
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k, i] * b[k, j] for k in range(n)) / n
            total = total + ((1 - c) ** 2 if i == j else lam * c ** 2)
    return total


@pytest.mark.parametrize("n,d,lam", [(4, 3, 5e-3), (7, 5, 0.1), (2, 2, 0.0)])
def test_barlow_twins_matches_loop_reference(n, d, lam):
    torch.manual_seed(n + d)
    z1, z2 = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    ours = barlow_twins_loss(z1, z2, lam)
    ref = reference_barlow(z1, z2, lam)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, [z1, z2]), grads(ref, [z1, z2]))


def test_barlow_twins_matches_lightly():
    torch.manual_seed(3)
    z1, z2 = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    ours = barlow_twins_loss(z1, z2, 5e-3)
    ref = lightly_loss("BarlowTwinsLoss")(lambda_param=5e-3)(z1, z2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, [z1, z2]), grads(ref, [z1, z2]))


def test_barlow_twins_identical_decorrelated_views_give_zero():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # standardised, uncorrelated columns
    assert barlow_twins_loss(z, 5 * z + 3).item() == pytest.approx(0.0, abs=1e-8)
    # swapped dimensions: diagonal 0 (each term 1), off-diagonal 1 twice, weighted by λ
    assert barlow_twins_loss(z, z.flip(1), 0.5).item() == pytest.approx(2 + 0.5 * 2, rel=1e-4)


def test_barlow_module_single_process_is_the_function():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    assert BarlowTwinsLoss(0.02)(z1, z2).item() == barlow_twins_loss(z1, z2, 0.02).item()


# ---------------------------------------------------------------- VICReg

def reference_vicreg(z1, z2, sim, var_w, cov_w, eps):
    n, d = z1.shape
    invariance = sum(((z1[i, j] - z2[i, j]) ** 2 for i in range(n) for j in range(d))) / (n * d)

    def stats(z):
        means = [sum(z[k, j] for k in range(n)) / n for j in range(d)]
        cov = [[sum((z[k, i] - means[i]) * (z[k, j] - means[j]) for k in range(n)) / (n - 1) for j in range(d)]
               for i in range(d)]
        variance = sum(torch.relu(1 - torch.sqrt(cov[j][j] + eps)) for j in range(d)) / d
        covariance = sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d
        return variance, covariance

    v1, c1 = stats(z1)
    v2, c2 = stats(z2)
    return sim * invariance + var_w * (v1 + v2) / 2 + cov_w * (c1 + c2)


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0, 1e-4), (1.0, 2.0, 3.0, 0.5)])
def test_vicreg_matches_loop_reference(weights):
    torch.manual_seed(5)
    z1 = (0.5 * torch.randn(6, 4)).requires_grad_(True)  # small spread so the variance hinge is active
    z2 = torch.randn(6, 4, requires_grad=True)
    ours = vicreg_loss(z1, z2, *weights)
    ref = reference_vicreg(z1, z2, *weights)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, [z1, z2]), grads(ref, [z1, z2]))


def test_vicreg_matches_lightly():
    torch.manual_seed(6)
    z1, z2 = (0.7 * torch.randn(12, 6)).requires_grad_(True), torch.randn(12, 6, requires_grad=True)
    ours = vicreg_loss(z1, z2, 25.0, 25.0, 1.0, 1e-4)
    ref = lightly_loss("VICRegLoss")(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4)(z1, z2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, [z1, z2]), grads(ref, [z1, z2]))


def test_vicreg_hand_cases():
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # unbiased var 4/3, no covariance
    assert vicreg_loss(z, z).item() == pytest.approx(0.0, abs=1e-7)
    small = 0.5 * z  # var 1/3: hinge 1 − sqrt(1/3 + 1e-4) on each dimension of each view
    assert vicreg_loss(small, small).item() == pytest.approx(25 * (1 - math.sqrt(1 / 3 + 1e-4)), rel=1e-6)
    shifted = z + torch.tensor([0.5, 0.0])  # invariance only: MSE = 0.25 / 2
    assert vicreg_loss(z, shifted, 4.0, 0.0, 0.0).item() == pytest.approx(4 * 0.125)


# ---------------------------------------------------------------- SwAV

def reference_sinkhorn(scores, iterations, epsilon):
    """SwAV's distributed_sinkhorn on one process, in float64, without the max shift."""
    q = torch.exp(scores.double() / epsilon).T
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b
    return (q * b).T


def reference_swav(high, low, queue, temperature, iterations, epsilon):
    crops = high + low
    total = 0.0
    for i in range(len(high)):
        inputs = high[i] if queue is None else torch.cat([queue[i], high[i]])
        q = reference_sinkhorn(inputs.detach(), iterations, epsilon)[-high[i].shape[0]:].float()
        sub = 0.0
        for v, crop in enumerate(crops):
            if v == i:
                continue
            for n in range(crop.shape[0]):
                sub = sub - (q[n] * torch.log_softmax(crop[n] / temperature, dim=0)).sum() / crop.shape[0]
        total = total + sub / (len(crops) - 1)
    return total / len(high)


@pytest.mark.parametrize("iterations,epsilon", [(1, 0.05), (3, 0.05), (10, 0.5)])
def test_sinkhorn_matches_reference_and_is_a_transport_plan(iterations, epsilon):
    torch.manual_seed(iterations)
    scores = F.normalize(torch.randn(12, 5), dim=1) @ F.normalize(torch.randn(4, 5), dim=1).T
    q = sinkhorn(scores, iterations, epsilon)
    assert q.shape == (12, 4) and q.dtype == torch.float32 and not q.requires_grad
    assert torch.allclose(q.double(), reference_sinkhorn(scores, iterations, epsilon), atol=1e-6)
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-5)  # each sample's code is a distribution


def test_sinkhorn_uniform_scores_and_no_overflow():
    assert torch.allclose(sinkhorn(torch.zeros(6, 3)), torch.full((6, 3), 1 / 3))
    big = torch.tensor([[100.0, 0.0], [0.0, 100.0]])  # exp(100 / 0.05) overflows without the max shift
    q = sinkhorn(big, 3, 0.05)
    assert torch.isfinite(q).all() and torch.allclose(q, torch.eye(2), atol=1e-6)


def random_crops(n, k, count, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return [torch.tanh(torch.randn(n, k, generator=g)).requires_grad_(requires_grad) for _ in range(count)]


@pytest.mark.parametrize("n_high,n_low,queue_len", [(2, 0, 0), (2, 3, 0), (2, 2, 5), (3, 1, 0)])
def test_swav_matches_loop_reference(n_high, n_low, queue_len):
    high = random_crops(6, 4, n_high, 10 + n_high)
    low = random_crops(6, 4, n_low, 20 + n_low)
    queue = random_crops(queue_len, 4, n_high, 30, requires_grad=False) if queue_len else None
    ours = swav_loss(high, low, queue, 0.1, 3, 0.05)
    ref = reference_swav(high, low, queue, 0.1, 3, 0.05)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, high + low), grads(ref, high + low))


@pytest.mark.parametrize("with_queue", [False, True])
def test_swav_matches_lightly(with_queue):
    high, low = random_crops(8, 5, 2, 1), random_crops(8, 5, 2, 2)
    queue = random_crops(16, 5, 2, 3, requires_grad=False) if with_queue else None
    ours = SwAVLoss(0.1, 3, 0.05)(high, low, queue)
    ref = lightly_loss("SwaVLoss")(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(high, low, queue)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, high + low), grads(ref, high + low))


# ---------------------------------------------------------------- SupCon

def reference_supcon(features, labels, t):
    """Khosla et al. L_out with loops; unlabelled (negative) samples have only their own views as positives."""
    n, v, _ = features.shape
    z = [F.normalize(features[i, a], dim=0) for i in range(n) for a in range(v)]
    owner = [i for i in range(n) for _ in range(v)]
    losses = []
    for a in range(n * v):
        others = [b for b in range(n * v) if b != a]
        log_denominator = torch.logsumexp(torch.stack([z[a] @ z[b] / t for b in others]), 0)
        positives = [b for b in others if owner[b] == owner[a] or (labels[owner[a]] >= 0
                                                                     and labels[owner[b]] == labels[owner[a]])]
        if positives:
            losses.append(-sum(z[a] @ z[p] / t - log_denominator for p in positives) / len(positives))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("views,labels", [(2, [0, 1, 0, 2, 1]), (1, [3, 3, 1, 1, 2]), (2, [0, -1, 0, -1, 1]),
                                          (3, [-1, -1, -1, -1, -1])])
def test_supcon_matches_loop_reference(views, labels):
    torch.manual_seed(views)
    features = torch.randn(5, views, 4, requires_grad=True)
    labels = torch.tensor(labels)
    ours = supcon_loss(features, labels, 0.2)
    ref = reference_supcon(features, labels, 0.2)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, [features]), grads(ref, [features]))


def test_supcon_hand_computed_and_unlabelled_is_simclr_like():
    e = torch.eye(2)
    features = torch.stack([torch.stack([e[0], e[0]]), torch.stack([e[1], e[1]])])  # (2, 2, 2)
    t = 0.5
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))  # one positive at sim 1, two others at sim 0
    assert supcon_loss(features, torch.tensor([0, 1]), t).item() == pytest.approx(expected, rel=1e-6)
    assert supcon_loss(features, torch.tensor([-1, -1]), t).item() == pytest.approx(expected, rel=1e-6)
    # same label: every other view is a positive, sims 1, 0, 0 -> −mean(log-probs)
    same = -(1 / 3) * (math.log(math.exp(2) / (math.exp(2) + 2)) + 2 * math.log(1 / (math.exp(2) + 2)))
    assert supcon_loss(features, torch.tensor([4, 4]), t).item() == pytest.approx(same, rel=1e-6)


def test_supcon_module_single_process_is_the_function():
    torch.manual_seed(0)
    features, labels = torch.randn(4, 2, 3), torch.tensor([0, 1, 1, 0])
    assert SupConLoss(0.3)(features, labels).item() == supcon_loss(features, labels, 0.3).item()


# ---------------------------------------------------------------- NNCLR

def reference_nnclr(z1, z2, support, t, p1, p2):
    def nn_of(z):
        sims = [F.normalize(z, dim=0) @ F.normalize(s, dim=0) for s in support]
        return F.normalize(support[int(torch.stack(sims).argmax())], dim=0).detach()

    def direction(zq, keys):
        total = 0.0
        for i in range(zq.shape[0]):
            q = nn_of(zq[i])
            logits = torch.stack([q @ F.normalize(k, dim=0) / t for k in keys])
            total = total - (logits[i] - torch.logsumexp(logits, 0))
        return total / zq.shape[0]

    return 0.5 * (direction(z1, p2) + direction(z2, p1))


@pytest.mark.parametrize("with_predictor", [False, True])
def test_nnclr_matches_loop_reference(with_predictor):
    torch.manual_seed(7)
    z1, z2 = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    p1, p2 = (torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)) if with_predictor \
        else (None, None)
    support = torch.randn(9, 4)
    ours = nnclr_loss(z1, z2, support, 0.2, p1, p2)
    keys = [z1, z2] if p1 is None else [p1, p2]
    ref = reference_nnclr(z1, z2, support, 0.2, *keys)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, keys), grads(ref, keys))
    if with_predictor:  # the neighbours carry no gradient, so z1, z2 get none when predictions are the keys
        assert all(g is None for g in torch.autograd.grad(nnclr_loss(z1, z2, support, 0.2, p1, p2), [z1, z2],
                                                          allow_unused=True))


def test_nnclr_matches_lightly_memory_bank_lookup_with_info_nce():
    """lightly's NNMemoryBankModule finds the same neighbours; with them as queries, each direction is MoCo's
    in-batch InfoNCE (our info_nce_loss), i.e. the NNCLR paper's loss."""
    pytest.importorskip("lightly")
    from lightly.models.modules import NNMemoryBankModule

    from ssl_kit.losses import info_nce_loss

    torch.manual_seed(8)
    z1, z2, p1, p2 = (torch.randn(6, 4) for _ in range(4))
    bank = NNMemoryBankModule(size=(10, 4))
    bank(torch.randn(10, 4), update=True)  # fill lightly's bank; ours holds the same rows
    support = bank.bank.clone()
    assert torch.allclose(nearest_neighbours(z1, support), F.normalize(bank(z1, update=False), dim=1), atol=1e-6)
    expected = 0.5 * (info_nce_loss(bank(z1), p2, None, 0.1) + info_nce_loss(bank(z2), p1, None, 0.1))
    assert nnclr_loss(z1, z2, support, 0.1, p1, p2).item() == pytest.approx(expected.item(), rel=1e-5)


def test_nearest_neighbours_picks_highest_cosine_not_closest_point():
    support = torch.tensor([[10.0, 1.0], [0.5, 0.5], [0.0, -1.0]])
    z = torch.tensor([[1.0, 0.9], [0.1, -3.0], [4.0, 0.0]])
    expected = F.normalize(support[[1, 2, 0]], dim=1)
    assert torch.allclose(nearest_neighbours(z, support), expected)


def test_support_set_is_a_fifo_ring_buffer_and_resumes_exactly():
    bank = SupportSet(4, 2, seed=1)
    assert torch.allclose(bank.embeddings.norm(dim=1), torch.ones(4))  # starts with random unit vectors
    assert torch.equal(SupportSet(4, 2, seed=1).embeddings, bank.embeddings)  # same on every rank
    first = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    bank.update(first)
    assert torch.allclose(bank.embeddings[:3], F.normalize(first, dim=1)) and int(bank.pointer) == 3
    second = torch.tensor([[0.0, -1.0], [-1.0, 0.0]])
    bank.update(second)  # wraps: row 3, then row 0
    assert torch.allclose(bank.embeddings[3], second[0]) and torch.allclose(bank.embeddings[0], second[1])
    assert int(bank.pointer) == 1
    many = torch.arange(12.0).view(6, 2) + 1
    bank.update(many)  # more rows than size: as if enqueued one by one from row 1, the last 4 remain
    assert torch.allclose(bank.embeddings, F.normalize(many, dim=1)[[3, 4, 5, 2]]) and int(bank.pointer) == 3
    restored = SupportSet(4, 2, seed=9)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.embeddings, bank.embeddings) and int(restored.pointer) == int(bank.pointer)
    z = torch.randn(3, 2)
    assert torch.equal(nnclr_loss(z, z + 1, restored), nnclr_loss(z, z + 1, bank))
    assert torch.equal(NNCLRLoss(0.1)(z, z + 1, bank), nnclr_loss(z, z + 1, bank.embeddings))


# ---------------------------------------------------------------- iBOT patch loss

def reference_ibot(student, teacher, mask, center, ts, tt):
    per_image = []
    for i in range(student.shape[0]):
        total, count = 0.0, 0
        for j in range(student.shape[1]):
            if mask[i, j]:
                p = torch.softmax((teacher[i, j].detach() - center) / tt, dim=0)
                total = total - (p * torch.log_softmax(student[i, j] / ts, dim=0)).sum()
                count += 1
        per_image.append(total / max(count, 1))
    return sum(per_image) / len(per_image)


def make_ibot_inputs(seed):
    torch.manual_seed(seed)
    student = torch.randn(3, 4, 6, requires_grad=True)
    teacher = torch.randn(3, 4, 6, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)  # image 1: nothing masked
    return student, teacher, mask, 0.3 * torch.randn(6)


def test_ibot_patch_loss_matches_loop_reference():
    student, teacher, mask, center = make_ibot_inputs(0)
    ours = ibot_patch_loss(student, teacher, mask, center, 0.1, 0.04)
    ref = reference_ibot(student, teacher, mask, center, 0.1, 0.04)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, [student]), grads(ref, [student]))
    ours.backward()
    assert teacher.grad is None
    float_mask = ibot_patch_loss(student, teacher, mask.float(), center.view(1, 1, 6), 0.1, 0.04)
    assert float_mask.item() == pytest.approx(ours.item(), rel=1e-6)


def test_ibot_patch_loss_matches_lightly():
    student, teacher, mask, center = make_ibot_inputs(1)
    criterion = lightly_loss("IBOTPatchLoss")(output_dim=6, teacher_temp=0.04, student_temp=0.1)
    criterion.center.center.copy_(center.view(1, 6))
    ref = criterion(teacher[mask], student[mask], mask.view(3, 2, 2))
    ours = ibot_patch_loss(student, teacher, mask, center, 0.1, 0.04)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert_same_grads(grads(ours, [student]), grads(ref, [student]))


def test_ibot_patch_loss_hand_computed():
    # one image, two patches, only patch 0 masked; teacher one-hot-ish at temperature → CE = −log softmax(s)[0]
    student = torch.tensor([[[1.0, 0.0], [5.0, -5.0]]])
    teacher = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])
    loss = ibot_patch_loss(student, teacher, torch.tensor([[1.0, 0.0]]), torch.zeros(2), 1.0, 0.01)
    assert loss.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)


# ---------------------------------------------------------------- argument errors

V = torch.randn(4, 3)


@pytest.mark.parametrize("call,message", [
    (lambda: byol_loss(V, torch.randn(4, 2)), "p and z must have the same shape"),
    (lambda: byol_loss(torch.randn(4), torch.randn(4)), r"p must be a 2-D tensor \(N, D\)"),
    (lambda: barlow_twins_loss(V, V, -1.0), "lambda_offdiag must be a number >= 0, got -1.0"),
    (lambda: barlow_twins_loss(V[:1], V[:1]), "barlow_twins_loss needs a batch of at least 2 samples, got N=1"),
    (lambda: barlow_twins_loss(V, V.double()), "z1 is torch.float32 but z2 is torch.float64"),
    (lambda: BarlowTwinsLoss(lambda_offdiag=-0.1), "lambda_offdiag must be a number >= 0"),
    (lambda: vicreg_loss(V, V, sim_weight=-1.0), "sim_weight must be a number >= 0, got -1.0"),
    (lambda: vicreg_loss(V, V, cov_weight=-2), "cov_weight must be a number >= 0, got -2"),
    (lambda: vicreg_loss(V, V, eps=0.0), "eps must be a number > 0, got 0.0"),
    (lambda: vicreg_loss(V[:1], V[:1]), "vicreg_loss needs a batch of at least 2 samples, got N=1"),
    (lambda: VICRegLoss(var_weight=-1.0), "var_weight must be a number >= 0"),
    (lambda: sinkhorn(V, iterations=0), "iterations must be an integer >= 1, got 0"),
    (lambda: sinkhorn(V, iterations=2.5), "iterations must be an integer >= 1, got 2.5"),
    (lambda: sinkhorn(V, epsilon=0), "epsilon must be a number > 0, got 0"),
    (lambda: sinkhorn(torch.randn(3)), r"scores must be a 2-D tensor"),
    (lambda: swav_loss([V]), "swav_loss needs at least 2 crops in all, got 1 high-res and 0 low-res"),
    (lambda: swav_loss([], [V, V]), "swav_loss needs at least one high-resolution crop"),
    (lambda: swav_loss([V, torch.randn(4, 5)]), r"high_res_scores\[1\] has shape \(4, 5\), expected \(4, 3\)"),
    (lambda: swav_loss([V], [torch.randn(2, 3)]), r"low_res_scores\[0\] has shape \(2, 3\)"),
    (lambda: swav_loss([V, V], queue_scores=[V]), "one \\(M, K\\) tensor per high-resolution crop: got 1 for 2"),
    (lambda: swav_loss([V, V], queue_scores=[V, torch.randn(5, 2)]), r"queue_scores\[1\] has 2 prototypes"),
    (lambda: swav_loss([V, V], temperature=-0.1), "temperature must be a number > 0, got -0.1"),
    (lambda: swav_loss([V, V], sinkhorn_iterations=0), "sinkhorn_iterations must be an integer >= 1, got 0"),
    (lambda: SwAVLoss(epsilon=-1), "epsilon must be a number > 0"),
    (lambda: supcon_loss(V, torch.zeros(4, dtype=torch.long)), r"features must be a 3-D tensor \(N, V, D\)"),
    (lambda: supcon_loss(torch.randn(4, 2, 3), torch.zeros(3, dtype=torch.long)),
     r"labels must have shape \(4,\) \(one per sample\), got \(3,\)"),
    (lambda: supcon_loss(torch.randn(4, 2, 3), torch.zeros(4)), "labels must be integers .* got torch.float32"),
    (lambda: supcon_loss(torch.randn(4, 2, 3), torch.zeros(4, dtype=torch.long), 0.0),
     "temperature must be a number > 0"),
    (lambda: supcon_loss(torch.randn(1, 1, 3), torch.zeros(1, dtype=torch.long)), "at least 2 views in all"),
    (lambda: supcon_loss(torch.randn(3, 1, 3), torch.tensor([0, 1, -1])),
     "no anchor has a positive .*N=3 samples with V=1"),
    (lambda: SupConLoss(temperature=-1), "temperature must be a number > 0"),
    (lambda: nearest_neighbours(V, torch.randn(5, 2)), "support has dimension 2, z has 3"),
    (lambda: nearest_neighbours(V, torch.randn(0, 3)), r"support is empty"),
    (lambda: nnclr_loss(V, V, torch.randn(5, 3), 0.0), "temperature must be a number > 0"),
    (lambda: nnclr_loss(V, V, torch.randn(5, 3), p1=V), "pass both predictions p1 and p2, or neither"),
    (lambda: nnclr_loss(V, V, torch.randn(5, 3), p1=V[:2], p2=V[:2]), "p1 has 2 rows but z1 has 4"),
    (lambda: nnclr_loss(V, V, torch.randn(5, 3), p1=torch.randn(4, 2), p2=torch.randn(4, 2)),
     "support has dimension 3 but the keys \\(predictions\\) have 2"),
    (lambda: SupportSet(0, 3), "size must be an integer >= 1, got 0"),
    (lambda: SupportSet(4, 3).update(torch.randn(2, 5)), r"SupportSet holds dimension 3, got z of shape \(2, 5\)"),
    (lambda: NNCLRLoss(temperature=0), "temperature must be a number > 0"),
    (lambda: ibot_patch_loss(V, V, torch.ones(4), torch.zeros(3)), r"must both be \(N, L, K\)"),
    (lambda: ibot_patch_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4), torch.zeros(4)),
     r"mask must be \(N, L\) = \(2, 3\), got \(2, 4\)"),
    (lambda: ibot_patch_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3), torch.zeros(5)),
     "center must have 4 entries"),
    (lambda: ibot_patch_loss(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3), torch.zeros(4), 0.1,
                             -0.04), "teacher_temp must be a number > 0, got -0.04"),
])
def test_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_losses_run_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    z1, z2, y = torch.randn(16, 8), torch.randn(16, 8), torch.arange(16) % 3
    for loss in (barlow_twins_loss, vicreg_loss, byol_loss, lambda a, b: supcon_loss(torch.stack([a, b], 1), y),
                 lambda a, b: nnclr_loss(a, b, z1[:5])):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = loss(z1.bfloat16(), z2.bfloat16())
        assert low.dtype == torch.float32 and math.isfinite(low.item())
        assert low.item() == pytest.approx(loss(z1, z2).item(), rel=0.05)
