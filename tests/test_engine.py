import json
import math

import pytest
import torch
from torch import nn

from ssl_kit.config import OptimizerConfig, ScheduleConfig
from ssl_kit.engine.checkpoint import atomic_save, safe_load
from ssl_kit.engine.ema import ModelEMA
from ssl_kit.methods.momentum import cosine_ramp, momentum_update
from ssl_kit.engine.optim import LARS, build_optimizer
from ssl_kit.methods.param_groups import ParamGroup
from ssl_kit.engine.schedule import LrSchedule
from ssl_kit.errors import CheckpointError, TrainingError
from ssl_kit.models.cnn import SmallCNN
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage


def step_losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "step"]


def test_tiny_run_loss_decreases(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tiny_stage(train={"steps": 40}))
    run_dir, summary = run_recipe(recipe, tmp_path / "run")
    losses = step_losses(run_dir)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    assert summary["supervised/test/top1"] > 0.5
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "backbone.pt", "report.md"):
        assert (run_dir / name).is_file(), name


class Crash(Exception):
    pass


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tiny_stage(train={"steps": 20, "checkpoint_every_steps": 5}))
    _, reference = run_recipe(recipe, tmp_path / "a")

    def crash_at_12(step):
        if step == 12:
            raise Crash()

    with pytest.raises(Crash):
        run_recipe(recipe, tmp_path / "b", step_callback=crash_at_12)
    assert safe_load(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 10
    _, resumed = run_recipe(recipe, tmp_path / "b", resume=True)
    drop = ("supervised/train_seconds", "supervised/images_per_s")
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in reference.items() if k not in drop}
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_recipe):
    from ssl_kit.errors import ConfigError

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="exists and is not empty: pass --resume"):
        run_recipe(tiny_recipe(), tmp_path / "run")
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep"


