"""SimMatch, AdaMatch, DKD, multi-teacher KD and FitNets hints (issue 17): each trains through the runner with the
pseudo-label metrics logged, and what is specific to it is checked inside one step against the loss functions."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import DataInfo
from ssl_kit.errors import ConfigError
from ssl_kit.losses import dkd_loss, kd_loss, multi_teacher_kd_loss, simmatch_unfold_aggregate
from ssl_kit.methods.adamatch import AdaMatch
from ssl_kit.methods.base import Progress
from ssl_kit.methods.dkd import DecoupledKD
from ssl_kit.methods.hint import build_regressor
from ssl_kit.methods.kd import KnowledgeDistillation
from ssl_kit.methods.simmatch import AlignmentQueue, SimMatch
from ssl_kit.models.cnn import SmallCNN
from ssl_kit.models.heads import Classifier
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage

INFO = DataInfo(10, [str(i) for i in range(10)], 1, 16, [0.5], [0.25], "digits")
FIXED_VIEWS = {"dataset": "digits", "image_size": 16, "translate": 0.0, "hflip": False}


def config(stage: dict):
    return validate_recipe({"seed": 0, "stages": [stage]}).stages[0]


def semi_batch(n=8, mu=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g), torch.arange(n) % 10,
                 u=torch.randint(0, 256, (mu * n, 1, 16, 16), dtype=torch.uint8, generator=g),
                 u_y=torch.arange(mu * n) % 10, u_index=torch.arange(mu * n), x_index=torch.arange(n) * 3)


def test_simmatch_and_adamatch_train_through_the_runner_with_pseudo_metrics(tmp_path):
    data = {"dataset": "digits", "image_size": 16, "labels_per_class": 4}
    train = {"steps": 4, "batch_size": 16, "ema_decay": 0.9}
    stages = [tiny_stage("sm", "simmatch", data=data, mu=2, proj_size=16, train=train),
              tiny_stage("ada", "adamatch", data=data, mu=2, train=train)]
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "t", "stages": stages}), tmp_path / "run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for stage, extra in (("sm", "instance_loss"), ("ada", "unsup_weight")):
        steps = [r for r in records if r.get("stage") == stage and r.get("kind") == "step"]
        assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps), stage
        assert any(extra in r for r in steps), (stage, steps[0])
        epochs = [r for r in records if r.get("stage") == stage and "pseudo/mask_rate" in r]
        assert epochs and 0.0 <= epochs[-1]["pseudo/mask_rate"] <= 1.0 and len(epochs[-1]["pseudo/thresholds"]) == 10
        assert 0.0 <= summary[f"{stage}/test/top1"] <= 1.0


def simmatch(**overrides):
    cfg = config(tiny_stage("s", "simmatch", data=FIXED_VIEWS, mu=2, proj_size=8, **overrides))
    labeled = torch.arange(8) * 3  # training-set indices of the labeled images
    return SimMatch(cfg, SmallCNN(1, width=4, norm="none"), INFO, num_unlabeled=16, labeled_index=labeled,
                    labeled_labels=labeled % 10)


def test_simmatch_bank_is_updated_with_the_labeled_batch_embeddings():
    """ema_bank 0 without the teacher: the student's joint-pass embeddings overwrite their slots (the old update)."""
    torch.manual_seed(0)
    method = simmatch(ema_bank=0.0, bank_teacher=False)
    batch = semi_batch()
    before = method.bank.clone()
    assert method.bank_labels.tolist() == [(3 * i) % 10 for i in range(8)]
    out = method.training_step(Batch(batch.x[:4], batch.y[:4], batch.u[:8], batch.u_y[:8], batch.u_index[:8],
                                     x_index=torch.tensor([3, 9, 0, 21])), Progress(0, 10, 0, 10))
    assert torch.isfinite(out["loss"]) and out["instance_loss"] > 0
    # no normalisation layer and fixed weak views: the labeled embeddings are per-sample and reproducible
    expected = method.embed(method.net.backbone(method.weak_view(batch.x[:4]))).detach()
    slots = [1, 3, 0, 7]
    assert torch.allclose(method.bank[slots], expected, atol=1e-5)
    assert method.bank_labels[slots].tolist() == batch.y[:4].tolist()
    untouched = [2, 4, 5, 6]
    assert torch.equal(method.bank[untouched], before[untouched])


