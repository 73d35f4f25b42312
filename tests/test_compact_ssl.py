"""DCL/DCLW, TiCo and MMCR: each loss equals lightly 1.6's (values and input gradients, TiCo over consecutive calls
with its running covariance); the gathering wrappers under two gloo processes equal the pure functions on the global
batch; bad arguments are named; each method takes optimizer steps on its own defaults on digits."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.engine.optim import build_optimizer
from ssl_kit.losses import DCLLoss, MMCRLoss, TiCoLoss, dcl_loss, mmcr_loss, tico_loss, vmf_weights
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.models.registry import build_backbone
from tests.oracle import TOL, assert_same, randn, value_and_grads
from tests.test_distributed import _set_env, spawn_ranks

lightly_loss = pytest.importorskip("lightly.loss")  # the oracle only: ssl_kit never imports lightly




# ---------------------------------------------------------------------------------------------- lightly equality
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_dcl_equals_lightly(temperature):
    z1, z2 = randn(12, 6, seed=1), randn(12, 6, seed=2)
    ours = value_and_grads(lambda a, b: dcl_loss(a, b, temperature), z1, z2)
    assert_same(ours, value_and_grads(lightly_loss.DCLLoss(temperature), z1, z2))
    assert_same(value_and_grads(DCLLoss(temperature), z1, z2), ours)


@pytest.mark.parametrize("temperature,sigma", [(0.1, 0.5), (0.2, 0.2)])
def test_dclw_equals_lightly(temperature, sigma):
    z1, z2 = randn(12, 6, seed=3), randn(12, 6, seed=4) + randn(12, 6, seed=3)  # varied positive similarities
    ours = value_and_grads(lambda a, b: dcl_loss(a, b, temperature, "vmf", sigma), z1, z2)
    assert_same(ours, value_and_grads(lightly_loss.DCLWLoss(temperature, sigma), z1, z2))
    assert_same(value_and_grads(DCLLoss(temperature, "vmf", sigma), z1, z2), ours)
    weights = vmf_weights(F.cosine_similarity(z1, z2), sigma)
    assert weights.mean().item() == pytest.approx(1.0, abs=1e-6) and not weights.requires_grad


def test_tico_equals_lightly_over_consecutive_calls():
    """lightly's TiCoLoss keeps C between calls: three steps, each loss, gradient and C equal; so does chaining the
    pure function's returned C."""
    theirs, ours = lightly_loss.TiCoLoss(beta=0.8, rho=6.0), TiCoLoss(6, beta=0.8, rho=6.0)
    covariance = None
    for step in range(3):
        za, zb = randn(10, 6, seed=10 + step), randn(10, 6, seed=20 + step)
        expected = value_and_grads(theirs, za, zb)
        assert_same(value_and_grads(ours, za, zb), expected)
        torch.testing.assert_close(ours.covariance, theirs.C, **TOL)
        pure = value_and_grads(lambda a, b: tico_loss(a, b, covariance, 0.8, 6.0)[0], za, zb)
        assert_same(pure, expected)
        covariance = tico_loss(za, zb, covariance, 0.8, 6.0)[1]
        torch.testing.assert_close(covariance, theirs.C, **TOL)
    before = ours.covariance.clone()
    ours.eval()(randn(10, 6, seed=30), randn(10, 6, seed=31))  # evaluation mode leaves C alone
    assert torch.equal(ours.covariance, before)


@pytest.mark.parametrize("lambda_local", [0.0, 5e-3, 0.5])
def test_mmcr_equals_lightly(lambda_local):
    """lightly's MMCRLoss(online, momentum) is mmcr_loss on the views side by side, without normalising (lightly
    leaves that to the model); with it, ours equals lightly's on the normalised embeddings."""
    online, momentum = randn(9, 4, 5, seed=5), randn(9, 4, 5, seed=6)
    theirs = lightly_loss.MMCRLoss(lambda_local)
    raw = value_and_grads(lambda a, b: mmcr_loss(torch.cat([a, b], dim=1), lambda_local, normalize=False),
                          online, momentum)
    assert_same(raw, value_and_grads(theirs, online, momentum))
    normalised = value_and_grads(lambda a, b: MMCRLoss(lambda_local)(torch.cat([a, b], dim=1)), online, momentum)
    expected = value_and_grads(lambda a, b: theirs(F.normalize(a, dim=-1), F.normalize(b, dim=-1)), online, momentum)
    assert_same(normalised, expected)