def test_a_run_dir_whose_run_failed_before_its_first_step_is_reused(tmp_path, tiny_recipe):
    """Fixing the recipe and running the same command again works: a run that stopped before its first step (here a
    data spec without its root) leaves only config.yaml, env.json, an empty metrics.jsonl and the lock; anything more
    (a metrics line, a file of the user's) is still refused and kept."""
    from ssl_kit.errors import ConfigError, DataError
    from tests.conftest import tiny_stage

    out = tmp_path / "run"
    broken = tiny_recipe(tiny_stage(data={"dataset": "images", "root": None}))
    with pytest.raises(DataError, match=r"^stages\[supervised\]\.data: dataset spec 'images': images needs a root"):
        run_recipe(broken, out)
    assert {p.name for p in out.iterdir()} <= {"config.yaml", "env.json", "metrics.jsonl", ".ssl-kit.lock"}
    assert "dataset: images" in (out / "config.yaml").read_text()
    _, summary = run_recipe(tiny_recipe(), out)
    assert "dataset: digits" in (out / "config.yaml").read_text() and "supervised/test/top1" in summary

    again = tmp_path / "again"
    with pytest.raises(DataError):
        run_recipe(broken, again)
    (again / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="exists and is not empty"):
        run_recipe(tiny_recipe(), again)
    assert (again / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_an_evaluation_stage_data_error_names_the_stage(tmp_path):
    """A recipe's evaluation stage with a broken spec says which stage (the text names the spec); the type stays."""
    from ssl_kit.config import validate_recipe
    from ssl_kit.engine.checkpoint import atomic_save, backbone_record
    from ssl_kit.errors import DataError
    from ssl_kit.models.registry import build_backbone

    info = {"image_size": 16, "channels": 1, "mean": [0.5], "std": [0.25]}
    atomic_save(backbone_record("small_cnn", {"width": 4}, info, build_backbone("small_cnn", 1, 16, {"width": 4})),
                tmp_path / "backbone.pt")
    recipe = validate_recipe({"stages": [{"name": "probe", "method": "linear_probe", "device": "cpu",
                                          "checkpoint": str(tmp_path / "backbone.pt"), "data": "images"}]}, "test")
    with pytest.raises(DataError, match=r"^stages\[probe\]: dataset spec 'images': images needs a root"):
        run_recipe(recipe, tmp_path / "run")


def test_warmup_then_cosine_values():
    schedule = LrSchedule(ScheduleConfig(name="cosine", warmup_epochs=1), total_steps=110, steps_per_epoch=10)
    assert schedule.factor(0) == 0.0
    assert schedule.factor(5) == pytest.approx(0.5)
    assert schedule.factor(10) == pytest.approx(1.0)
    assert schedule.factor(60) == pytest.approx(0.5)  # half-way through the 100 cosine steps
    assert schedule.factor(110) == pytest.approx(0.0)


def test_other_schedules():
    fixmatch = LrSchedule(ScheduleConfig(name="fixmatch_cosine"), 160, 10)
    assert fixmatch.factor(160) == pytest.approx(math.cos(7 * math.pi / 16))
    multistep = LrSchedule(ScheduleConfig(name="multistep", milestones=[0.5, 0.75], gamma=0.1), 100, 10)
    assert [multistep.factor(s) for s in (49, 50, 75)] == pytest.approx([1.0, 0.1, 0.01])
    step = LrSchedule(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), 100, 10)
    assert [step.factor(s) for s in (19, 20, 40)] == pytest.approx([1.0, 0.5, 0.25])
    exponential = LrSchedule(ScheduleConfig(name="exponential", gamma=0.9), 100, 10)
    assert exponential.factor(20) == pytest.approx(0.81)
    assert cosine_ramp(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert cosine_ramp(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    assert cosine_ramp(0.996, 1.0, 100, 100) == pytest.approx(1.0)


def test_fixed_lr_group_keeps_its_base_lr_through_warmup_and_cosine():
    backbone, predictor = nn.Linear(4, 4), nn.Linear(4, 4)
    optimizer = build_optimizer([ParamGroup("backbone", list(backbone.parameters()), 0.5),
                                 ParamGroup("predictor", list(predictor.parameters()), 0.5, fixed_lr=True)],
                                OptimizerConfig(name="sgd", lr=0.2, weight_decay=1e-4), batch_size=256)
    assert {g["name"]: g["fixed_lr"] for g in optimizer.param_groups} == {
        "backbone": False, "backbone/no_decay": False, "predictor": True, "predictor/no_decay": True}
    schedule = LrSchedule(ScheduleConfig(name="cosine", warmup_epochs=1), total_steps=110, steps_per_epoch=10)
    # backbone base lr 0.1: warmup 0 → 0.05 at step 5; cosine over steps 10..110: 0.05 at 60, 0.1·(1 − √½)/2 at 85
    expected = {0: 0.0, 5: 0.05, 60: 0.05, 85: 0.05 * (1 - math.sqrt(0.5))}
    for step, backbone_lr in expected.items():
        schedule.apply(optimizer.param_groups, step)
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["backbone"] == lrs["backbone/no_decay"] == pytest.approx(backbone_lr, abs=1e-12), step
        assert lrs["predictor"] == lrs["predictor/no_decay"] == 0.1, step  # 0.2 × lr_scale 0.5, untouched


def test_weight_decay_end_is_a_cosine_over_the_run_on_decaying_groups_only():
    """DINO's cosine_scheduler(0.04, 0.4) over 100 steps, warm-up included: 0.04 at 0, 0.22 at 50, 0.4 − 0.36 · ½(1 +
    cos(π/4)) at 25, 0.4 at the end; bias/norm groups stay at 0; the lr schedule is unchanged by it; without
    weight_decay_end the decay stays; a checkpointed optimizer carries the start."""
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer([ParamGroup("backbone", list(net.parameters()))],
                                OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.04), batch_size=256)
    ramped = LrSchedule(ScheduleConfig(name="cosine", warmup_epochs=1, weight_decay_end=0.4), 100, 10)
    plain = LrSchedule(ScheduleConfig(name="cosine", warmup_epochs=1), 100, 10)
    expected = {0: 0.04, 25: 0.4 - 0.36 * 0.5 * (1 + math.cos(math.pi / 4)), 50: 0.22, 100: 0.4}
    for step, decay in expected.items():
        ramped.apply(optimizer.param_groups, step)
        groups = {g["name"]: g for g in optimizer.param_groups}
        assert groups["backbone"]["weight_decay"] == pytest.approx(decay, abs=1e-12), step
        assert groups["backbone/no_decay"]["weight_decay"] == 0.0
        assert groups["backbone"]["lr"] == pytest.approx(0.1 * plain.factor(step), abs=1e-12)
    state = optimizer.state_dict()
    assert [g["base_weight_decay"] for g in state["param_groups"]] == [0.04, None]
    plain.apply(optimizer.param_groups, 50)
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {"backbone": 0.04,
                                                                              "backbone/no_decay": 0.0}
    with pytest.raises(ValueError, match="weight_decay_end"):
        ScheduleConfig(weight_decay_end=-0.1)


def test_dino_family_defaults_ramp_the_weight_decay_as_their_references():
    from ssl_kit.config import validate_recipe

    ends = {"dino": 0.4, "ibot": 0.4, "dinov2": 0.4, "ijepa": 0.4, "msn": 0.4, "simclr": None}
    for method, end in ends.items():
        stage = validate_recipe({"stages": [{"name": "s", "method": method}]}).stages[0]
        assert stage.schedule.weight_decay_end == end, method
        if end is not None:
            assert stage.optimizer.weight_decay == 0.04 and "0.4" in stage.recommended_source, method
    # the end belongs to the recommended decay: a recipe's own optimizer or weight decay does not take it ...
    for optimizer in ({"name": "sgd"}, {"weight_decay": 1e-4}):
        stage = validate_recipe({"stages": [{"name": "s", "method": "dino", "optimizer": optimizer}]}).stages[0]
        assert stage.schedule.weight_decay_end is None, optimizer
    # ... unless the recipe sets it too; a recipe's own lr keeps the recommended ramp
    stage = validate_recipe({"stages": [{"name": "s", "method": "dino", "optimizer": {"weight_decay": 0.1},
                                         "schedule": {"weight_decay_end": 0.5}}]}).stages[0]
    assert (stage.optimizer.weight_decay, stage.schedule.weight_decay_end) == (0.1, 0.5)
    stage = validate_recipe({"stages": [{"name": "s", "method": "dino", "optimizer": {"lr": 1e-3}}]}).stages[0]
    assert stage.schedule.weight_decay_end == 0.4


def test_plateau_reduces_after_patience():
    schedule = LrSchedule(ScheduleConfig(name="plateau", plateau_patience=1, gamma=0.5), 100, 10)
    for loss in (1.0, 0.9, 0.95, 0.95):
        schedule.observe({"train/loss": loss})
    assert schedule.factor(50) == 0.5


def test_weight_decay_excluded_from_biases_and_norms_by_shape():
    model = SmallCNN(1, width=4, norm="batch")
    head = nn.Linear(16, 3)
    optimizer = build_optimizer([ParamGroup("backbone", list(model.parameters()), 0.1),
                                 ParamGroup("head", list(head.parameters()))],
                                OptimizerConfig(name="sgd", lr=1.0, weight_decay=0.01), batch_size=256)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert set(by_name) == {"backbone", "backbone/no_decay", "head", "head/no_decay"}
    assert all(p.ndim > 1 for p in by_name["backbone"]["params"]) and by_name["backbone"]["weight_decay"] == 0.01
    assert all(p.ndim == 1 for p in by_name["backbone/no_decay"]["params"])
    assert by_name["backbone/no_decay"]["weight_decay"] == 0.0
    assert by_name["backbone"]["base_lr"] == pytest.approx(0.1) and by_name["head"]["base_lr"] == 1.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters())) + 2