def perturbed_student(method) -> None:
    """Move the student's backbone and projector away from the teacher (a copy of them at construction)."""
    with torch.no_grad():
        for p in [*method.net.backbone.parameters(), *method.projector.parameters()]:
            p.add_(0.2 * torch.randn_like(p))


LABELED_STEP_INDEX, LABELED_STEP_SLOTS = torch.tensor([3, 9, 0, 21]), [1, 3, 0, 7]  # slot = index / 3


def labeled_step(method, batch) -> None:
    """One training step whose labeled images (batch.x[:4]) sit in bank slots LABELED_STEP_SLOTS."""
    method.training_step(Batch(batch.x[:4], batch.y[:4], batch.u[:8], batch.u_y[:8], batch.u_index[:8],
                               x_index=LABELED_STEP_INDEX), Progress(0, 10, 0, 10))


@pytest.mark.parametrize("ema_bank", [0.7, 0.0])
def test_simmatch_bank_moves_towards_the_teachers_labeled_embeddings(ema_bank):
    """USB's update: slot ← normalise(ema_bank · slot + (1 − ema_bank) · teacher embedding of the weak view); slots
    outside the batch keep their rows; ema_bank 0 overwrites."""
    torch.manual_seed(0)
    method = simmatch(ema_bank=ema_bank)
    perturbed_student(method)
    batch, before = semi_batch(), method.bank.clone()
    labeled_step(method, batch)
    with torch.no_grad():
        weak = method.weak_view(batch.x[:4])
        teacher = method.teacher_projector(method.teacher_backbone(weak))
        teacher = teacher / teacher.norm(dim=1, keepdim=True)
        student = method.embed(method.net.backbone(weak))
    slots = LABELED_STEP_SLOTS
    mixed = ema_bank * before[slots] + (1 - ema_bank) * teacher
    expected = mixed / mixed.norm(dim=1, keepdim=True)
    assert torch.allclose(method.bank[slots], expected, atol=1e-5)
    assert not torch.allclose(teacher, student, atol=1e-3)  # the teacher, not the student, fed the bank
    assert torch.allclose(method.bank.norm(dim=1), torch.ones(8), atol=1e-5)
    assert method.bank_labels[slots].tolist() == batch.y[:4].tolist()
    untouched = [2, 4, 5, 6]
    assert torch.equal(method.bank[untouched], before[untouched])


def test_simmatch_teacher_follows_the_student_by_ema_and_stays_in_eval_mode():
    torch.manual_seed(0)
    method = simmatch(train={"ema_decay": 0.9})
    teacher = method.teacher_backbone.features[0].weight.clone()
    perturbed_student(method)
    student = method.net.backbone.features[0].weight.detach().clone()
    method.train()
    assert method.net.training and not method.teacher_backbone.training and not method.teacher_projector.training
    method.after_optimizer_step(Progress(0, 10, 0, 10))
    assert torch.allclose(method.teacher_backbone.features[0].weight, 0.9 * teacher + 0.1 * student, atol=1e-6)
    no_decay = simmatch()  # train.ema_decay unset: the teacher takes the student's current weights
    perturbed_student(no_decay)
    no_decay.after_optimizer_step(Progress(0, 10, 0, 10))
    assert torch.equal(no_decay.teacher_projector[0].weight, no_decay.projector[0].weight)
    assert not hasattr(simmatch(bank_teacher=False), "teacher_backbone")


def test_simmatch_bank_config_errors():
    with pytest.raises(ConfigError, match=r"stages\[s\].ema_bank"):
        config(tiny_stage("s", "simmatch", ema_bank=1.5))


