"""DINOv2: KoLeo equals lightly 1.6's KoLeoLoss; the [CLS] loss with softmax centring equals lightly's DINOLoss and,
with Sinkhorn-Knopp targets (which lightly's DINOLoss lacks: center_mode "mean" only), the paper's formula computed
naively; the masked-patch loss equals lightly's IBOTPatchLoss (values and gradients); two gloo ranks give the global
batch's Sinkhorn-Knopp targets (also with unequal and empty patch counts) and the gathered KoLeo; DINOv2's mask
counts, layer-wise lr groups and eval-mode teacher; bad arguments named; the method trains on its defaults.
DINOv3's Gram anchoring: the loss equals its formula computed naively; off (gram_weight 0) or before its start the
loss is exactly the DINOv2 loss; the Gram teacher is reloaded from the EMA teacher exactly every gram_update_every
steps from the start step; a resumed run repeats the uninterrupted one."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import DataInfo, prepare_data
from ssl_kit.engine.optim import build_optimizer
from ssl_kit.errors import ConfigError
from ssl_kit.losses import (KoLeoLoss, dinov2_cls_loss, dinov2_patch_loss, gram_loss, koleo_loss, sinkhorn,
                            sinkhorn_knopp_centering, softmax_centering)
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.methods.dinov2 import DINOv2, dinov2_mask_counts
from ssl_kit.models.cnn import SmallCNN
from ssl_kit.models.registry import build_backbone
from ssl_kit.models.vit import VisionTransformer
from tests.conftest import interrupted_then_resumed, tiny_stage
from tests.oracle import TOL, assert_same, randn, value_and_grads
from tests.test_distributed import _set_env, spawn_ranks

lightly_loss = pytest.importorskip("lightly.loss")  # the oracle only: ssl_kit never imports lightly

VIT = {"name": "vit_tiny", "kwargs": {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}}
INFO = DataInfo(10, [str(i) for i in range(10)], 1, 16, [0.5], [0.25], "digits")



# ---------------------------------------------------------------------------------------------- KoLeo
@pytest.mark.parametrize("n,d", [(8, 5), (16, 3)])
def test_koleo_equals_lightly(n, d):
    x = randn(n, d, seed=n)
    expected = value_and_grads(lightly_loss.KoLeoLoss(), x)
    assert_same(value_and_grads(koleo_loss, x), expected)
    assert_same(value_and_grads(KoLeoLoss(), x), expected)
    assert expected[0].item() != pytest.approx(0.0, abs=1e-3)


def test_koleo_is_lower_for_spread_rows():
    """Two clusters of near-duplicates have tiny nearest-neighbour distances: a far larger loss than spread rows."""
    spread = torch.eye(4)
    clustered = torch.tensor([[1.0, 0.0], [1.0, 1e-3], [0.0, 1.0], [1e-3, 1.0]])
    assert koleo_loss(spread).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    assert koleo_loss(clustered).item() > 6.0


# ------------------------------------------------------------------------------------ [CLS] loss, centring
def naive_sinkhorn(logits, temp, iterations):
    """The paper's Sinkhorn-Knopp written out sample by sample and prototype by prototype, in float64."""
    q = torch.exp(logits.double() / temp).T.clone()  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] = q[row] / q[row].sum() / k
        for col in range(b):
            q[:, col] = q[:, col] / q[:, col].sum() / b
    return (q * b).T


def naive_cls_loss(student, teacher_probs, student_temp):
    """Mean over (teacher i, student j ≠ i) pairs and samples of −Σ_k p log softmax(s / τ), sample by sample."""
    terms = []
    for i, probs in enumerate(teacher_probs):
        for j, logits in enumerate(student):
            if i == j:
                continue
            for row in range(logits.shape[0]):
                log_p = logits[row] / student_temp - torch.logsumexp(logits[row] / student_temp, dim=0)
                terms.append(-(probs[row] * log_p).sum())
    return torch.stack(terms).mean()


