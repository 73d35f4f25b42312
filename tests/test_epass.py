"""EPASS on CoMatch (Nguyen 2023; reference beandkay/EPASS): the ensemble embedding equals the formula computed
naively here, normalise(mean of the heads' raw outputs) (values and gradients); the method's embeddings are that
ensemble over `num_projectors` independently initialised heads; with one head the method is CoMatch exactly (same
parameters, same loss, same gradients on the same seed and batch); it trains through the runner on its defaults with
finite, falling loss; bad options and inputs are named."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_semi_method, semi_batch, tiny_stage
from oracle import TOL, assert_same, randn, value_and_grads
from ssl_kit.config import validate_recipe
from ssl_kit.errors import ConfigError
from ssl_kit.losses import ensemble_embeddings
from ssl_kit.methods.base import Progress

P, N, D = 3, 5, 4
SEMI = dict(data={"dataset": "digits", "image_size": 16, "labels_per_class": 4},
            train={"steps": 3, "batch_size": 8, "ema_decay": 0.9, "log_every": 1})


# ------------------------------------------------------------------------------------------------ naive formula
def _naive_ensemble(*outputs):
    """normalise((1/P) Σ_p outputs_p) row by row, with Python loops over the P heads and the D coordinates."""
    rows = []
    for i in range(outputs[0].shape[0]):
        mean = [sum(out[i, d] for out in outputs) / len(outputs) for d in range(outputs[0].shape[1])]
        norm = torch.sqrt(sum(v * v for v in mean))
        rows.append(torch.stack([v / norm for v in mean]))
    return torch.stack(rows)


def _projected(seed):
    return [randn(N, D, seed=seed + p) * (p + 1) for p in range(P)]  # heads of different scales


# ------------------------------------------------------------------------------------------------ loss
def test_ensemble_is_the_normalised_mean_of_raw_outputs_values_and_grads():
    outputs = _projected(seed=1)
    weights = randn(N, D, seed=9)  # a loss that weighs every coordinate differently, so all gradients are probed
    ours = value_and_grads(lambda *o: (ensemble_embeddings(list(o)) * weights).sum(), *outputs)
    theirs = value_and_grads(lambda *o: (_naive_ensemble(*o) * weights).sum(), *outputs)
    assert_same(ours, theirs)
    got = ensemble_embeddings(outputs)
    assert got.shape == (N, D)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(N), **TOL)
    torch.testing.assert_close(ensemble_embeddings(torch.stack(outputs)), got, rtol=0, atol=0)
    # the mean of the raw outputs, not of the normalised ones: the largest head dominates
    mean_of_unit = F.normalize(torch.stack([F.normalize(o, dim=1) for o in outputs]).mean(0), dim=1)
    assert not torch.allclose(got, mean_of_unit, atol=1e-3)


def test_one_head_is_that_heads_normalised_output_bit_for_bit():
    out = randn(N, D, seed=3)
    assert torch.equal(ensemble_embeddings([out]), F.normalize(out.float(), dim=1))
    half = out.to(torch.bfloat16)
    assert ensemble_embeddings([half]).dtype == torch.float32


@pytest.mark.parametrize("outputs, message", [
    ([], "empty"),
    (torch.zeros(0, N, D), "empty"),
    (torch.zeros(N, D), r"\(P, N, D\)"),
    ([torch.zeros(N, D), torch.zeros(N, D + 1)], r"outputs\[1\]"),
    ([torch.zeros(N)], r"outputs\[0\] must be a 2-D"),
])
def test_bad_outputs_are_named(outputs, message):
    with pytest.raises(ValueError, match=message):
        ensemble_embeddings(outputs)


# ------------------------------------------------------------------------------------------------ method
def _method(name="epass", **overrides):
    return build_semi_method(tiny_stage(name, name, **{**SEMI, "mu": 2, **overrides}))


def _step(method, data):
    torch.manual_seed(0)
    return method.training_step(semi_batch(data, 8, 2), Progress(step=0, total_steps=10, epoch=0, steps_per_epoch=10))


def test_defaults_are_comatchs_with_three_projectors():
    cfg = validate_recipe({"stages": [tiny_stage("e", "epass")]}).stages[0]
    assert (cfg.num_projectors, cfg.threshold, cfg.contrast_p_cutoff, cfg.contrast_loss_ratio, cfg.temperature,
            cfg.proj_size, cfg.queue_batch, cfg.smoothing_alpha, cfg.da_len, cfg.mu, cfg.lambda_u) == (
        3, 0.95, 0.8, 1.0, 0.2, 64, 5, 0.9, 32, 7, 1.0)
    silent = validate_recipe({"stages": [{"name": "e", "method": "epass"}]}).stages[0]
    assert (silent.optimizer.name, silent.optimizer.lr, silent.optimizer.weight_decay, silent.optimizer.nesterov,
            silent.schedule.name) == ("sgd", 0.03, 5e-4, True, "fixmatch_cosine")


def test_embeddings_are_the_ensemble_of_independent_heads():
    method, data = _method()
    heads = method.projector.heads
    assert len(heads) == 3
    assert not torch.equal(heads[0][0].weight, heads[1][0].weight)  # initialised independently
    assert not torch.equal(heads[1][2].weight, heads[2][2].weight)
    images = method.weak_view(semi_batch(data, 8, 2).x)
    logits, embeddings = method.features_and_embeddings(images)
    features = method.net.backbone(images)
    torch.testing.assert_close(embeddings, _naive_ensemble(*[head(features) for head in heads]), **TOL)
    torch.testing.assert_close(logits, method.net.head(features), **TOL)
    out = _step(method, data)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for head in heads for p in head.parameters())


def test_one_projector_is_comatch_exactly():
    """Same seed, same batch: CoMatch's projector is the ensemble's first head (built from the same random stream at
    the same point), and a mean over one head is that head, so parameters, losses and gradients are equal."""
    epass, data = _method(num_projectors=1)
    comatch, _ = _method("comatch")
    theirs = [p for name, p in comatch.named_parameters()]
    ours = [p for name, p in epass.named_parameters()]
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    got, want = _step(epass, data), _step(comatch, data)
    for key in ("loss", "supervised_loss", "unsupervised_loss", "contrast_loss", "mask_rate"):
        assert torch.equal(got[key], want[key]), key
    got["loss"].backward()
    want["loss"].backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert torch.equal(epass.bank_embeddings, comatch.bank_embeddings)
    three, _ = _method(num_projectors=3)
    assert not torch.equal(_step(three, data)["contrast_loss"], want["contrast_loss"])  # the ensemble matters


def test_trains_through_the_runner_on_its_defaults_with_finite_falling_loss(tmp_path):
    from ssl_kit.runner import run_recipe

    stage = tiny_stage("epass", "epass", **{**SEMI, "train": {**SEMI["train"], "steps": 30}})
    run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "e", "stages": [stage]}), tmp_path / "r")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("kind") == "step"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert 0 <= summary["epass/test/top1"] <= 1


@pytest.mark.parametrize("key, value", [("num_projectors", 0), ("num_projectors", -2), ("num_projectors", 1.5),
                                        ("proj_size", 0), ("temperature", 0.0)])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"stages\[e\]\.{key}"):
        validate_recipe({"stages": [tiny_stage("e", "epass", **{key: value})]})