def test_lr_scaling_with_batch():
    cfg = OptimizerConfig(name="lars", lr=0.3, lr_scaling="linear")
    optimizer = build_optimizer([ParamGroup("all", [nn.Parameter(torch.ones(2, 2))])], cfg, batch_size=512)
    assert optimizer.param_groups[0]["base_lr"] == pytest.approx(0.6)


def test_lars_trust_ratio_step():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    w.grad = torch.tensor([[0.6, 0.8]])  # norm 1
    optimizer = LARS([{"params": [w], "lars": True}], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.02)
    optimizer.step()
    # update = lr * eta * |w| / |g| * g = 0.1 * g
    assert torch.allclose(w.detach(), torch.tensor([[3.0 - 0.06, 4.0 - 0.08]]))


def test_gradient_accumulation_equals_large_batch(tmp_path, tiny_recipe):
    def params_after(accumulate):
        stage = tiny_stage(train={"steps": 1, "batch_size": 32, "accumulate": accumulate},
                           backbone={"name": "small_cnn", "kwargs": {"width": 4, "norm": "none"}},
                           data={"dataset": "digits", "image_size": 16, "translate": 0.0})
        run_dir, _ = run_recipe(tiny_recipe(stage), tmp_path / f"acc{accumulate}")
        return safe_load(run_dir / "checkpoints" / "last.pt")["method"]

    single, accumulated = params_after(1), params_after(4)
    for key in single:
        assert torch.allclose(single[key], accumulated[key], atol=1e-6), key