def test_sinkhorn_knopp_targets_equal_the_naive_algorithm_and_swavs():
    logits = randn(12, 7, seed=3)
    targets = sinkhorn_knopp_centering(logits, 0.07, 3)
    torch.testing.assert_close(targets.double(), naive_sinkhorn(logits, 0.07, 3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(targets, sinkhorn(logits, 3, 0.07), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(12), atol=1e-5, rtol=0)
    assert not targets.requires_grad
    imbalance = (targets.sum(dim=0) / 12 - 1 / 7).abs().max()  # prototype shares of the batch, pushed towards 1/K
    softmax = softmax_centering(logits, torch.zeros(7), 0.07)
    assert imbalance < 0.5 * (softmax.sum(dim=0) / 12 - 1 / 7).abs().max()  # 0.11 against the softmax's 0.26


def test_cls_loss_with_sinkhorn_knopp_targets_equals_the_naive_formula():
    teacher = [randn(6, 9, seed=10), randn(6, 9, seed=11)]
    student = [randn(6, 9, seed=12 + v) for v in range(4)]  # 2 global + 2 local crops
    probs = sinkhorn_knopp_centering(torch.cat(teacher), 0.04, 3).chunk(2)
    naive_probs = naive_sinkhorn(torch.cat(teacher), 0.04, 3).chunk(2)
    ours = value_and_grads(lambda *s: dinov2_cls_loss(list(s), list(probs), 0.1), *student)
    naive = value_and_grads(lambda *s: naive_cls_loss([x.double() for x in s], naive_probs, 0.1), *student)
    torch.testing.assert_close(ours[0].double(), naive[0], **TOL)
    for a, b in zip(ours[1], naive[1]):
        torch.testing.assert_close(a.double(), b.double(), **TOL)


@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_cls_loss_with_softmax_centring_equals_lightly_dino_loss(teacher_temp):
    k = 9
    teacher = [randn(6, k, seed=20), randn(6, k, seed=21)]
    student = [randn(6, k, seed=22 + v) for v in range(3)]
    center = randn(1, k, seed=30) * 0.3
    theirs = lightly_loss.DINOLoss(output_dim=k, teacher_temp=teacher_temp, student_temp=0.1)
    theirs.center.copy_(center.view(1, 1, k))
    expected = value_and_grads(lambda *s: theirs(teacher, list(s), teacher_temp=teacher_temp), *student)
    probs = [softmax_centering(t, center, teacher_temp) for t in teacher]
    assert_same(value_and_grads(lambda *s: dinov2_cls_loss(list(s), probs, 0.1), *student), expected)


# ------------------------------------------------------------------------------------------ patch loss
def patch_case():
    """8 images of a 3 × 3 grid; image 5 has no masked token; the logits of the masked tokens only."""
    mask = torch.rand(8, 3, 3, generator=torch.Generator().manual_seed(4)) < 0.4
    mask[5] = False
    mask[0, 0, 0] = True
    m = int(mask.sum())
    return mask, randn(m, 11, seed=40), randn(m, 11, seed=41), randn(1, 11, seed=42) * 0.5


def test_patch_loss_with_softmax_centring_equals_lightly_ibot_patch_loss():
    mask, student, teacher, center = patch_case()
    theirs = lightly_loss.IBOTPatchLoss(output_dim=11, teacher_temp=0.07, student_temp=0.1)
    theirs.center.center.copy_(center)
    expected = value_and_grads(lambda s: theirs(teacher, s, mask, teacher_temp=0.07), student)
    probs = softmax_centering(teacher, center, 0.07)
    ours = value_and_grads(lambda s: dinov2_patch_loss(s, probs, mask.flatten(1), 0.1), student)
    assert_same(ours, expected)
    assert expected[0].item() > 1.0


def test_the_methods_centring_mode_matches_lightlys_running_centres():
    """centering: centering — targets from the current centres, then both centres move as lightly's do (the patch
    centre from the teacher's masked tokens)."""
    method = DINOv2(config(centering="centering", out_dim=9, patch_out_dim=11), vit(), INFO)
    mask, _, teacher_patch, _ = patch_case()
    teacher_cls = randn(8, 9, seed=50)
    cls_loss = lightly_loss.DINOLoss(output_dim=9, teacher_temp=0.07)
    patch_loss = lightly_loss.IBOTPatchLoss(output_dim=11, teacher_temp=0.07)
    for step in range(2):
        cls_targets, patch_targets = method.teacher_targets(teacher_cls + step, teacher_patch - step, 0.07, 0.07)
        torch.testing.assert_close(cls_targets, F.softmax((teacher_cls + step - cls_loss.center[0]) / 0.07, dim=1))
        torch.testing.assert_close(patch_targets,
                                   F.softmax((teacher_patch - step - patch_loss.center.value) / 0.07, dim=1))
        cls_loss.update_center(torch.stack((teacher_cls + step).chunk(2)))
        patch_loss.center.update(teacher_patch - step)
        torch.testing.assert_close(method.center.view(-1), cls_loss.center.view(-1), **TOL)
        torch.testing.assert_close(method.patch_center.view(-1), patch_loss.center.value.view(-1), **TOL)
    assert method.patch_center.abs().sum() > 0


# ---------------------------------------------------------------------------------- two ranks == global batch
WORLD = 2
PATCH_ROWS = {"unequal": (5, 2), "one_empty": (4, 0)}


def distributed_inputs():
    return {"cls": randn(8, 6, seed=60), "patch": randn(7, 5, seed=61), "koleo": randn(10, 4, seed=62)}


def _worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        inputs, results = distributed_inputs(), {}
        half = inputs["cls"].shape[0] // world
        results["cls"] = sinkhorn_knopp_centering(inputs["cls"][rank * half:(rank + 1) * half], 0.05, 3)
        for name, counts in PATCH_ROWS.items():
            start = sum(counts[:rank])
            results[name] = sinkhorn_knopp_centering(inputs["patch"][start:start + counts[rank]], 0.07, 3)
        rows = inputs["koleo"][rank * 5:(rank + 1) * 5]
        results["koleo_gathered"] = value_and_grads(KoLeoLoss(gather_distributed=True), rows)
        results["koleo_per_rank"] = value_and_grads(KoLeoLoss(), rows)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("dinov2_ddp"))


@pytest.mark.slow
def test_sinkhorn_knopp_over_two_ranks_equals_the_global_batch(ranks):
    inputs = distributed_inputs()
    torch.testing.assert_close(torch.cat([r["cls"] for r in ranks]),
                               sinkhorn_knopp_centering(inputs["cls"], 0.05, 3), atol=1e-6, rtol=1e-5)
    for name, counts in PATCH_ROWS.items():
        together = torch.cat([r[name] for r in ranks])
        assert [r[name].shape[0] for r in ranks] == list(counts)
        torch.testing.assert_close(together, sinkhorn_knopp_centering(inputs["patch"][:sum(counts)], 0.07, 3),
                                   atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_koleo_gathered_over_two_ranks_equals_the_global_batch_and_per_rank_by_default(ranks):
    x = distributed_inputs()["koleo"]
    loss, (grad,) = value_and_grads(koleo_loss, x)
    assert torch.stack([r["koleo_gathered"][0] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    gathered = torch.cat([r["koleo_gathered"][1][0] for r in ranks]) / WORLD
    torch.testing.assert_close(gathered, grad, atol=1e-6, rtol=1e-4)
    for rank, result in enumerate(ranks):  # the reference's default: each rank's rows among themselves
        assert_same(result["koleo_per_rank"], value_and_grads(koleo_loss, x[rank * 5:(rank + 1) * 5]))


# ------------------------------------------------------------------------------------------- the method
def config(**overrides):
    small = dict(backbone=VIT, out_dim=16, patch_out_dim=12, head_hidden_dim=16, bottleneck_dim=8, local_crops=2,
                 local_crop_size=0.5, warmup_teacher_temp_epochs=0)
    stage = tiny_stage("p", "dinov2", **{**small, **overrides})
    return validate_recipe({"seed": 0, "stages": [stage]}).stages[0]


def vit():
    torch.manual_seed(0)
    return VisionTransformer(16, 4, 1, dim=32, depth=2, heads=2)


def test_mask_counts_follow_dinov2s_collate():
    """int(n · p) crops masked, their shares one per bin of the ratio range (stratified), the rest unmasked."""
    torch.manual_seed(0)
    counts = dinov2_mask_counts(20, 100, (0.1, 0.5), 0.5)
    masked = counts[counts > 0].sort().values
    assert (counts == 0).sum() == 10 and len(masked) == 10
    for k, count in enumerate(masked.tolist()):
        assert int(100 * (0.1 + 0.04 * k)) <= count <= int(100 * (0.1 + 0.04 * (k + 1))), (k, count)
    assert (dinov2_mask_counts(7, 16, (0.1, 0.5), 0.5) > 0).sum() == 3
    method = DINOv2(config(masking="block", mask_prob=1.0, mask_ratio=(0.25, 0.5)), vit(), INFO)
    masks = method.masks(6, "cpu")
    assert masks.shape == (6, 16) and ((masks.sum(1) >= 4) & (masks.sum(1) <= 8)).all()


def test_parameter_groups_decay_the_lr_by_layer_as_the_reference():
    method = DINOv2(config(layer_decay=0.5, patch_embed_lr_mult=0.2), vit(), INFO)
    groups = {g.name: g for g in method.parameter_groups()}
    scale = {id(p): g.lr_scale for g in groups.values() for p in g.params}
    backbone = method.backbone
    assert scale[id(backbone.cls_token)] == scale[id(method.mask_token)] == pytest.approx(0.5 ** 3)
    assert scale[id(backbone.patch_embed.weight)] == pytest.approx(0.5 ** 3 * 0.2)
    assert scale[id(backbone.blocks[0].mlp[0].weight)] == pytest.approx(0.25)
    assert scale[id(backbone.blocks[1].mlp[0].weight)] == pytest.approx(0.5)
    assert scale[id(backbone.norm.weight)] == scale[id(method.patch_head_net.mlp[0].weight)] == 1.0
    trainable = [p for p in method.parameters() if p.requires_grad]
    listed = [p for g in groups.values() for p in g.params]
    assert len(listed) == len(trainable) and {id(p) for p in listed} == {id(p) for p in trainable}
    assert not groups["probe"].weight_decay


def test_the_teacher_runs_in_eval_mode_and_koleo_reads_the_students_global_cls(monkeypatch):
    method = DINOv2(config(), vit(), INFO).train()
    assert method.backbone.training and not method.teacher_backbone.training
    seen = []
    monkeypatch.setattr(method.koleo, "forward", lambda x: seen.append(tuple(x.shape)) or x.pow(2).mean())
    x = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8)
    out = method.training_step(Batch(x, torch.arange(8) % 10), Progress(0, 10, 0, 10))
    assert seen == [(8, 32), (8, 32)]  # one term per global crop, on the backbone's 32-wide [CLS] features
    assert out["koleo_loss"].requires_grad is False and out["dinov2_patch_loss"] > 0
    assert 0 <= out["dinov2/teacher_entropy"].item() <= math.log(16) + 1e-5
    out["loss"].backward()
    assert method.mask_token.grad is not None and method.patch_head_net.mlp[0].weight.grad is not None
    assert all(p.grad is None for p in method.teacher_backbone.parameters())


def test_collapse_warning_names_dinov2():
    method = DINOv2(config(), vit(), INFO)
    with pytest.warns(UserWarning, match=r"DINOv2 \[CLS\] loss .* sits at ln K"):
        method.warn_if_collapsed(math.log(16))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="koleo_loss needs a batch of at least 2 samples, got N=1"):
        koleo_loss(randn(1, 3))
    with pytest.raises(ValueError, match="eps must be a number > 0, got 0"):
        KoLeoLoss(eps=0)
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        sinkhorn_knopp_centering(randn(4, 3), 0.1, 0)
    with pytest.raises(ValueError, match="teacher_temp must be a number > 0, got 0"):
        sinkhorn_knopp_centering(randn(4, 3), 0)
    with pytest.raises(ValueError, match="mask has 2 masked tokens but student_patch_logits has 3 rows"):
        dinov2_patch_loss(randn(3, 4), torch.ones(3, 4) / 4, torch.tensor([[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match=r"needs a \(teacher i, student j\) pair with i != j"):
        dinov2_cls_loss([randn(2, 3)], [torch.ones(2, 3) / 3])
    with pytest.raises(ValueError, match=r"center must have 3 entries, got shape \(4,\)"):
        softmax_centering(randn(2, 3), torch.zeros(4), 0.1)
    with pytest.raises(ConfigError, match=r"stages\[p\]: DINOv2 needs a ViT backbone .* got SmallCNN"):
        DINOv2(config(), SmallCNN(1, width=4), INFO)
    for key, value, message in [("centering", "mean", "Input should be 'sinkhorn_knopp' or 'centering'"),
                                ("koleo_weight", -0.1, "greater than or equal to 0"),
                                ("layer_decay", 0.0, "greater than 0")]:
        with pytest.raises(ConfigError, match=rf"stages\[p\]\.{key}: .*{message}"):
            config(**{key: value})


def test_trains_on_its_defaults_on_digits():
    """Two steps with nothing but `method: dinov2` and a tiny ViT (65536 prototypes, separate heads, Sinkhorn-Knopp,
    KoLeo, the recommended AdamW with layer-wise decay): finite losses, the student moves, the teacher follows."""
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "dinov2", "backbone": VIT,
                                                  "data": {"dataset": "digits", "image_size": 16}}]}).stages[0]
    assert (cfg.out_dim, cfg.shared_head, cfg.centering, cfg.koleo_weight) == (65536, False, "sinkhorn_knopp", 0.1)
    data = prepare_data(cfg.data, 0)
    torch.manual_seed(0)
    model = build_method("dinov2")(cfg, build_backbone("vit_tiny", 1, 16, VIT["kwargs"]), data.info)
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, 8)
    batch = Batch(x=data.train.images[:8], y=data.train.labels[:8])
    before = [p.detach().clone() for p in model.backbone.parameters()]
    teacher_before = [p.detach().clone() for p in model.teacher_backbone.parameters()]
    for step in range(2):
        out = model.training_step(batch, Progress(step, 2, 0, 2))
        assert all(math.isfinite(out[k].item()) for k in ("loss", "dinov2_cls_loss", "dinov2_patch_loss",
                                                          "koleo_loss"))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        model.after_optimizer_step(Progress(step, 2, 0, 2))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(teacher_before, model.teacher_backbone.parameters()))
    assert "dinov2/embedding_std" in model.epoch_metrics()


