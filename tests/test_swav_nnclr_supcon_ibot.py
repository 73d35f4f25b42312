"""SwAV, NNCLR, SupCon and iBOT as methods: each trains through the runner with the probe; SwAV's prototypes stay unit
norm and are frozen at first, its queue fills and feeds Sinkhorn; NNCLR's support set takes the step's embeddings;
SupCon uses the labels; iBOT masks the ratio it is told and its teacher sees the unmasked crops; config errors name
the key; the embedding-std collapse warning."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import DataInfo
from ssl_kit.errors import ConfigError
from ssl_kit.losses import nt_xent_loss
from ssl_kit.methods.base import Progress
from ssl_kit.methods.ibot import IBOT, ibot_masks
from ssl_kit.methods.nnclr import NNCLR
from ssl_kit.methods.supcon import SupCon
from ssl_kit.methods.collapse import DEFAULT_THRESHOLD, EmbeddingStdWatch
from ssl_kit.methods.swav import SwAV
from ssl_kit.models.cnn import SmallCNN
from ssl_kit.models.vit import VisionTransformer
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage

INFO = DataInfo(10, [str(i) for i in range(10)], 1, 16, [0.5], [0.25], "digits")
VIT = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 16, "depth": 1, "heads": 2}}
SMALL = {
    "swav": dict(n_prototypes=12, proj_hidden_dim=16, proj_dim=8, local_crops=1, local_crop_size=0.5,
                 queue_length=32, queue_start_epochs=0, freeze_prototypes_epochs=0),
    "nnclr": dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16, support_set_size=64),
    "supcon": dict(proj_hidden_dim=16, proj_dim=8),
    "ibot": dict(backbone=VIT, out_dim=16, head_hidden_dim=16, bottleneck_dim=8, local_crops=1, local_crop_size=0.5,
                 mask_prob=1.0, masking="random", warmup_teacher_temp_epochs=0),
}


def config(method, **overrides):
    stage = tiny_stage("p", method, **{**SMALL[method], **overrides})
    return validate_recipe({"seed": 0, "stages": [stage]}).stages[0]


def batch(n=8, labels=None):
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 255, (n, 1, 16, 16), dtype=torch.uint8, generator=generator)
    return Batch(x, torch.arange(n) % 10 if labels is None else labels)


def progress(step=0, steps_per_epoch=10):
    return Progress(step, 100, step // steps_per_epoch, steps_per_epoch)


@pytest.mark.parametrize("method", ["swav", "nnclr", "supcon", "ibot"])
def test_trains_through_the_runner_with_the_online_probe(method, tmp_path):
    stage = tiny_stage("p", method, **SMALL[method], train={"steps": 3, "batch_size": 16})
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": method, "stages": [stage]}), tmp_path / "run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["probe_loss"] > 0 for r in steps)
    epoch = [r for r in records if r.get("kind") == "epoch"][-1]
    assert 0.0 <= epoch["online_probe/train_top1"] <= 1.0
    assert 0.0 <= summary["p/test/top1"] <= 1.0
    if method in ("swav", "ibot"):
        assert 0.0 < epoch[f"{method}/embedding_std"] < 1.0


# ------------------------------------------------------------------------------------------------ SwAV
def test_swav_prototypes_are_unit_norm_after_a_step_and_frozen_during_the_first_epoch():
    method = SwAV(config("swav", freeze_prototypes_epochs=1), SmallCNN(1, width=4), INFO)
    norms = method.prototypes.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    method.training_step(batch(), progress(step=9))["loss"].backward()
    assert method.prototypes.weight.grad is None  # epoch 0: frozen
    method.training_step(batch(), progress(step=10))["loss"].backward()
    assert method.prototypes.weight.grad is not None and method.prototypes.weight.grad.abs().sum() > 0
    with torch.no_grad():
        method.prototypes.weight -= 10.0 * method.prototypes.weight.grad
    assert not torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(12), atol=1e-3)
    method.after_optimizer_step(progress(step=10))
    assert torch.allclose(method.prototypes.weight.norm(dim=1), torch.ones(12), atol=1e-6)


def test_swav_queue_fills_from_its_start_epoch_newest_first_and_feeds_sinkhorn_once_full():
    method = SwAV(config("swav", queue_length=6, queue_start_epochs=1), SmallCNN(1, width=4), INFO)
    a, b = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    method.enqueue((a, b), progress(step=9))  # epoch 0: before the start
    assert int(method.queue_filled) == 0 and method.queue.abs().sum() == 0
    method.enqueue((a, b), progress(step=10))
    assert int(method.queue_filled) == 4 and method.queue_scores() is None  # not full yet
    assert torch.equal(method.queue[0, :4], a) and torch.equal(method.queue[1, :4], b)
    c, d = a.flip(0), b.flip(0)
    method.enqueue((c, d), progress(step=11))
    assert int(method.queue_filled) == 6
    assert torch.equal(method.queue[0], torch.cat([c, a[:2]])) and torch.equal(method.queue[1], torch.cat([d, b[:2]]))
    scores = method.queue_scores()
    assert [s.shape for s in scores] == [(6, 12), (6, 12)]
    assert torch.allclose(scores[0], method.queue[0] @ method.prototypes.weight.T)
    seen = {}
    original = method.loss_fn.forward

    def spy(high, low, queue_scores=None):
        seen["queue"] = queue_scores
        return original(high, low, queue_scores)

    method.loss_fn.forward = spy
    out = method.training_step(batch(4), progress(step=12))
    assert torch.isfinite(out["loss"]) and seen["queue"] is not None and seen["queue"][0].shape == (6, 12)
    assert int(method.queue_filled) == 6 and torch.equal(method.queue[0, 4:], c[:2])  # the step's 4 rows pushed c


def test_swav_views_are_two_global_and_the_local_crops_at_their_size():
    method = SwAV(config("swav", local_crops=3, local_crop_size=0.5), SmallCNN(1, width=4), INFO)
    views = method.augment_views(batch(4))
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8, 8]


# ------------------------------------------------------------------------------------------------ NNCLR
def test_nnclr_support_set_takes_the_steps_first_view_embeddings():
    method = NNCLR(config("nnclr"), SmallCNN(1, width=4), INFO)
    captured = {}
    method.projector.register_forward_hook(lambda module, args, out: captured.setdefault("z", out.detach()))
    before = method.support.embeddings.clone()
    out = method.training_step(batch(8), progress())
    assert torch.isfinite(out["loss"])
    z1 = captured["z"][:8]
    assert int(method.support.pointer) == 8
    assert torch.allclose(method.support.embeddings[:8], F.normalize(z1, dim=1), atol=1e-6)
    assert torch.equal(method.support.embeddings[8:], before[8:])
    out["loss"].backward()
    assert method.predictor[0].weight.grad is not None  # the predictions are the keys


# ------------------------------------------------------------------------------------------------ SupCon
def test_supcon_uses_the_labels_and_equals_nt_xent_when_every_label_differs():
    method = SupCon(config("supcon"), SmallCNN(1, width=4), INFO)
    captured = []
    method.projector.register_forward_hook(lambda module, args, out: captured.append(out.detach()))

    def loss_with(labels):
        torch.manual_seed(0)
        return method.training_step(batch(8, labels), progress())["supcon_loss"]

    distinct = loss_with(torch.arange(8))
    same = loss_with(torch.zeros(8, dtype=torch.long))
    assert torch.equal(captured[0], captured[1])  # same views, same projections
    assert not torch.isclose(distinct, same, rtol=1e-3)
    z1, z2 = captured[0].chunk(2)
    assert torch.allclose(distinct, nt_xent_loss(z1, z2, 0.1), atol=1e-5)  # L_out with unique labels is SimCLR's


# ------------------------------------------------------------------------------------------------ iBOT
def test_ibot_masks_have_the_requested_ratio_and_share():
    exact = ibot_masks(50, 4, (0.25, 0.25), 1.0, "random")
    assert exact.shape == (50, 16) and torch.equal(exact.sum(1), torch.full((50,), 4.0))
    assert ibot_masks(20, 4, (0.1, 0.5), 0.0, "random").sum() == 0
    blocks = ibot_masks(20, 8, (0.5, 0.5), 1.0, "block")
    assert torch.equal(blocks.sum(1), torch.full((20,), 32.0))
    torch.manual_seed(0)
    mixed = ibot_masks(2000, 10, (0.1, 0.5), 0.5, "random").sum(1)
    masked = mixed[mixed > 0]
    assert 0.45 < masked.numel() / 2000 < 0.55 and masked.min() >= 10 and masked.max() <= 50


def test_ibot_student_sees_mask_tokens_and_the_teacher_the_unmasked_crops(monkeypatch):
    method = IBOT(config("ibot", local_crops=0), VisionTransformer(16, 4, 1, dim=16, depth=1, heads=2), INFO)
    mask = torch.zeros(16, 16)
    mask[:, :5] = 1  # the first 5 patches of every global crop (2 × 8 images)
    monkeypatch.setattr("ssl_kit.methods.ibot.ibot_masks", lambda *args: mask)
    inputs = {}
    method.backbone.blocks[0].register_forward_pre_hook(lambda m, args: inputs.setdefault("student", args[0]))
    method.teacher_backbone.blocks[0].register_forward_pre_hook(lambda m, args: inputs.setdefault("teacher", args[0]))
    out = method.training_step(batch(8), progress())
    student, teacher = inputs["student"][:, 1:], inputs["teacher"][:, 1:]  # drop the cls token
    mask_token = (method.mask_token + method.backbone.pos_embed[:, 1:]).expand(16, -1, -1)
    assert torch.allclose(student[:, :5], mask_token[:, :5].detach())
    assert torch.allclose(student[:, 5:], teacher[:, 5:])  # same weights at init, same unmasked tokens
    assert (teacher[:, :5] - mask_token[:, :5]).abs().amin(dim=-1).gt(0).all()
    assert out["ibot/mask_ratio"].item() == pytest.approx(5 / 16)
    out["loss"].backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    assert out["ibot_patch_loss"] > 0 and torch.isfinite(out["ibot_cls_loss"])


def test_ibot_separate_patch_head_follows_the_teacher_ema_and_needs_a_vit():
    method = IBOT(config("ibot", shared_head=False, patch_out_dim=6),
                  VisionTransformer(16, 4, 1, dim=16, depth=1, heads=2), INFO)
    student, teacher = method.patch_heads()
    assert student is not method.head_net and teacher.last_layer.weight.shape[0] == 6
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    method.after_optimizer_step(Progress(0, 10, 0, 10))
    weight = next(teacher.mlp.parameters())
    assert torch.allclose(weight, torch.full_like(weight, 1 - method.cfg.momentum))
    with pytest.raises(ConfigError, match=r"stages\[p\]: iBOT needs a ViT backbone .* got SmallCNN"):
        IBOT(config("ibot"), SmallCNN(1, width=4), INFO)


# ------------------------------------------------------------------------------------------------ configs, collapse
@pytest.mark.parametrize("method, overrides, message", [
    ("swav", {"n_prototypes": 1}, r"stages\[p\]\.n_prototypes: Input should be greater than or equal to 2"),
    ("swav", {"epsilon": 0}, r"stages\[p\]\.epsilon: Input should be greater than 0"),
    ("swav", {"local_crop_scale": [0.5, 0.2]}, r"stages\[p\].*local_crop_scale must satisfy 0 < low <= high <= 1"),
    ("nnclr", {"support_set_size": 0}, r"stages\[p\]\.support_set_size: Input should be greater than or equal to 1"),
    ("supcon", {"temperature": -0.1}, r"stages\[p\]\.temperature: Input should be greater than 0"),
    ("ibot", {"mask_ratio": [0.5, 0.2]}, r"stages\[p\].*mask_ratio must satisfy 0 <= low <= high < 1"),
    ("ibot", {"mask_prob": 1.5}, r"stages\[p\]\.mask_prob: Input should be less than or equal to 1"),
    ("ibot", {"patch_out_dim": 32}, r"patch_out_dim 32 must equal out_dim 16"),
])
def test_bad_values_are_named_by_key_path(method, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(method, **overrides)


def test_embedding_std_watch_reports_the_std_and_warns_once_on_collapse():
    monitor = EmbeddingStdWatch("swav")
    torch.manual_seed(0)
    monitor.update(torch.randn(4096, 64))
    healthy = monitor.epoch_metrics()["swav/embedding_std"]
    assert healthy == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = torch.ones(32, 64) + 1e-4 * torch.randn(32, 64)
    monitor.update(collapsed)
    with pytest.warns(UserWarning, match=rf"swav: embedding std .* below {DEFAULT_THRESHOLD:g}/√D = {DEFAULT_THRESHOLD / 8:.2e}"):
        assert monitor.epoch_metrics()["swav/embedding_std"] < 1e-3
    monitor.update(collapsed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.epoch_metrics()  # only once
    assert monitor.epoch_metrics() == {}


def test_ibot_student_patch_head_runs_on_masked_tokens_only_with_the_full_heads_loss_and_gradients():
    """masked_patch_logits: the patch loss and the head's gradients equal those of the head applied to every token
    (the loss reads masked positions only); the head sees exactly the masked tokens."""
    from ssl_kit.losses import ibot_patch_loss
    from ssl_kit.methods.dino import DINOHead
    from ssl_kit.methods.ibot import masked_patch_logits

    torch.manual_seed(0)
    head = DINOHead(8, 16, 12, 4, norm_last_layer=False)
    tokens, teacher = torch.randn(3, 5, 8), torch.randn(3, 5, 16)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    center = torch.randn(16)
    seen = []
    handle = head.mlp.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0].shape[0]))
    partial = ibot_patch_loss(masked_patch_logits(head, tokens, mask), teacher, mask, center)
    partial.backward()
    partial_grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    full = ibot_patch_loss(head(tokens).float(), teacher, mask, center)
    full.backward()
    handle.remove()
    assert seen[0] == int(mask.sum()) == 6
    assert torch.allclose(partial, full, atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(partial_grads, head.parameters()))
