"""BYOL, SimSiam, Barlow Twins, VICReg: each trains on digits through run_recipe; the BYOL target follows the online
network by EMA; SimSiam stops the gradient at the projections; Barlow/VICReg compute the library's losses on their
projections; the collapse watch logs and warns; bad config values are named by key path."""
import contextlib
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.pipeline import DataInfo
from ssl_kit.engine.checkpoint import safe_load
from ssl_kit.errors import ConfigError
from ssl_kit.losses import barlow_twins_loss, byol_loss, vicreg_loss
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.methods.collapse import EmbeddingStdWatch
from ssl_kit.models.cnn import SmallCNN
from ssl_kit.runner import run_recipe
from tests.conftest import tiny_stage
from tests.test_engine import Crash, step_losses

INFO = DataInfo(10, [str(i) for i in range(10)], 1, 16, [0.5], [0.25], "digits")
METHODS = ["byol", "simsiam", "barlow_twins", "vicreg"]
SMALL = {"byol": dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16, momentum=0.9),
         "simsiam": dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=4),
         "barlow_twins": dict(proj_hidden_dim=16, proj_dim=8, lambda_offdiag=5e-3, scale_loss=0.1),
         "vicreg": dict(proj_hidden_dim=16, proj_dim=8, sim_weight=25.0, var_weight=25.0, cov_weight=1.0)}


def config(method, **overrides):
    stage = tiny_stage("p", method, **{**SMALL[method], **overrides})
    return validate_recipe({"seed": 0, "stages": [stage]}).stages[0]


def build(method, **overrides):
    torch.manual_seed(0)
    return build_method(method)(config(method, **overrides), SmallCNN(1, width=4), INFO)


def views(n=8):
    torch.manual_seed(1)
    return torch.randn(n, 1, 16, 16), torch.randn(n, 1, 16, 16)


@pytest.mark.parametrize("method", METHODS)
def test_trains_on_digits_with_probe_and_embedding_std(method, tmp_path):
    stage = tiny_stage("pretrain", method, **SMALL[method], train={"steps": 6, "batch_size": 32})
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": method, "stages": [stage]}), tmp_path / "run")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    assert len(steps) == 6 and all(math.isfinite(r["loss"]) and math.isfinite(r["probe_loss"]) for r in steps)
    assert all(r["probe_loss"] > 0 for r in steps)  # the online probe trains beside the pretext loss
    epoch = [r for r in records if r.get("kind") == "epoch"][-1]
    assert 0 < epoch[f"{method}/embedding_std"] <= 1 and 0 <= epoch["online_probe/train_top1"] <= 1
    assert 0 <= summary["pretrain/test/top1"] <= 1
    assert (run_dir / "backbone.pt").is_file()


def test_byol_target_is_an_ema_of_the_online_network_after_a_step():
    method = build("byol", momentum=0.9)
    x1, x2 = views()
    loss, _ = method.contrast(x1, x2, Progress(0, 10, 0, 10))
    loss.backward()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(p.grad is None for p in method.target_projector.parameters())
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    optimizer.step()
    before = [t.clone() for t in method.target_backbone.parameters()]
    online = [p.detach().clone() for p in method.backbone.parameters()]
    assert any(not torch.equal(t, o) for t, o in zip(before, online))  # the step moved the online network
    method.after_optimizer_step(Progress(0, 10, 0, 10))
    assert method.current_momentum == pytest.approx(0.9)
    for target, old, new in zip(method.target_backbone.parameters(), before, online):
        torch.testing.assert_close(target, 0.9 * old + 0.1 * new)
    for t_buffer, buffer in zip(method.target_backbone.buffers(), method.backbone.buffers()):
        assert torch.equal(t_buffer, buffer)  # BN statistics copied
    method.after_optimizer_step(Progress(5, 10, 0, 10))
    assert method.current_momentum == pytest.approx(0.95)  # half-way along the cosine from 0.9 to 1