def test_bad_arguments_are_named():
    z = randn(4, 3)
    with pytest.raises(ValueError, match="weighting must be one of none, vmf, got 'vMF'"):
        dcl_loss(z, z, weighting="vMF")
    with pytest.raises(ValueError, match="sigma must be a number > 0, got 0"):
        DCLLoss(sigma=0)
    with pytest.raises(ValueError, match="dcl_loss needs a batch of at least 2"):
        dcl_loss(z[:1], z[:1])
    with pytest.raises(ValueError, match=r"covariance must have shape \(3, 3\).*got \(4, 4\)"):
        tico_loss(z, z, torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\], got 1.5"):
        TiCoLoss(3, beta=1.5)
    with pytest.raises(ValueError, match=r"at least 2 views per image, got K=1"):
        mmcr_loss(randn(4, 1, 3))
    with pytest.raises(ValueError, match=r"z must be a 3-D tensor \(N images, K views, D\), got shape \(4, 3\)"):
        mmcr_loss(z)


# ---------------------------------------------------------------------------------- two ranks == global batch
WORLD, N = 2, 4


def global_inputs():
    return {"dcl": [randn(8, 5, seed=40), randn(8, 5, seed=41)], "tico": [randn(8, 5, seed=42), randn(8, 5, seed=43)],
            "mmcr": [randn(8, 3, 5, seed=44)]}


def cases():
    """name -> (Module wrapper, pure function on the global batch) for every gathered loss."""
    return {"dcl": (DCLLoss(0.2), lambda a, b: dcl_loss(a, b, 0.2)),
            "dclw": (DCLLoss(0.2, "vmf", 0.5), lambda a, b: dcl_loss(a, b, 0.2, "vmf", 0.5)),
            "tico": (TiCoLoss(5, 0.9, 4.0), lambda a, b: tico_loss(a, b, None, 0.9, 4.0)[0]),
            "mmcr": (MMCRLoss(0.1), lambda z: mmcr_loss(z, 0.1))}


def _inputs(name):
    return global_inputs()["dcl" if name == "dclw" else name]


def _worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {}
        for name, (module, _) in cases().items():
            results[name] = value_and_grads(module, *[x[rank * N:(rank + 1) * N] for x in _inputs(name)])
            if name == "tico":
                results["tico_covariance"] = module.covariance.clone()
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("compact_ddp"))


@pytest.mark.slow
def test_gathered_losses_equal_the_global_batch(ranks):
    """Mean of the per-rank losses == the global loss; each rank's gradients / world == the global gradients of its
    rows (the engine averages gradients over ranks); TiCo's C is the global batch's on every rank."""
    for name, (_, pure) in cases().items():
        loss, grads = value_and_grads(pure, *_inputs(name))
        assert torch.stack([r[name][0] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5), name
        for i, expected in enumerate(grads):
            gathered = torch.cat([r[name][1][i] for r in ranks]) / WORLD
            torch.testing.assert_close(gathered, expected, atol=1e-6, rtol=1e-4, msg=name)
    za, zb = global_inputs()["tico"]
    covariance = tico_loss(za, zb, None, 0.9, 4.0)[1]
    for r in ranks:
        torch.testing.assert_close(r["tico_covariance"], covariance, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------- methods on their defaults
@pytest.fixture(scope="module")
def digits():
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "dcl", "data": {"dataset": "digits",
                                                                                         "image_size": 16}}]})
    data = prepare_data(cfg.stages[0].data, 0)
    return data, Batch(x=data.train.images[:32], y=data.train.labels[:32])


@pytest.mark.parametrize("name", ["dcl", "tico", "mmcr"])
def test_method_trains_on_its_defaults(name, digits):
    """Two steps with nothing but the method named (its paper's optimizer via `recommended`): finite losses, the
    backbone moves, the momentum target (TiCo, MMCR) follows it, TiCo's covariance fills."""
    data, batch = digits
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": name,
                                                  "data": {"dataset": "digits", "image_size": 16}}]}).stages[0]
    torch.manual_seed(0)
    model = build_method(name)(cfg, build_backbone("small_cnn", 1, 16, {"width": 8}), data.info)
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, 32)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    for step in range(2):
        out = model.training_step(batch, Progress(step, 2, 0, 2))
        assert math.isfinite(out["loss"].item()) and out["probe_loss"].item() > 0
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        model.after_optimizer_step(Progress(step, 2, 0, 2))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters()))
    if name in ("tico", "mmcr"):
        online, target = model.momentum_pairs()[0]
        assert target is model.target_backbone and not any(p.requires_grad for p in target.parameters())
        assert any(not torch.equal(a, t) for a, t in zip(before, target.parameters()))
    if name == "tico":
        assert model.loss_fn.covariance.abs().sum() > 0 and "tico/embedding_std" in model.epoch_metrics()