def test_simmatch_pseudo_labels_come_from_the_unfolded_bank():
    """α = 0.5: the class target p̂ is half classifier, half bank similarity (aggregated per bank label)."""
    torch.manual_seed(0)
    method = simmatch(smoothing_alpha=0.5, da_len=0, threshold=0.0)
    captured = {}
    original = simmatch_unfold_aggregate

    def record(*args, **kwargs):
        captured["result"] = original(*args, **kwargs)
        captured["args"] = [a.clone() if torch.is_tensor(a) else a for a in args]  # the bank changes after
        return captured["result"]

    import ssl_kit.methods.simmatch as module
    module.simmatch_unfold_aggregate, saved = record, module.simmatch_unfold_aggregate
    try:
        method.training_step(semi_batch(), Progress(0, 10, 0, 10))
    finally:
        module.simmatch_unfold_aggregate = saved
    embeddings, bank, labels, probs, temperature, alpha = captured["args"]
    similarity = torch.softmax(embeddings @ bank.T / 0.1, dim=1)
    aggregated = torch.stack([similarity[:, labels == c].sum(1) for c in range(10)], dim=1)
    assert temperature == 0.1 and alpha == 0.5
    assert torch.allclose(captured["result"][1], 0.5 * probs + 0.5 * aggregated, atol=1e-5)


def test_simmatch_alignment_queue_is_usbs_dist_align_queue():
    queue = AlignmentQueue(2, length=2)
    aligned = queue(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))  # queue: [0.8, 0.2] and the uniform start
    p_model = torch.tensor([0.65, 0.35])
    expected = torch.tensor([0.9, 0.1]) * (0.5 + 1e-6) / (p_model + 1e-6)
    assert torch.allclose(aligned[0], expected / expected.sum())
    assert int(queue.pointer) == 1


def adamatch(**overrides):
    cfg = config(tiny_stage("a", "adamatch", data=FIXED_VIEWS, mu=2, **overrides))
    return AdaMatch(cfg, SmallCNN(1, width=4), INFO, num_unlabeled=16)


def test_adamatch_interpolates_labeled_logits_and_thresholds_relative_to_them(monkeypatch):
    import ssl_kit.methods.adamatch as module

    torch.manual_seed(0)
    method = adamatch(ema_p=0.0, labeled_strong=False)  # the weak-only source loss (USB's AdaMatch)
    calls = []

    def record(joint, separate, generator=None):
        result = module.__dict__["_original"](joint, separate, generator)
        calls.append((joint.detach().clone(), separate.detach().clone(), result))
        return result

    monkeypatch.setitem(module.__dict__, "_original", module.random_logit_interpolation)
    monkeypatch.setattr(module, "random_logit_interpolation", record)
    batch = semi_batch()
    out = method.training_step(batch, Progress(0, 10, 0, 10))
    (joint, separate, mixed), = calls
    assert not torch.allclose(joint, separate, atol=1e-4)  # batch norm: labeled alone vs with the unlabeled images
    low, high = torch.minimum(joint, separate), torch.maximum(joint, separate)
    assert bool(((mixed >= low - 1e-5) & (mixed <= high + 1e-5)).all())
    assert not torch.allclose(mixed, joint) and not torch.allclose(mixed, separate)
    assert out["supervised_loss"].item() == pytest.approx(F.cross_entropy(mixed, batch.y).item(), rel=1e-5)
    labeled_probs = torch.softmax(mixed.detach(), dim=1)
    cut = 0.9 * labeled_probs.max(dim=1).values.mean().item()  # the relative threshold of this step
    assert method.policy.thresholds()[0].item() == pytest.approx(cut, rel=1e-5)
    assert torch.allclose(method.alignment.p_target, labeled_probs.mean(0), atol=1e-6)  # ema_p 0: this batch
    out["loss"].backward()
    assert method.net.backbone.features[0].weight.grad.abs().sum() > 0
    calls.clear()
    adamatch(logit_interpolation=False).training_step(batch, Progress(0, 10, 0, 10))
    assert calls == []


def record_strong_views(method) -> list:
    """Keep every strong view (N, C, H, W) method.strong_view makes, in call order (a forward hook)."""
    made = []
    method.strong_view.register_forward_hook(lambda module, inputs, output: made.append(output.detach().clone()))
    return made


