"""KD and DINO machinery: centre update, teacher temperature and momentum schedules, a KD run that helps."""
import json
import math

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.data.pipeline import DataInfo
from ssl_kit.errors import ConfigError
from ssl_kit.methods.base import Progress
from ssl_kit.methods.dino import DINO, DINOHead
from ssl_kit.models.cnn import SmallCNN
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage

INFO = DataInfo(10, [str(i) for i in range(10)], 1, 16, [0.5], [0.25], "digits")


def dino(**overrides):
    stage = tiny_stage("p", "dino", out_dim=8, head_hidden_dim=16, bottleneck_dim=4, local_crops=2,
                       center_momentum=0.9, momentum=0.996, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=2, **overrides)
    cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
    return DINO(cfg, SmallCNN(1, width=4), INFO)


def test_center_update_is_an_ema_of_the_batch_mean():
    method = dino()
    logits = torch.tensor([[1.0] * 8, [3.0] * 8])
    method._update_center(logits)
    assert torch.allclose(method.center, torch.full((1, 8), 0.1 * 2.0))
    method._update_center(logits)
    assert torch.allclose(method.center, torch.full((1, 8), 0.9 * 0.2 + 0.1 * 2.0))


def test_teacher_temperature_warmup_and_momentum_schedule():
    method = dino()
    assert method.teacher_temperature(Progress(0, 100, 0, 10)) == pytest.approx(0.04)
    assert method.teacher_temperature(Progress(10, 100, 1, 10)) == pytest.approx(0.055)
    assert method.teacher_temperature(Progress(50, 100, 5, 10)) == pytest.approx(0.07)
    method.after_optimizer_step(Progress(0, 100, 0, 10))
    assert method.current_momentum == pytest.approx(0.996)
    method.after_optimizer_step(Progress(50, 100, 5, 10))
    assert method.current_momentum == pytest.approx(0.998)
    method.after_optimizer_step(Progress(100, 100, 10, 10))
    assert method.current_momentum == pytest.approx(1.0)


def test_dino_head_last_layer_weight_norm_is_frozen_at_one():
    head = DINOHead(6, 5, 8, 4, norm_last_layer=True)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.allclose(magnitude, torch.ones_like(magnitude))
    rows = head.last_layer.weight.norm(dim=1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_dino_step_logs_collapse_statistics_and_freezes_last_layer():
    from ssl_kit.data.loader import Batch

    method = dino(freeze_last_layer_epochs=1)
    batch = Batch(torch.randint(0, 255, (8, 1, 16, 16), dtype=torch.uint8), torch.arange(8) % 10)
    out = method.training_step(batch, Progress(0, 100, 0, 10))
    out["loss"].backward()
    direction = method.head_net.last_layer.parametrizations.weight.original1
    assert direction.grad is None  # frozen during the first epoch
    assert 0 <= out["dino/teacher_entropy"].item() <= math.log(8) + 1e-5
    assert out["dino/kl_teacher_student"].item() >= -1e-5
    assert all(p.grad is None for p in method.teacher_backbone.parameters())
    method.training_step(batch, Progress(20, 100, 2, 10))["loss"].backward()
    assert direction.grad is not None


def test_dino_warns_when_loss_sits_at_ln_k():
    method = dino()
    with pytest.warns(UserWarning, match="collapsed"):
        method.warn_if_collapsed(math.log(8))


def kd_stages(steps=200):
    common = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 10},
                  optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
                  train={"steps": steps, "batch_size": 40, "log_every": 50, "checkpoint_every_steps": 1000})
    teacher = tiny_stage("teacher", "supervised", **{**common, "data": {"dataset": "digits", "image_size": 16}},
                         backbone={"name": "small_cnn", "kwargs": {"width": 16}})
    student = {"backbone": {"name": "small_cnn", "kwargs": {"width": 4}}, **common}
    return [teacher,
            tiny_stage("student_labels", "supervised", **student),
            tiny_stage("student_kd_unlabeled", "kd", teacher={"from_stage": "teacher"}, use_unlabeled=True, mu=3,
                       **student)]


@pytest.mark.slow
def test_kd_student_with_unlabeled_data_beats_student_from_labels(tmp_path):
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "kd", "stages": kd_stages()}), tmp_path / "run")
    assert summary["teacher/test/top1"] > 0.9
    assert summary["student_kd_unlabeled/test/top1"] > summary["student_labels/test/top1"] + 0.02, summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_unlabeled_loss" in r for r in records if r.get("stage") == "student_kd_unlabeled")


def test_kd_teacher_must_be_given_once():
    with pytest.raises(ConfigError, match="exactly one of teacher.checkpoint or teacher.from_stage"):
        validate_recipe({"seed": 0, "stages": [tiny_stage("s", "kd")]})
    with pytest.raises(ConfigError, match="takes its teacher from 'nope'"):
        validate_recipe({"seed": 0, "stages": [tiny_stage("s", "kd", teacher={"from_stage": "nope"})]})


def test_kd_teacher_without_head_is_refused(tmp_path):
    simclr = tiny_stage("pre", "simclr", online_probe={"enabled": True}, train={"steps": 2, "batch_size": 32})
    run_dir, _ = run_recipe(validate_recipe({"seed": 0, "name": "p", "stages": [simclr]}), tmp_path / "pre")
    record = torch.load(run_dir / "backbone.pt", weights_only=True)
    del record["head"]
    torch.save(record, tmp_path / "headless.pt")
    stage = tiny_stage("s", "kd", teacher={"checkpoint": str(tmp_path / "headless.pt")})
    with pytest.raises(ConfigError, match="teacher checkpoint has no classification head"):
        run_recipe(validate_recipe({"seed": 0, "name": "k", "stages": [stage]}), tmp_path / "kd")


def test_dino_with_a_vit_handles_local_crops_of_another_size():
    from ssl_kit.data.loader import Batch
    from ssl_kit.models.vit import VisionTransformer, sincos_pos_embed

    stage = tiny_stage("p", "dino", out_dim=8, head_hidden_dim=16, bottleneck_dim=4, local_crops=2, local_crop_size=0.5)
    cfg = validate_recipe({"seed": 0, "stages": [stage]}).stages[0]
    vit = VisionTransformer(image_size=16, patch_size=4, in_channels=1, dim=32, depth=1, heads=2)
    method = DINO(cfg, vit, INFO)
    batch = Batch(torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8), torch.arange(4))
    out = method.training_step(batch, Progress(0, 10, 0, 10))
    assert torch.isfinite(out["loss"])
    # the fixed 2-D sin-cos table: first half encodes the column, second half the row (MAE's layout)
    table = sincos_pos_embed(8, 2)
    omega = torch.tensor([1.0, 1.0 / 100.0])
    for index, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega),
                              torch.cos(row * omega)])
        assert torch.allclose(table[index], expected, atol=1e-6)
