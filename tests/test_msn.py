"""MSN / PMSN: the loss equals lightly 1.6's MSNLoss / PMSNLoss (value and gradients) and the naive formula; two
gloo ranks equal one process on the global batch; bad arguments are named; the method trains on its defaults with a
tiny ViT, its target encoder follows the EMA, a CNN is refused."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.engine.optim import build_optimizer
from ssl_kit.errors import ConfigError
from ssl_kit.losses import MSNLoss, msn_loss, power_law_prior
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.models.registry import build_backbone
from tests.oracle import TOL, assert_same, randn, value_and_grads
from tests.test_distributed import _set_env, spawn_ranks

TINY_VIT = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}


# ------------------------------------------------------------------------------------------------ the loss
@pytest.mark.parametrize("sinkhorn", [0, 3])
@pytest.mark.parametrize("regularization", ["me_max", "power_law"])
def test_loss_equals_lightly(regularization, sinkhorn):
    lightly_loss = pytest.importorskip("lightly.loss")  # the oracle only: ssl_kit never imports lightly
    anchors, targets, prototypes = randn(3 * 8, 6, seed=1), randn(8, 6, seed=2), randn(16, 6, seed=3)
    if regularization == "me_max":
        theirs_fn = lightly_loss.MSNLoss(temperature=0.1, sinkhorn_iterations=sinkhorn)
    else:
        theirs_fn = lightly_loss.PMSNLoss(temperature=0.1, sinkhorn_iterations=sinkhorn, power_law_exponent=0.25)
    with pytest.warns(UserWarning) if regularization == "power_law" else _nothing():
        theirs = value_and_grads(lambda a, p: theirs_fn(a, targets, p, target_sharpen_temperature=0.25),
                                 anchors, prototypes)
    ours = value_and_grads(lambda a, p: msn_loss(a, targets, p, 0.1, 0.25, sinkhorn, regularization), anchors,
                           prototypes)
    assert_same(ours, theirs)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_loss_equals_the_naive_formula():
    anchors, targets, prototypes = randn(2 * 5, 4, seed=4), randn(5, 4, seed=5), randn(7, 4, seed=6)
    c = F.normalize(prototypes, dim=1)
    p = [[math.exp(float(F.normalize(a, dim=0) @ c[k]) / 0.1) for k in range(7)] for a in anchors]
    p = [[v / sum(row) for v in row] for row in p]
    t = [[math.exp(float(F.normalize(z, dim=0) @ c[k]) / 0.025) for k in range(7)] for z in targets]
    t = [[v / sum(row) for v in row] for row in t]
    ce = sum(-sum(t[i % 5][k] * math.log(p[i][k]) for k in range(7)) for i in range(10)) / 10
    mean = [sum(p[i][k] for i in range(10)) / 10 for k in range(7)]
    me_max = sum(m * math.log(m) for m in mean) + math.log(7)
    prior = [(k + 1) ** -0.5 for k in range(7)]
    prior = [q / sum(prior) for q in prior]
    kl = sum(q * (math.log(q) - math.log(m)) for q, m in zip(prior, mean))
    got = msn_loss(anchors, targets, prototypes, sinkhorn_iterations=0, regularization_weight=2.0)
    assert got.item() == pytest.approx(ce + 2 * me_max, rel=1e-5)
    got = msn_loss(anchors, targets, prototypes, sinkhorn_iterations=0, regularization="power_law",
                   power_law_exponent=0.5)
    assert got.item() == pytest.approx(ce + kl, rel=1e-5)
    assert msn_loss(anchors, targets, prototypes, sinkhorn_iterations=0, regularization="none").item() == \
        pytest.approx(ce, rel=1e-5)
    torch.testing.assert_close(power_law_prior(7, 0.5), torch.tensor(prior, dtype=torch.float32))


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=0.0), r"temperature must be a number > 0"),
    (dict(target_sharpen_temperature=-1.0), r"target_sharpen_temperature must be a number > 0"),
    (dict(sinkhorn_iterations=-1), r"sinkhorn_iterations must be an integer >= 0"),
    (dict(regularization="entropy"), r"regularization must be one of"),
    (dict(regularization_weight=-1.0), r"regularization_weight must be a number >= 0"),
    (dict(power_law_exponent=-0.1), r"power_law_exponent must be a number >= 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    a, t, p = randn(4, 3), randn(2, 3), randn(5, 3)
    with pytest.raises(ValueError, match=message):
        msn_loss(a, t, p, **kwargs)
    with pytest.raises(ValueError, match=message):
        MSNLoss(**kwargs)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"whole number .* of views"):
        msn_loss(randn(5, 3), randn(2, 3), randn(4, 3))
    with pytest.raises(ValueError, match=r"share the embedding dimension"):
        msn_loss(randn(4, 3), randn(2, 3), randn(4, 5))
    with pytest.raises(ValueError, match=r"anchors must be a 2-D tensor"):
        msn_loss(randn(4), randn(2, 3), randn(4, 3))


# ---------------------------------------------------------------------------------- two ranks == global batch
WORLD, N, VIEWS = 2, 8, 3
CASES = [("me_max", 0), ("me_max", 3), ("power_law", 3)]


def global_inputs():
    return randn(VIEWS * N, 6, seed=20), randn(N, 6, seed=21), randn(12, 6, seed=22)


def local_rows(rank):
    """This rank's anchor rows of the view-major global anchors, and its target rows."""
    half = N // WORLD
    rows = torch.cat([torch.arange(v * N + rank * half, v * N + (rank + 1) * half) for v in range(VIEWS)])
    return rows, torch.arange(rank * half, (rank + 1) * half)