def test_byol_loss_is_the_papers_sum_over_both_view_orders():
    method = build("byol")
    x1, x2 = views()
    loss, features = method.contrast(x1, x2, Progress(0, 10, 0, 10))
    with torch.no_grad():
        z = method.projector(method.backbone(torch.cat([x1, x2])))
        p1, p2 = method.predictor(z).chunk(2)
        t1, t2 = method.target_projector(method.target_backbone(torch.cat([x1, x2]))).chunk(2)
        cos = lambda a, b: F.cosine_similarity(a, b, dim=1).mean()  # noqa: E731
        expected = (2 - 2 * cos(p1, t2)) + (2 - 2 * cos(p2, t1))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), byol_loss(p1, t2) + byol_loss(p2, t1))
    assert features.shape == (16, method.backbone.num_features)


def _projector_grads(method, loss):
    method.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in method.projector.parameters() if p.grad is not None]


def test_simsiam_stops_the_gradient_at_the_projections():
    method = build("simsiam")
    x1, x2 = views()
    loss, _ = method.contrast(x1, x2, Progress(0, 10, 0, 10))
    ours = _projector_grads(method, loss)

    def manual(stop: bool):
        z = method.projector(method.backbone(torch.cat([x1, x2])))
        p1, p2 = method.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        if stop:
            z1, z2 = z1.detach(), z2.detach()
        return -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())

    value = manual(True)
    torch.testing.assert_close(loss.detach(), value.detach(), rtol=1e-5, atol=1e-6)
    assert -1 <= loss.item() <= 1
    detached = _projector_grads(method, value)
    through = _projector_grads(method, manual(False))
    for a, b in zip(ours, detached):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(ours, through))


def simsiam_recipe(fixed: bool = True, warmup_epochs: float = 0, **train):
    """Tiny SimSiam on digits: 4 SGD steps (lr 0.05, batch 16) on a cosine schedule with the given warmup."""
    stage = tiny_stage("p", "simsiam", **SMALL["simsiam"], fixed_predictor_lr=fixed,
                       schedule={"name": "cosine", "warmup_epochs": warmup_epochs},
                       train={"steps": 4, "batch_size": 16, **train})
    return validate_recipe({"seed": 0, "stages": [stage]})


def group_lrs(run_dir) -> dict[str, float]:
    """name -> lr of every optimizer param group in the run's last checkpoint."""
    state = safe_load(run_dir / "checkpoints" / "last.pt")
    return {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}


def test_simsiam_predictor_is_its_own_fixed_lr_group_only_when_asked():
    method = build("simsiam")
    groups = {g.name: g for g in method.parameter_groups()}
    assert set(groups) == {"backbone", "projector", "probe", "predictor"}
    assert groups["predictor"].fixed_lr and not any(groups[n].fixed_lr for n in ("backbone", "projector", "probe"))
    predictor = {id(p) for p in method.predictor.parameters()}
    assert {id(p) for p in groups["predictor"].params} == predictor
    assert not predictor & {id(p) for p in groups["projector"].params}
    off = {g.name: g for g in build("simsiam", fixed_predictor_lr=False).parameter_groups()}
    assert set(off) == {"backbone", "projector", "probe"} and not any(g.fixed_lr for g in off.values())


@pytest.mark.parametrize("fixed", [True, False])
def test_simsiam_predictor_lr_stays_at_base_while_the_backbone_decays(tmp_path, fixed):
    run_dir, _ = run_recipe(simsiam_recipe(fixed), tmp_path / "run")
    lrs = group_lrs(run_dir)
    decayed = 0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 4))  # the lr of the last step (3 of 4): 0.0073223
    assert lrs["backbone"] == pytest.approx(decayed, rel=1e-9) and lrs["projector"] == pytest.approx(decayed)
    if fixed:
        assert lrs["predictor"] == lrs["predictor/no_decay"] == 0.05
    else:
        assert not any(name.startswith("predictor") for name in lrs)


