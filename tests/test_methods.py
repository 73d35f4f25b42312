"""Contrastive and FixMatch machinery: queue, momentum, thresholding policies' state updates."""
import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.data.pipeline import DataInfo
from ssl_kit.methods.contrastive import MoCoV2
from ssl_kit.methods.thresholds import (DistributionAlignment, FixedThreshold, FlexMatchThreshold, FreeMatchThreshold,
                                        SoftMatchWeights)
from ssl_kit.models.cnn import SmallCNN
from tests.conftest import tiny_stage

INFO = DataInfo(10, [str(i) for i in range(10)], 1, 16, [0.5], [0.25], "digits")


def moco(queue_size=6):
    stage = tiny_stage("p", "mocov2", queue_size=queue_size, proj_dim=4, proj_hidden_dim=8, momentum=0.9)
    cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
    return MoCoV2(cfg, SmallCNN(1, width=4), INFO)


def test_queue_enqueue_wraps_around_in_order():
    method = moco(queue_size=6)
    keys = torch.arange(1, 5).float().view(4, 1).repeat(1, 4)  # 4 keys, each normalised to (0.5, 0.5, 0.5, 0.5)
    keys = keys * torch.tensor([1.0, 0, 0, 0]) + torch.tensor([0, 1.0, 0, 0]) * torch.arange(4).view(4, 1)
    method.enqueue(keys)
    assert int(method.queue_ptr) == 4
    assert torch.allclose(method.queue[:4], torch.nn.functional.normalize(keys, dim=1))
    method.enqueue(keys[:3])
    assert int(method.queue_ptr) == 1  # 4 + 3 = 7 -> wraps to 1
    expected = torch.nn.functional.normalize(keys, dim=1)
    assert torch.allclose(method.queue[4:6], expected[:2]) and torch.allclose(method.queue[0], expected[2])


def test_momentum_encoder_update_and_schedule():
    from ssl_kit.methods.base import Progress

    method = moco()
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.fill_(1.0)
        for p in method.key_backbone.parameters():
            p.fill_(0.0)
    method.after_optimizer_step(Progress(step=0, total_steps=10, epoch=0, steps_per_epoch=10))
    assert method.current_momentum == pytest.approx(0.9)
    first = next(method.key_backbone.parameters())
    assert torch.allclose(first, torch.full_like(first, 0.1))
    method.after_optimizer_step(Progress(step=10, total_steps=10, epoch=0, steps_per_epoch=10))
    assert method.current_momentum == pytest.approx(1.0)
    assert torch.allclose(next(method.key_backbone.parameters()), torch.full_like(first, 0.1))
    assert not any(p.requires_grad for p in method.key_backbone.parameters())


def probs_of(rows):
    return torch.tensor(rows, dtype=torch.float)


def test_fixed_threshold():
    policy = FixedThreshold(0.9, 3)
    assert policy.weights(probs_of([[0.95, 0.05, 0], [0.5, 0.5, 0]]), torch.arange(2)).tolist() == [1.0, 0.0]


def test_flexmatch_class_thresholds_follow_learning_status():
    policy = FlexMatchThreshold(0.9, num_classes=2, num_unlabeled=4, warmup=True)
    # nothing learned yet: β = 0 for every class, so thresholds are 0 (everything passes, warmup)
    assert policy.thresholds().tolist() == [0.0, 0.0]
    policy.update(probs_of([[0.95, 0.05], [0.2, 0.8], [0.05, 0.95]]), torch.tensor([0, 1, 2]))
    assert policy.status.tolist() == [0, -1, 1, -1]
    # σ = (1, 1), unused = 2 -> with warmup β = σ / max(1, 2) = 0.5 -> T = 0.9 · 0.5 / 1.5 = 0.3
    assert policy.thresholds().tolist() == pytest.approx([0.3, 0.3])
    policy.update(probs_of([[0.99, 0.01], [0.97, 0.03]]), torch.tensor([1, 3]))
    # σ = (3, 1), unused 0 -> β = (1, 1/3) -> T = (0.9, 0.9 · (1/3)/(5/3) = 0.18)
    assert policy.thresholds().tolist() == pytest.approx([0.9, 0.18])
    assert policy.weights(probs_of([[0.85, 0.15], [0.2, 0.8]]), torch.tensor([0, 1])).tolist() == [0.0, 1.0]


def test_freematch_ema_thresholds():
    policy = FreeMatchThreshold(num_classes=2, ema=0.5)
    assert policy.global_threshold.item() == pytest.approx(0.5)
    policy.update(probs_of([[0.9, 0.1], [0.7, 0.3]]), torch.arange(2))
    # τ = 0.5·0.5 + 0.5·mean(0.9, 0.7) = 0.65 ; p̃ = 0.5·(0.5, 0.5) + 0.5·(0.8, 0.2) = (0.65, 0.35)
    assert policy.global_threshold.item() == pytest.approx(0.65)
    assert policy.class_probs.tolist() == pytest.approx([0.65, 0.35])
    assert policy.thresholds().tolist() == pytest.approx([0.65, 0.35 / 0.65 * 0.65])
    assert policy.weights(probs_of([[0.6, 0.4], [0.36, 0.64]]), torch.arange(2)).tolist() == [0.0, 1.0]


def test_softmatch_gaussian_weights():
    policy = SoftMatchWeights(num_classes=2, ema=0.0)  # ema 0: state = this batch's statistics
    policy.update(probs_of([[0.9, 0.1], [0.7, 0.3]]), torch.arange(2))
    assert policy.mean.item() == pytest.approx(0.8)
    assert policy.var.item() == pytest.approx(0.02)  # unbiased variance of (0.9, 0.7)
    weights = policy.weights(probs_of([[0.85, 0.15], [0.6, 0.4]]), torch.arange(2))
    assert weights[0].item() == 1.0
    assert weights[1].item() == pytest.approx(torch.exp(torch.tensor(-(0.2 ** 2) / (2 * 0.02))).item(), rel=1e-5)


def test_distribution_alignment_pushes_towards_uniform():
    align = DistributionAlignment(2, momentum=0.0)
    out = align(probs_of([[0.9, 0.1], [0.7, 0.3]]))
    # p_model = (0.8, 0.2): p · (0.5/0.8, 0.5/0.2), renormalised
    first = torch.tensor([0.9 / 0.8, 0.1 / 0.2])
    assert torch.allclose(out[0], first / first.sum(), atol=1e-6)