# ------------------------------------------------------------------------------------ Gram anchoring (DINOv3)
def naive_gram_loss(student, teacher, normalize=True, remove_negative=False):
    """mean over images b and patch pairs (i, j) of (cos_S(i, j) − cos_G(i, j))², pair by pair in float64."""
    def similarity(x, b, i, j):
        u, v = x[b, i].double(), x[b, j].double()
        value = (u @ v) / (u.norm() * v.norm()) if normalize else u @ v
        return value.clamp(min=0.0) if remove_negative else value

    b_count, p_count, _ = student.shape
    terms = [(similarity(student, b, i, j) - similarity(teacher, b, i, j)) ** 2
             for b in range(b_count) for i in range(p_count) for j in range(p_count)]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("normalize,remove_negative", [(True, False), (False, False), (True, True)])
def test_gram_loss_equals_the_naive_formula(normalize, remove_negative):
    student, teacher = randn(3, 5, 4, seed=70), randn(3, 5, 4, seed=71)
    ours = value_and_grads(lambda s: gram_loss(s, teacher, normalize, remove_negative), student)
    naive = value_and_grads(lambda s: naive_gram_loss(s, teacher, normalize, remove_negative), student)
    torch.testing.assert_close(ours[0].double(), naive[0], **TOL)
    torch.testing.assert_close(ours[1][0].double(), naive[1][0].double(), **TOL)
    assert ours[0].item() > 1e-2
    teacher_leaf = teacher.clone().requires_grad_(True)
    gram_loss(student.clone().requires_grad_(True), teacher_leaf).backward()
    assert teacher_leaf.grad is None  # the Gram teacher is a target
    assert gram_loss(student, student * 3.0).item() == pytest.approx(0.0, abs=1e-6)  # scale-free when normalised