def test_adamatch_loss_is_ce_weak_plus_ce_strong_on_labeled_plus_the_unlabeled_term():
    """A per-sample net (no batch norm), no interpolation, ema_p 0, no warm-up: the loss recomputed by hand."""
    torch.manual_seed(0)
    cfg = config(tiny_stage("a", "adamatch", data=FIXED_VIEWS, mu=2, ema_p=0.0, logit_interpolation=False,
                            unsup_warmup=0.0, lambda_u=1.5, threshold=1.0))
    method = AdaMatch(cfg, SmallCNN(1, width=4, norm="none"), INFO, num_unlabeled=16)
    strong = record_strong_views(method)
    batch = semi_batch()
    out = method.training_step(batch, Progress(0, 10, 0, 10))
    x_strong, u_strong = strong  # the labeled images' strong view is made first
    with torch.no_grad():
        x_weak, u_weak = method.weak_view(batch.x), method.weak_view(batch.u)
        logits_xw, logits_xs = method.net(x_weak), method.net(x_strong)
        logits_uw, logits_us = method.net(u_weak), method.net(u_strong)
        ce_weak, ce_strong = F.cross_entropy(logits_xw, batch.y), F.cross_entropy(logits_xs, batch.y)
        p_x, p_u = torch.softmax(logits_xw, 1), torch.softmax(logits_uw, 1)
        aligned = p_u * p_x.mean(0) / p_u.mean(0)
        aligned = aligned / aligned.sum(1, keepdim=True)
        cut = 1.0 * p_x.max(1).values.mean()
        mask = (aligned.max(1).values >= cut).float()
        per_sample = F.cross_entropy(logits_us, aligned.argmax(1), reduction="none")
        unlabeled = (per_sample * mask).sum() / len(mask)
    assert 0 < mask.sum() < len(mask)  # the threshold separates some samples: the mask matters
    assert out["supervised_loss"].item() == pytest.approx((ce_weak + ce_strong).item(), rel=1e-5)
    assert out["unsupervised_loss"].item() == pytest.approx(unlabeled.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((ce_weak + ce_strong + 1.5 * unlabeled).item(), rel=1e-5)
    assert method.policy.thresholds()[0].item() == pytest.approx(cut.item(), rel=1e-5)  # weak view only


def test_adamatch_interpolates_both_labeled_views_with_a_labeled_only_pass(monkeypatch):
    import ssl_kit.methods.adamatch as module

    torch.manual_seed(0)
    method = adamatch(ema_p=0.0)  # labeled_strong by default; SmallCNN with batch norm
    strong = record_strong_views(method)
    calls = []

    def record(joint, separate, generator=None):
        calls.append((joint.detach().clone(), separate.detach().clone(), module_rli(joint, separate, generator)))
        return calls[-1][2]

    module_rli = module.random_logit_interpolation
    monkeypatch.setattr(module, "random_logit_interpolation", record)
    batch = semi_batch()
    out = method.training_step(batch, Progress(0, 10, 0, 10))
    (joint, separate, mixed), = calls
    n = batch.y.shape[0]
    assert joint.shape == separate.shape == (2 * n, 10)
    with torch.no_grad():  # the labeled-only pass sees the weak and the strong labeled views together
        expected = method.net(torch.cat([method.weak_view(batch.x), strong[0]]))
    assert torch.allclose(separate, expected, atol=1e-5)
    ce = F.cross_entropy(mixed[:n], batch.y) + F.cross_entropy(mixed[n:], batch.y)
    assert out["supervised_loss"].item() == pytest.approx(ce.item(), rel=1e-5)
    weak_probs = torch.softmax(mixed[:n].detach(), dim=1)
    assert method.policy.thresholds()[0].item() == pytest.approx(0.9 * weak_probs.max(1).values.mean().item(), rel=1e-5)
    assert torch.allclose(method.alignment.p_target, weak_probs.mean(0), atol=1e-6)


def test_adamatch_unlabeled_weight_warms_up_along_half_a_cosine():
    method = adamatch(lambda_u=2.0)
    weights = [method.unsup_weight(Progress(step, 100, 0, 10)) for step in (0, 25, 50, 90)]
    assert weights == pytest.approx([0.0, 1.0, 2.0, 2.0])
    assert adamatch(unsup_warmup=0.0).unsup_weight(Progress(0, 100, 0, 10)) == 1.0


def test_adamatch_config_errors():
    with pytest.raises(ConfigError, match="threshold_policy.distribution_alignment: AdaMatch aligns"):
        config(tiny_stage("a", "adamatch", threshold_policy={"distribution_alignment": True}))
    with pytest.raises(ConfigError, match=r"stages\[a\].ema_p"):
        config(tiny_stage("a", "adamatch", ema_p=1.0))


def teacher_record(width: int, size: int = 16, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = Classifier(SmallCNN(1, width=width), 10)
    return {"arch": "small_cnn", "kwargs": {"width": width}, "state_dict": net.backbone.state_dict(),
            "data": {"image_size": size, "channels": 1, "mean": [0.5], "std": [0.25]},
            "head": {"num_classes": 10, "state_dict": net.head.state_dict()}}


def distiller(method: str, records: list[dict], **overrides):
    if len(records) == 1 and "teachers" not in overrides:
        overrides["teacher"] = {"checkpoint": "teacher.pt"}
    cfg = config(tiny_stage("d", method, data=FIXED_VIEWS, **overrides))
    cls = DecoupledKD if method == "dkd" else KnowledgeDistillation
    torch.manual_seed(1)
    return cls(cfg, SmallCNN(1, width=4), INFO, teacher_records=records)


def test_dkd_step_is_ce_plus_warmed_up_dkd_and_differs_from_kd_on_the_same_logits():
    record = teacher_record(8)
    dkd = distiller("dkd", [record], alpha=1.0, beta=8.0, kd_temperature=4.0, warmup_epochs=2.0)
    kd = distiller("kd", [record], alpha=0.9)
    kd.net.load_state_dict(dkd.net.state_dict())
    batch = semi_batch()
    progress = Progress(10, 100, 1, 10)  # one epoch of a two-epoch warm-up: DKD weight 0.5
    out_dkd, out_kd = dkd.training_step(batch, progress), kd.training_step(batch, progress)
    student = dkd.net(dkd.normalize(batch.x.float() / 255)).float()
    teacher = dkd.teacher(batch.x.float() / 255)
    term = dkd_loss(student, teacher, batch.y, 1.0, 8.0, 4.0)
    ce = F.cross_entropy(student, batch.y)
    assert out_dkd["kd_loss"].item() == pytest.approx(term.item(), rel=1e-4)
    assert out_dkd["loss"].item() == pytest.approx((ce + 0.5 * term).item(), rel=1e-4)
    assert out_kd["kd_loss"].item() == pytest.approx(kd_loss(student, teacher, 4.0).item(), rel=1e-4)
    assert out_kd["loss"].item() == pytest.approx((0.1 * ce + 0.9 * kd_loss(student, teacher)).item(), rel=1e-4)
    assert abs(out_dkd["kd_loss"].item() - out_kd["kd_loss"].item()) > 1e-3
    assert all(p.grad is None for p in dkd.teacher.parameters())


def test_multi_teacher_soft_targets_average_two_different_teachers():
    wide, small = teacher_record(8, seed=1), teacher_record(4, size=12, seed=2)  # another width and input size
    teachers = [{"checkpoint": "a.pt"}, {"checkpoint": "b.pt", "weight": 0.3}]
    method = distiller("kd", [wide, small], teachers=teachers)
    batch = semi_batch()
    out = method.training_step(batch, Progress(0, 10, 0, 10))
    unit = batch.x.float() / 255
    student = method.net(method.normalize(unit)).float()
    logits = [teacher(unit) for teacher in method.teachers]
    assert method.teachers[1].size == 12 and not torch.allclose(logits[0], logits[1])
    expected = multi_teacher_kd_loss(student, logits, [1.0, 0.3], 4.0)
    assert out["kd_loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    for alone in logits:
        assert abs(out["kd_loss"].item() - kd_loss(student, alone).item()) > 1e-3
    dkd = distiller("dkd", [wide, small], teachers=teachers, warmup_epochs=0)
    dkd.net.load_state_dict(method.net.state_dict())
    mixed = (dkd_loss(student, logits[0], batch.y) + 0.3 * dkd_loss(student, logits[1], batch.y)) / 1.3
    assert dkd.training_step(batch, Progress(0, 10, 0, 10))["kd_loss"].item() == pytest.approx(mixed.item(), rel=1e-4)


def test_multi_teacher_config_names_every_teacher_stage():
    teachers = [{"from_stage": "t1"}, {"from_stage": "nope"}]
    t1 = tiny_stage("t1")
    with pytest.raises(ConfigError, match="takes its teachers\\[1\\] from 'nope'"):
        validate_recipe({"seed": 0, "stages": [t1, tiny_stage("s", "kd", teachers=teachers)]})
    stage = validate_recipe({"seed": 0, "stages": [t1, tiny_stage("s", "dkd", teachers=teachers[:1])]}).stages[1]
    assert stage.stage_references() == {"backbone": None, "teachers[0]": "t1"}
    with pytest.raises(ConfigError, match="give either teacher or teachers, not both"):
        config(tiny_stage("s", "kd", teacher={"from_stage": "a"}, teachers=[{"from_stage": "a"}]))
    with pytest.raises(ConfigError, match=r"teachers\[0\]: give exactly one of checkpoint or from_stage"):
        config(tiny_stage("s", "kd", teachers=[{"weight": 1.0}]))
    with pytest.raises(ConfigError, match="the weights must not all be 0"):
        config(tiny_stage("s", "kd", teachers=[{"from_stage": "a", "weight": 0}]))


def test_hint_regressor_shapes_and_gradient_reaches_the_student_layer():
    hint = {"student_layer": "features.2", "teacher_layer": "features.12", "weight": 1.0}
    method = distiller("kd", [teacher_record(8)], hint=hint)
    conv, norm = method.regressor.net  # student (4, 16, 16) -> teacher (16, 8, 8): 1×1 conv 4→16 + BN, resized
    assert tuple(conv.weight.shape) == (16, 4, 1, 1) and norm.num_features == 16
    unit = semi_batch().x.float() / 255
    _, _, loss = method._forward(unit, None)
    loss.backward()
    backbone = method.net.backbone
    assert backbone.features[0].weight.grad.abs().sum() > 0  # below the hint layer
    assert backbone.features[3].weight.grad is None and method.net.head.weight.grad is None  # above it: no hint grad
    assert conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.teacher.parameters())
    out = method.training_step(semi_batch(), Progress(0, 10, 0, 10))
    assert out["hint_loss"] > 0 and torch.isfinite(out["loss"])
    assert isinstance(build_regressor(torch.Size([8]), torch.Size([32]), "x"), torch.nn.Linear)


def test_hint_layer_errors_list_the_available_layers():
    with pytest.raises(ConfigError, match=r"stages\[d\].hint.student_layer: no module 'features.99' in the "
                                          r"SmallCNN backbone \(available: features, features.0, features.1"):
        distiller("kd", [teacher_record(8)], hint={"student_layer": "features.99", "teacher_layer": "features.2"})
    with pytest.raises(ConfigError, match=r"hint.teacher_layer: no module 'layer9' in the small_cnn backbone"):
        distiller("kd", [teacher_record(8)], hint={"student_layer": "features.2", "teacher_layer": "layer9"})
    with pytest.raises(ConfigError, match="cannot be combined with cache_teacher_logits"):
        config(tiny_stage("d", "kd", teacher={"checkpoint": "t.pt"}, cache_teacher_logits=True,
                          hint={"student_layer": "features.2", "teacher_layer": "features.2"}))
    with pytest.raises(ConfigError, match="hint.teacher_index 1 is out of range"):
        config(tiny_stage("d", "kd", teacher={"checkpoint": "t.pt"},
                          hint={"student_layer": "a", "teacher_layer": "b", "teacher_index": 1}))