def _worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        anchors, targets, prototypes = global_inputs()
        rows, target_rows = local_rows(rank)
        results = {}
        for regularization, sinkhorn in CASES:
            loss = MSNLoss(sinkhorn_iterations=sinkhorn, regularization=regularization)
            results[(regularization, sinkhorn)] = value_and_grads(
                lambda a, p: loss(a, targets[target_rows], p), anchors[rows], prototypes)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("msn_ddp"))


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_the_global_batch(ranks, case):
    """The mean of the ranks' losses and the engine-averaged gradients (the ranks' gradients / world) equal one
    process on the global batch: me-max / prior on the global mean, Sinkhorn over the global targets."""
    anchors, targets, prototypes = global_inputs()
    regularization, sinkhorn = case
    loss, (grad_anchors, grad_prototypes) = value_and_grads(
        lambda a, p: msn_loss(a, targets, p, sinkhorn_iterations=sinkhorn, regularization=regularization),
        anchors, prototypes)
    per_rank = [r[case] for r in ranks]
    torch.testing.assert_close(sum(r[0] for r in per_rank) / WORLD, loss, **TOL)
    torch.testing.assert_close(sum(r[1][1] for r in per_rank) / WORLD, grad_prototypes, **TOL)
    for rank, r in enumerate(per_rank):
        rows, _ = local_rows(rank)
        torch.testing.assert_close(r[1][0] / WORLD, grad_anchors[rows], **TOL)


# --------------------------------------------------------------------------------------------------- method
@pytest.fixture(scope="module")
def digits():
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "msn", "backbone": {"name": "vit_tiny"},
                                                  "data": {"dataset": "digits", "image_size": 16}}]}).stages[0]
    data = prepare_data(cfg.data, 0)
    return cfg, data, Batch(x=data.train.images[:16], y=data.train.labels[:16])


def build(cfg, data, backbone="vit_tiny", kwargs=None):
    torch.manual_seed(0)
    return build_method("msn")(cfg, build_backbone(backbone, 1, 16, kwargs or TINY_VIT), data.info)


def test_the_target_encoder_follows_the_ema_on_a_linear_ramp(digits):
    cfg, data, _ = digits
    model = build(cfg, data)
    pairs = model.momentum_pairs()
    assert pairs[0] == (model.backbone, model.target_encoder) and model.get_backbone() is model.target_encoder
    assert pairs[1] == (model.projector, model.target_projector)
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.after_optimizer_step(Progress(step=5, total_steps=20, epoch=0, steps_per_epoch=20))
    m = 0.996 + (1 - 0.996) * 5 / 20
    assert model.current_momentum == pytest.approx(m)
    for o, t, t0 in zip(model.backbone.parameters(), model.target_encoder.parameters(), before):
        torch.testing.assert_close(t, m * t0 + (1 - m) * o, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("regularization", ["me_max", "power_law"])
def test_the_method_trains_on_its_defaults_with_a_tiny_vit(digits, regularization):
    cfg, data, batch = digits
    cfg = cfg.model_copy(update={"regularization": regularization})
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.base_batch_size) == ("adamw", 0.001, 1024)
    assert (cfg.focal_views, cfg.mask_ratio, cfg.num_prototypes) == (10, 0.15, 1024)
    model = build(cfg, data)
    model.train()
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, 16)
    watched = {"backbone": model.backbone, "projector": model.projector, "target": model.target_encoder}
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in watched.items()}
    prototypes = model.prototypes.detach().clone()
    for step in range(3):
        out = model.training_step(batch, Progress(step, 3, 0, 3))
        assert math.isfinite(out["msn_loss"].item()) and out["msn_loss"].item() > 0
        assert out["probe_loss"].item() > 0
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert all(p.grad is None for p in model.target_encoder.parameters())
        optimizer.step()
        model.after_optimizer_step(Progress(step, 3, 0, 3))
    for name, module in watched.items():
        assert any(not torch.equal(a, p) for a, p in zip(before[name], module.parameters())), name
    assert not torch.equal(prototypes, model.prototypes)
    metrics = model.epoch_metrics()
    assert metrics["msn/embedding_std"] > 0 and metrics["msn/target_momentum"] > 0.996


def test_patch_dropping_keeps_the_unmasked_share(digits):
    cfg, data, batch = digits
    model = build(cfg.model_copy(update={"mask_ratio": 0.5}), data)
    seen = {}
    encode = model.backbone.encode
    model.backbone.encode = lambda tokens: seen.setdefault("n", tokens.shape[1]) and encode(tokens)
    model.encode_masked(torch.zeros(2, 1, 16, 16))
    assert seen["n"] == 8  # 16 patches, half dropped


def test_a_cnn_is_refused_and_bad_settings_are_named(digits):
    cfg, data, _ = digits
    with pytest.raises(ConfigError, match=r"stages\[p\]: MSN needs a ViT backbone .* got SmallCNN"):
        build(cfg, data, "small_cnn", {"width": 8})
    for key, value, message in [("mask_ratio", 1.0, r"mask_ratio"), ("regularization", "kl", r"regularization"),
                                ("temperature", 0, r"temperature")]:
        with pytest.raises(ConfigError, match=r"stages\[p\].*" + message):
            validate_recipe({"stages": [{"name": "p", "method": "msn", key: value}]})