def gram_method(**overrides):
    """A tiny DINOv2 with Gram anchoring and its SGD optimizer (global RNG seeded 0 before building)."""
    method = DINOv2(config(**overrides), vit(), INFO).train()
    return method, build_optimizer(method.parameter_groups(), method.cfg.optimizer, 8)


def gram_step(method, optimizer, step, total):
    """One training step on a fixed batch (RNG seeded by the step). -> the step's outputs."""
    torch.manual_seed(100 + step)
    x = torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(step))
    out = method.training_step(Batch(x, torch.arange(8) % 10), Progress(step, total, 0, total))
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    grads = [None if p.grad is None else p.grad.clone() for p in method.parameters() if p.requires_grad]
    optimizer.step()
    method.after_optimizer_step(Progress(step, total, 0, total))
    return out, grads


def dinov2_loss_of(out, cfg):
    """The DINOv2 loss without Gram, rebuilt from the logged parts in training_step's order of operations."""
    return (out["dinov2_cls_loss"] + cfg.lambda_patch * out["dinov2_patch_loss"]
            + cfg.koleo_weight * (out["koleo_loss"] * 2)) + out["probe_loss"]


def test_gram_off_or_before_its_start_leaves_the_loss_and_gradients_exactly_as_before():
    off, off_opt = gram_method()
    on, on_opt = gram_method(gram_weight=2.0, gram_start_fraction=0.5, gram_update_every=2)
    assert not hasattr(off, "gram_teacher") and not any(k.startswith("gram_") for k in off.state_dict())
    assert any(k.startswith("gram_teacher.") for k in on.state_dict())
    for step in range(4):
        out_off, grads_off = gram_step(off, off_opt, step, 4)
        out_on, grads_on = gram_step(on, on_opt, step, 4)
        assert "gram_loss" not in out_off and torch.equal(out_off["loss"], dinov2_loss_of(out_off, off.cfg))
        if step < 2:  # before round(0.5 × 4) = 2: bit-identical to the run without Gram anchoring
            assert torch.equal(out_on["loss"], out_off["loss"]) and out_on["gram_loss"].item() == 0.0
            assert all(torch.equal(a, b) for a, b in zip(grads_on, grads_off) if a is not None or b is not None)
        else:  # from the start step: the DINOv2 loss + gram_weight × the Gram loss
            assert out_on["gram_loss"].item() > 0
            torch.testing.assert_close(out_on["loss"], dinov2_loss_of(out_on, on.cfg) + 2.0 * out_on["gram_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(grads_on, grads_off) if a is not None)


def test_the_gram_teacher_is_reloaded_from_the_ema_teacher_exactly_every_gram_update_every_steps():
    """start round(0.3 × 10) = 3, every 3 steps: reloads before steps 3, 6 and 9, untouched in between."""
    method, optimizer = gram_method(gram_weight=1.0, gram_start_fraction=0.3, gram_update_every=3)
    assert not method.gram_teacher.training and not any(p.requires_grad for p in method.gram_teacher.parameters())
    reloads = []
    for step in range(10):
        teacher = [t.clone() for t in method.teacher_backbone.state_dict().values()]
        gram_before = [t.clone() for t in method.gram_teacher.state_dict().values()]
        out, _ = gram_step(method, optimizer, step, 10)
        gram = list(method.gram_teacher.state_dict().values())
        if all(torch.equal(a, b) for a, b in zip(gram, teacher)) and not all(
                torch.equal(a, b) for a, b in zip(gram, gram_before)):
            reloads.append(step)
        else:
            assert all(torch.equal(a, b) for a, b in zip(gram, gram_before)), step
        assert (out["gram_loss"].item() > 0) == (step >= 3), step
    assert reloads == [3, 6, 9]
    assert not all(torch.equal(a, b) for a, b in zip(method.gram_teacher.state_dict().values(),
                                                      method.teacher_backbone.state_dict().values()))


def test_a_run_with_gram_anchoring_resumes_exactly(tmp_path):
    """12 steps, Gram on from step 3 and reloaded at 3, 6, 9, checkpoints every 4 steps: stopped before step 10 and
    resumed from the step-8 checkpoint (Gram teacher of step 6, no longer the EMA teacher's), the run repeats the
    uninterrupted one step by step."""
    small = dict(backbone=VIT, out_dim=16, patch_out_dim=12, head_hidden_dim=16, bottleneck_dim=8, local_crops=2,
                 local_crop_size=0.5, warmup_teacher_temp_epochs=0, gram_weight=1.0, gram_start_fraction=0.25,
                 gram_update_every=3, train={"steps": 12, "batch_size": 16, "checkpoint_every_steps": 4})
    recipe = validate_recipe({"seed": 0, "name": "gram", "stages": [tiny_stage("p", "dinov2", **small)]})
    reference, resumed = interrupted_then_resumed(recipe, tmp_path, crash_step=10)

    def steps(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {row["step"]: (row["loss"], row["gram_loss"]) for row in rows if row.get("kind") == "step"}

    a, b = steps("a"), steps("b")
    assert a == b and len(a) == 12
    assert [step for step, (_, gram) in sorted(a.items()) if gram > 0] == list(range(4, 13))  # rows: steps done
    drop = ("p/train_seconds", "p/images_per_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}


@pytest.mark.parametrize("key,value,message", [("gram_weight", -1.0, "greater than or equal to 0"),
                                                ("gram_start_fraction", 1.0, "less than 1"),
                                                ("gram_start_fraction", -0.1, "greater than or equal to 0"),
                                                ("gram_update_every", 0, "greater than or equal to 1")])
def test_bad_gram_options_are_named(key, value, message):
    with pytest.raises(ConfigError, match=rf"stages\[p\]\.{key}: .*{message}"):
        config(**{key: value})


def test_gram_loss_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"student_patches must be a 3-D tensor \(B, P, D\), got shape \(4, 3\)"):
        gram_loss(randn(4, 3), randn(4, 3))
    with pytest.raises(ValueError, match=r"must have the same shape, got \(2, 4, 3\) and \(2, 5, 3\)"):
        gram_loss(randn(2, 4, 3), randn(2, 5, 3))
