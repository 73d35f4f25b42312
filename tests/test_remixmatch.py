"""ReMixMatch (Berthelot et al. 2020; USB `remixmatch`): distribution alignment, the sharpened guess and the three
cross-entropies equal the paper's formulas computed naively here (values and gradients); p_model is the mean of the
last da_len batch means, checkpointed; a random rotation is one of the four RotNet views; bad arguments and keys are
named; a step's total loss is its weighted terms and one optimiser step changes the parameters."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_semi_method, semi_batch, tiny_stage
from oracle import TOL, assert_same, randn, value_and_grads
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.losses.remixmatch import remixmatch_distribution_alignment, remixmatch_guess, remixmatch_loss
from ssl_kit.methods.base import Progress
from ssl_kit.methods.remixmatch import PredictionHistory, random_rotation

N, B, K = 5, 3, 4
SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 3, "batch_size": 8, "ema_decay": 0.9, "log_every": 1})


def _probs(*shape, seed, scale=2.0):
    return torch.softmax(randn(*shape, seed=seed) * scale, dim=1)


# ------------------------------------------------------------------------------------------------ naive formulas
def _naive_align(p, p_model, p_target):
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        row = [float(p[i, k]) * (float(p_target[k]) + 1e-6) / (float(p_model[k]) + 1e-6) for k in range(p.shape[1])]
        out[i] = torch.tensor([v / sum(row) for v in row])
    return out


def _naive_sharpen(p, t):
    out = torch.zeros_like(p)
    for i in range(p.shape[0]):
        row = [float(p[i, k]) ** (1 / t) for k in range(p.shape[1])]
        out[i] = torch.tensor([v / sum(row) for v in row])
    return out


def _naive_soft_ce(logits, targets):
    total = 0.0
    for i in range(logits.shape[0]):
        norm = sum(torch.exp(logits[i, k]) for k in range(logits.shape[1]))
        total = total - sum(targets[i, k] * torch.log(torch.exp(logits[i, k]) / norm) for k in range(logits.shape[1]))
    return total / logits.shape[0]


# ------------------------------------------------------------------------------------------------ losses
def test_distribution_alignment_and_guess_are_the_papers_formulas():
    p, p_model, p_target = _probs(N, K, seed=1), _probs(1, K, seed=2)[0], _probs(1, K, seed=3)[0]
    aligned = remixmatch_distribution_alignment(p, p_model, p_target)
    torch.testing.assert_close(aligned, _naive_align(p, p_model, p_target), **TOL)
    torch.testing.assert_close(aligned.sum(1), torch.ones(N), **TOL)
    guess = remixmatch_guess(p, p_model, p_target, 0.5)
    torch.testing.assert_close(guess, _naive_sharpen(_naive_align(p, p_model, p_target), 0.5), **TOL)
    uniform = torch.full((K,), 1 / K)
    torch.testing.assert_close(remixmatch_distribution_alignment(p, uniform, uniform), p, **TOL)  # p_model = target
    # hand-computed: p = (0.5, 0.5), p_model = (0.8, 0.2), p_target = (0.5, 0.5) -> ∝ (0.625, 2.5) = (0.2, 0.8)
    torch.testing.assert_close(remixmatch_distribution_alignment(torch.tensor([[0.5, 0.5]]), torch.tensor([0.8, 0.2]),
                                                                 torch.tensor([0.5, 0.5])),
                               torch.tensor([[0.2, 0.8]]), **TOL)
    assert not remixmatch_guess(p.requires_grad_(), p_model, p_target).requires_grad


def test_the_three_cross_entropies_values_and_grads():
    lx, lu, ls = randn(B, K, seed=4), randn(2 * N, K, seed=5), randn(N, K, seed=6)
    tx, tu, guess = _probs(B, K, seed=7), _probs(2 * N, K, seed=8), _probs(N, K, seed=9)
    for index in range(3):
        ours = value_and_grads(lambda a, b, c: remixmatch_loss(a, tx, b, tu, c, guess)[index]
                               + 0 * (a.sum() + b.sum() + c.sum()), lx, lu, ls)  # zero gradients where unused
        naive = [lambda a, b, c: _naive_soft_ce(a, tx) + 0 * (b.sum() + c.sum()),
                 lambda a, b, c: _naive_soft_ce(b, tu) + 0 * (a.sum() + c.sum()),
                 lambda a, b, c: _naive_soft_ce(c, guess) + 0 * (a.sum() + b.sum())][index]
        assert_same(ours, value_and_grads(naive, lx, lu, ls))
    guess.requires_grad_(True)
    remixmatch_loss(lx, tx, lu, tu, ls.requires_grad_(), guess)[2].backward()
    assert guess.grad is None  # the guess is a target


def test_bad_arguments_are_named():
    p, d = _probs(N, K, seed=1), _probs(1, K, seed=2)[0]
    lx, t = randn(B, K, seed=4), _probs(B, K, seed=7)
    cases = [
        (lambda: remixmatch_distribution_alignment(p, d[:2], d), "p_model"),
        (lambda: remixmatch_distribution_alignment(p, d, d[:2]), "p_target"),
        (lambda: remixmatch_distribution_alignment(p[0], d, d), "probs"),
        (lambda: remixmatch_guess(p, d, d, 0.0), "temperature"),
        (lambda: remixmatch_loss(lx, t[:2], lx, t, lx, t), "targets_x"),
        (lambda: remixmatch_loss(lx, t, lx[:, :2], t[:, :2], lx, t), "logits_u"),
        (lambda: remixmatch_loss(lx, t, lx, t, lx, t[:2]), "guess"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_prediction_history_is_the_mean_of_the_last_da_len_batch_means():
    history = PredictionHistory(torch.tensor([0.25, 0.75]), length=2)
    torch.testing.assert_close(history.p_model, torch.tensor([0.5, 0.5]))  # nothing recorded yet
    b1 = torch.tensor([[0.9, 0.1], [0.7, 0.3]])  # mean (0.8, 0.2)
    out = history(b1)  # the first batch is aligned by its own mean, as USB's first p_model
    torch.testing.assert_close(history.p_model, torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(out, _naive_align(b1, torch.tensor([0.8, 0.2]), torch.tensor([0.25, 0.75])), **TOL)
    history(torch.tensor([[0.4, 0.6]]))
    torch.testing.assert_close(history.p_model, torch.tensor([0.6, 0.4]))  # mean of (0.8, 0.2), (0.4, 0.6)
    history(torch.tensor([[0.2, 0.8]]))  # window of 2: (0.8, 0.2) drops out
    torch.testing.assert_close(history.p_model, torch.tensor([0.3, 0.7]))
    state = history.state_dict()
    assert set(state) == {"p_target", "history", "pointer", "filled"}
    restored = PredictionHistory(torch.tensor([0.5, 0.5]), length=2)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.p_model, history.p_model)
    torch.testing.assert_close(restored.p_target, torch.tensor([0.25, 0.75]))


def test_random_rotation_is_one_of_the_four_rotnet_views():
    images = randn(6, 2, 5, 5, seed=3)
    torch.manual_seed(0)
    rotated, labels = random_rotation(images)
    assert rotated.shape == images.shape and labels.shape == (6,) and int(labels.max()) <= 3
    for i in range(6):
        assert torch.equal(rotated[i], torch.rot90(images[i], int(labels[i]), dims=(1, 2)))
    with pytest.raises(ValueError, match="square"):
        random_rotation(randn(2, 1, 4, 5, seed=1))


# ------------------------------------------------------------------------------------------------ config
def test_defaults_follow_usb_and_bad_keys_are_named():
    cfg = validate_recipe({"stages": [tiny_stage("r", "remixmatch")]}).stages[0]
    assert (cfg.temperature, cfg.kl_loss_ratio, cfg.lambda_u, cfg.rot_loss_ratio, cfg.mixup_alpha, cfg.mixup_manifold,
            cfg.unsup_warmup, cfg.mu, cfg.num_augmentations, cfg.da_target) == (
        0.5, 0.5, 1.5, 0.5, 0.75, False, 1 / 64, 1, 2, "labeled")
    assert cfg.recommended["optimizer"]["lr"] == 0.03 and "remixmatch" in cfg.recommended_source
    for key, value, message in [("temperature", 0.0, "greater than 0"), ("da_len", 0, "greater than or equal to 1"),
                                ("da_target", "model", "'labeled' or 'uniform'"),
                                ("mixup_alpha", -1, "greater than or equal to 0"),
                                ("threshold", 0.9, "Extra inputs are not permitted")]:
        with pytest.raises(ConfigError, match=rf"stages\[r\]\.{key}: .*{message}"):
            validate_recipe({"stages": [tiny_stage("r", "remixmatch", **{key: value})]})


# ------------------------------------------------------------------------------------------------ method
def test_a_step_is_its_weighted_terms_and_an_optimiser_step_changes_the_parameters():
    method, data = build_semi_method(tiny_stage("r", "remixmatch", **{**SEMI, "mu": 2}))
    method.train()
    counts = torch.bincount(data.train.labels[data.labeled], minlength=10).float()
    torch.testing.assert_close(method.dist_align.p_target, counts / counts.sum())
    optimizer = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9)
    before = [p.detach().clone() for p in method.parameters()]
    bn = next(m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for step in range(2):
        torch.manual_seed(step)
        out = method.training_step(semi_batch(data, 8, 2), Progress(step=step, total_steps=128, epoch=0,
                                                                   steps_per_epoch=128))
        ramp = step / (128 / 64)  # unsup_warmup 1/64 of 128 steps = 2 steps
        want = (out["supervised_loss"] + ramp * (1.5 * out["unsupervised_loss"] + 0.5 * out["strong_loss"])
                + 0.5 * out["rotation_loss"])
        torch.testing.assert_close(out["loss"].detach(), want, **TOL)
        assert math.isfinite(out["loss"].item()) and 0.5 <= float(out["mixup_lambda"]) <= 1
        optimizer.zero_grad()
        out["loss"].backward()
        assert method.rot_head.weight.grad is not None and method.rot_head.weight.grad.abs().sum() > 0
        optimizer.step()
        assert bn.track_running_stats  # restored after the frozen pass
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters()))
    assert int(method.dist_align.filled) == 2
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert {"dist_align.history", "dist_align.p_target", "rot_head.weight"} <= set(state)
    method.dist_align.history.zero_()
    method.load_state_dict(state)  # a resumed run continues with the prediction history
    torch.testing.assert_close(method.dist_align.history, state["dist_align.history"])
    epoch = method.epoch_metrics()
    assert len(epoch["remixmatch/p_model"]) == 10 and 0 <= epoch["pseudo/accuracy"] <= 1


@pytest.mark.parametrize("overrides", [{"rot_loss_ratio": 0.0, "mixup_manifold": True, "da_target": "uniform"},
                                       {"joint_forward": False, "num_augmentations": 1}])
def test_options_without_rotation_manifold_mixup_uniform_target_separate_passes(overrides):
    method, data = build_semi_method(tiny_stage("r", "remixmatch", **{**SEMI, "mu": 1, **overrides}))
    method.train()
    assert (method.rot_head is None) == ("rot_loss_ratio" in overrides)
    if "da_target" in overrides:
        torch.testing.assert_close(method.dist_align.p_target, torch.full((10,), 0.1))
    out = method.training_step(semi_batch(data, 8, 1), Progress(step=5, total_steps=10, epoch=0, steps_per_epoch=10))
    assert ("rotation_loss" in out) == (method.rot_head is not None) and math.isfinite(out["loss"].item())
    out["loss"].backward()


def test_method_remixmatch_alone_trains_through_the_runner(tmp_path):
    """`method: remixmatch` and nothing else of its own (USB defaults): finite losses, a test accuracy."""
    import json

    from ssl_kit.runner import run_recipe

    stage = tiny_stage("remixmatch", "remixmatch", **SEMI)
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "r", "stages": [stage]}), tmp_path / "r")
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    steps = [r for r in rows if r.get("kind") == "step"]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["rotation_loss"]) for r in steps)
    assert 0 <= summary["remixmatch/test/top1"] <= 1