def test_ema_math():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    target = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        target.weight.fill_(0.0)
    momentum_update(target, model, 0.99)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.03))


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, tiny_recipe, monkeypatch):
    from ssl_kit.methods.supervised import Supervised

    original = Supervised.training_step

    def poisoned(self, batch, progress):
        out = original(self, batch, progress)
        if progress.step == 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(Supervised, "training_step", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at step 7 .*last good checkpoint"):
        run_recipe(tiny_recipe(), tmp_path / "run")
    assert safe_load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 5


def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, path)

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left on device.*previous file is intact"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"format": "ssl_kit.backbone", "x": Evil()}, handle)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_load(path)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_rejected(tmp_path, tiny_recipe):
    from ssl_kit.engine.checkpoint import build_from_record, resolve_checkpoint

    run_dir, _ = run_recipe(tiny_recipe(tiny_stage(train={"steps": 2})), tmp_path / "run")
    record = resolve_checkpoint(run_dir)
    record["kwargs"] = {"width": 16}
    with pytest.raises(CheckpointError, match="weights do not fit backbone 'small_cnn'"):
        build_from_record(record)


def test_load_backbone_from_every_kind_of_path(tmp_path, tiny_recipe):
    import ssl_kit

    run_dir, _ = run_recipe(tiny_recipe(tiny_stage(train={"steps": 2})), tmp_path / "run")
    x = torch.rand(3, 1, 16, 16)
    outputs = []
    for path in (run_dir / "backbone.pt", run_dir, run_dir / "checkpoints" / "last.pt"):
        backbone = ssl_kit.load_backbone(path)
        assert backbone.data_info["image_size"] == 16 and backbone.data_info["channels"] == 1
        outputs.append(backbone(x))
    assert outputs[0].shape == (3, backbone.num_features)
    assert torch.allclose(outputs[0], outputs[1]) and torch.allclose(outputs[0], outputs[2])


def test_unknown_backbone_lists_known(tmp_path, tiny_recipe):
    from ssl_kit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown backbone 'resnet9'.*resnet18"):
        run_recipe(tiny_recipe(tiny_stage(backbone={"name": "resnet9"})), tmp_path / "run")


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet28_2", "vit_tiny", "small_cnn"])
def test_backbones_any_channels(name):
    from ssl_kit.models.registry import build_backbone

    kwargs = {"depth": 2} if name.startswith("vit") else {}
    for channels in (1, 3):
        net = build_backbone(name, channels, 32, kwargs)
        assert net(torch.rand(2, channels, 32, 32)).shape == (2, net.num_features)


def test_checkpoints_rotate_keep_last(tmp_path, tiny_recipe):
    recipe = tiny_recipe(tiny_stage(train={"steps": 20, "checkpoint_every_steps": 4, "keep_last": 3}))
    run_dir, _ = run_recipe(recipe, tmp_path / "run")
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.pt", "step-000000016.pt", "step-000000020.pt"]
    assert safe_load(run_dir / "checkpoints" / "step-000000016.pt")["step"] == 16