def test_simsiam_resume_inside_warmup_reproduces_the_uninterrupted_run(tmp_path):
    """Warmup then cosine (the predictor skips both); checkpoint at step 2, crash at 3, resume: same losses, lrs."""
    recipe = simsiam_recipe(warmup_epochs=0.05, steps=6, checkpoint_every_steps=2)

    def crash_at_3(step):
        if step == 3:
            raise Crash()

    reference, _ = run_recipe(recipe, tmp_path / "a")
    with pytest.raises(Crash):
        run_recipe(recipe, tmp_path / "b", step_callback=crash_at_3)
    assert safe_load(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 2
    resumed, _ = run_recipe(recipe, tmp_path / "b", resume=True)
    assert step_losses(resumed) == step_losses(reference)
    for run_dir in (reference, resumed):  # backbone lr: 4 warmup steps (0.05 epochs), then cosine over 2
        logged = [r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if r.get("kind") == "step"]
        assert logged == pytest.approx([0.0, 0.0125, 0.025, 0.0375, 0.05, 0.025])
    lrs = group_lrs(reference)
    assert group_lrs(resumed) == lrs and lrs["predictor"] == 0.05 and lrs["backbone"] < 0.05


@pytest.mark.parametrize("method", ["barlow_twins", "vicreg"])
def test_barlow_and_vicreg_apply_the_library_loss_to_their_projections(method):
    model = build(method)
    x1, x2 = views()
    loss, _ = model.contrast(x1, x2, Progress(0, 10, 0, 10))
    with torch.no_grad():
        z1, z2 = model.projector(model.backbone(torch.cat([x1, x2]))).chunk(2)
    if method == "barlow_twins":
        expected = 0.1 * barlow_twins_loss(z1, z2, 5e-3)
    else:
        expected = vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_barlow_scale_and_lambda_change_the_loss():
    x1, x2 = views()
    progress = Progress(0, 10, 0, 10)
    base = build("barlow_twins", scale_loss=1.0).contrast(x1, x2, progress)[0].item()
    assert build("barlow_twins", scale_loss=0.5).contrast(x1, x2, progress)[0].item() == pytest.approx(0.5 * base,
                                                                                                         rel=1e-5)
    assert build("barlow_twins", scale_loss=1.0, lambda_offdiag=0.5).contrast(x1, x2, progress)[0].item() > base


def test_embedding_std_watch_logs_and_warns_once_on_collapse():
    torch.manual_seed(0)
    healthy = EmbeddingStdWatch("byol")
    healthy.update(torch.randn(512, 64))
    with _no_warning():
        metrics = healthy.epoch_metrics()
    assert metrics["byol/embedding_std"] == pytest.approx(1 / 8, rel=0.05)  # ≈ 1/√D spread on the sphere
    collapsed = EmbeddingStdWatch("vicreg")
    collapsed.update(torch.ones(32, 64) + 1e-4 * torch.randn(32, 64))
    with pytest.warns(UserWarning, match=r"vicreg: embedding std .* collapsed"):
        metrics = collapsed.epoch_metrics()
    assert metrics["vicreg/embedding_std"] < 1e-3
    collapsed.update(torch.ones(32, 64))
    with _no_warning():
        collapsed.epoch_metrics()  # once only
    assert collapsed.epoch_metrics() == {}  # nothing seen since the reset


@contextlib.contextmanager
def _no_warning():
    """Any warning inside the block fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_method_epoch_metrics_carry_the_embedding_std():
    method = build("simsiam")
    x1, x2 = views()
    method.contrast(x1, x2, Progress(0, 10, 0, 10))
    metrics = method.epoch_metrics()
    assert 0 < metrics["simsiam/embedding_std"] <= 1
    assert "byol/momentum" in build("byol").epoch_metrics()


@pytest.mark.parametrize("method, key, value, message", [
    ("byol", "momentum", 1.5, r"stages\[p\]\.momentum: .*less than or equal to 1"),
    ("byol", "pred_hidden_dim", 0, r"stages\[p\]\.pred_hidden_dim: .*greater than or equal to 1"),
    ("simsiam", "temperature", 0.1, r"stages\[p\]\.temperature: Extra inputs are not permitted"),
    ("simsiam", "fixed_predictor_lr", "sometimes", r"stages\[p\]\.fixed_predictor_lr: .*valid boolean"),
    ("barlow_twins", "lambda_offdiag", -1.0, r"stages\[p\]\.lambda_offdiag: .*greater than or equal to 0"),
    ("barlow_twins", "scale_loss", 0.0, r"stages\[p\]\.scale_loss: .*greater than 0"),
    ("vicreg", "var_weight", "much", r"stages\[p\]\.var_weight: .*number"),
    ("vicreg", "eps", 0.0, r"stages\[p\]\.eps: .*greater than 0"),
])
def test_bad_config_values_are_named_by_key_path(method, key, value, message):
    with pytest.raises(ConfigError, match=message):
        config(method, **{key: value})
