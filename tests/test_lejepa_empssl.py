"""LeJEPA and EMP-SSL: SIGReg, the LeJEPA loss, the total coding rate and the patch invariance equal lightly 1.6's
(values and input gradients, SIGReg on the same random directions); EMP-SSL's sign follows the reference (lightly's
EMPSSLLoss adds the rate with the opposite sign); the gathering wrappers under two gloo processes equal the pure
functions on the global batch; bad arguments are named; both methods take optimizer steps on their own defaults on
digits with a small CNN, and on a tiny ViT."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.engine.optim import build_optimizer
from ssl_kit.errors import ConfigError
from ssl_kit.losses import (EMPSSLLoss, LeJEPALoss, emp_ssl_loss, lejepa_loss, lejepa_prediction_loss,
                            patch_invariance_loss, sigreg, sigreg_directions, total_coding_rate)
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.models.registry import build_backbone
from tests.oracle import assert_same, randn, value_and_grads
from tests.test_distributed import _set_env, spawn_ranks

lightly_loss = pytest.importorskip("lightly.loss")  # the oracle only: ssl_kit never imports lightly
lightly_emp = pytest.importorskip("lightly.loss.emp_ssl_loss")




def lightly_with_seed(seed, module, *args, **kwargs):
    """Call a lightly loss that draws its directions from torch's global RNG, seeded first."""
    torch.manual_seed(seed)
    return module(*args, **kwargs)


def directions_of(seed, dim, slices):
    """The directions lightly's SIGReg draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return sigreg_directions(dim, slices)


# ------------------------------------------------------------------------------------------------------- LeJEPA
@pytest.mark.parametrize("lambda_", [0.05, 0.4])
def test_lejepa_loss_equals_lightly(lambda_):
    """2 global + 3 local views, 32 slices: loss and gradients of both view sets equal lightly's LeJEPALoss; so do
    the Module wrapper given the same directions."""
    global_z, local_z = randn(2, 12, 6, seed=1), randn(3, 12, 6, seed=2) * 0.7 + 0.2
    theirs = lightly_loss.LeJEPALoss(lambda_param=lambda_, sigreg_num_vectors=32)
    expected = value_and_grads(lambda g, l: lightly_with_seed(7, theirs, local_proj=l, global_proj=g),
                               global_z, local_z)
    directions = directions_of(7, 6, 32)
    assert_same(value_and_grads(lambda g, l: lejepa_loss(g, l, directions, lambda_), global_z, local_z), expected)
    module = LeJEPALoss(lambda_, num_slices=32)
    assert_same(value_and_grads(lambda g, l: module(g, l, directions), global_z, local_z), expected)
    assert expected[0].item() > 0 and all(g.abs().sum() > 0 for g in expected[1])


@pytest.mark.parametrize("knots,t_max", [(17, 3.0), (9, 5.0)])
def test_sigreg_equals_lightly(knots, t_max):
    z = randn(20, 5, seed=3) * 1.5
    theirs = lightly_loss.SIGReg(knots=knots, t_max=t_max, num_vectors=16)
    expected = value_and_grads(lambda x: lightly_with_seed(11, theirs, x), z)
    directions = directions_of(11, 5, 16)
    assert_same(value_and_grads(lambda x: sigreg(x, directions, knots, t_max), z), expected)


def test_sigreg_tells_a_gaussian_from_collapse_and_lejepa_without_local_views():
    """A N(0, I) batch scores ~1; a collapsed or rescaled one two orders more. With global views only the loss is
    MINIMAL.md's: λ·SIGReg + (1 − λ)·mean((mean_v z − z)²), i.e. lightly's two terms on the global views."""
    directions = sigreg_directions(8, 64, torch.Generator().manual_seed(1))
    gaussian = randn(512, 8, seed=0)
    assert sigreg(gaussian, directions).item() == pytest.approx(1.371, abs=0.01)
    assert sigreg(torch.zeros(512, 8), directions).item() > 150
    assert sigreg(3 * gaussian, directions).item() > 150
    views = randn(4, 10, 8, seed=5)
    expected = 0.02 * lightly_with_seed(3, lightly_loss.SIGReg(num_vectors=64), views) + \
        0.98 * lightly_loss.lejepa_loss.lejepa_invariance_loss(all_proj=views, global_proj=views)
    minimal = (views.mean(0) - views).square().mean()
    assert lejepa_prediction_loss(views).item() == pytest.approx(minimal.item(), rel=1e-6)
    assert lejepa_loss(views, None, directions_of(3, 8, 64), 0.02).item() == pytest.approx(expected.item(), rel=1e-5)


def test_lejepa_directions_are_seeded_by_the_call_count():
    """Two modules draw the same fresh directions call after call (every rank, and a resumed run via the saved
    `step`); successive calls differ; they are unit vectors."""
    a, b = LeJEPALoss(num_slices=8), LeJEPALoss(num_slices=8)
    first, second = a.next_directions(5), a.next_directions(5)
    assert torch.equal(first, b.next_directions(5)) and not torch.allclose(first, second)
    torch.testing.assert_close(first.norm(dim=0), torch.ones(8))
    assert int(a.step) == 2 and "step" in a.state_dict()
    c = LeJEPALoss(num_slices=8)
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c.next_directions(5), a.next_directions(5))


# ------------------------------------------------------------------------------------------------------ EMP-SSL
@pytest.mark.parametrize("n,d", [(12, 6), (5, 16)])  # the D x D and the N x N Gram matrix
def test_coding_rate_and_invariance_equal_lightly(n, d):
    z = F.normalize(randn(4, n, d, seed=n), dim=-1)
    assert_same(value_and_grads(lambda x: total_coding_rate(x, 0.3), z),
                value_and_grads(lambda x: lightly_emp.tcr_loss(x, 0.3), z))
    assert_same(value_and_grads(patch_invariance_loss, z), value_and_grads(lightly_emp.invariance_loss, z))


def test_emp_ssl_loss_follows_the_reference_sign():
    """loss = −R + 200·inv (reference main.py: TotalCodingRate returns −R); lightly's EMPSSLLoss adds +R. So ours
    equals lightly's minus twice the rate, and a batch whose images spread over many directions scores lower than a
    collapsed one with the same perfect patch agreement (lightly's sum would rank them the other way)."""
    z = F.normalize(randn(3, 10, 8, seed=4), dim=-1)
    lightly_total = lambda x: lightly_emp.EMPSSLLoss()(list(x)) - 2 * lightly_emp.tcr_loss(x, 0.2)  # noqa: E731
    assert_same(value_and_grads(emp_ssl_loss, z), value_and_grads(lightly_total, z))
    assert_same(value_and_grads(EMPSSLLoss(), z), value_and_grads(emp_ssl_loss, z))
    spread = F.normalize(randn(1, 10, 8, seed=6), dim=-1).expand(3, -1, -1)
    collapsed = spread[:, :1].expand(-1, 10, -1)
    assert emp_ssl_loss(spread).item() < emp_ssl_loss(collapsed).item() - 4
    # one direction: rate ½·log(1 + D/ε) (rank one), every cosine 1
    assert emp_ssl_loss(collapsed).item() == pytest.approx(-200.0 - 0.5 * math.log(1 + 8 / 0.2), abs=1e-4)


# --------------------------------------------------------------------------------------------------- bad inputs
def test_bad_arguments_are_named():
    z, a = randn(2, 4, 3), sigreg_directions(3, 5)
    with pytest.raises(ValueError, match=r"directions must be a 2-D tensor \(D=3, M slices\), got shape \(4, 5\)"):
        lejepa_loss(z, None, randn(4, 5))
    with pytest.raises(ValueError, match=r"lambda_ must be in \[0, 1\], got 1.5"):
        LeJEPALoss(1.5)
    with pytest.raises(ValueError, match="knots must be an integer >= 2, got 1"):
        sigreg(z, a, knots=1)
    with pytest.raises(ValueError, match="t_max must be a number > 0, got 0"):
        LeJEPALoss(t_max=0)
    with pytest.raises(ValueError, match="num_slices must be an integer >= 1, got 0"):
        LeJEPALoss(num_slices=0)
    with pytest.raises(ValueError, match=r"local_z and global_z must have the same N images and D"):
        lejepa_loss(z, randn(2, 5, 3), a)
    with pytest.raises(ValueError, match=r"global_z must be a 3-D tensor \(V views, N images, D\)"):
        lejepa_loss(z[0], None, a)
    with pytest.raises(ValueError, match=r"needs at least 2 patches of at least 1 image, got V=1"):
        emp_ssl_loss(randn(1, 4, 3))
    with pytest.raises(ValueError, match="eps must be a number > 0, got 0"):
        EMPSSLLoss(eps=0)
    with pytest.raises(ValueError, match="inv_coef must be a number >= 0, got -1"):
        emp_ssl_loss(z, inv_coef=-1)
    stage = {"name": "p", "data": {"dataset": "digits", "image_size": 16}}
    with pytest.raises(ConfigError, match=r"use global_crop_scale, local_crop_scale.*views\.\['crop_scale'\]"):
        validate_recipe({"stages": [{**stage, "method": "lejepa", "views": {"crop_scale": [0.2, 1.0]}}]})
    with pytest.raises(ConfigError, match=r"local_crop_scale must satisfy 0 < low <= high <= 1"):
        validate_recipe({"stages": [{**stage, "method": "lejepa", "local_crop_scale": [0.5, 0.1]}]})
    with pytest.raises(ConfigError, match=r"use patch_scale, blur_prob.*views\.\['blur_prob'\]"):
        validate_recipe({"stages": [{**stage, "method": "emp_ssl", "views": {"blur_prob": 0.5}}]})
    with pytest.raises(ConfigError, match=r"n_patches: .*greater than or equal to 2"):
        validate_recipe({"stages": [{**stage, "method": "emp_ssl", "n_patches": 1}]})


# ---------------------------------------------------------------------------------- two ranks == global batch
WORLD, N = 2, 5


def global_inputs():
    """(global views, local views) for LeJEPA and normalised patches for EMP-SSL, split along the images (dim 1)."""
    return {"lejepa": [randn(2, 10, 6, seed=40), randn(3, 10, 6, seed=41) * 0.5],
            "emp_ssl": [F.normalize(randn(4, 10, 12, seed=42), dim=-1)]}


FIXED = sigreg_directions(6, 24, torch.Generator().manual_seed(9))


def cases():
    """name -> (Module wrapper, pure function on the global batch) for every gathered loss. `lejepa_drawn` lets the
    module draw its own directions on each rank: the global loss is a fresh module's first draw."""
    return {"lejepa": (lambda g, l: LeJEPALoss(0.3, 24)(g, l, FIXED), lambda g, l: lejepa_loss(g, l, FIXED, 0.3)),
            "lejepa_drawn": (lambda g, l: LeJEPALoss(0.3, 24)(g, l), lambda g, l: LeJEPALoss(0.3, 24)(g, l)),
            "emp_ssl": (lambda z: EMPSSLLoss(0.2, 50.0)(z), lambda z: emp_ssl_loss(z, 0.2, 50.0))}


def _inputs(name):
    return global_inputs()["lejepa" if name.startswith("lejepa") else name]


def _worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {name: value_and_grads(module, *[x[:, rank * N:(rank + 1) * N] for x in _inputs(name)])
                   for name, (module, _) in cases().items()}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory.mktemp("lejepa_empssl_ddp"))


@pytest.mark.slow
def test_gathered_losses_equal_the_global_batch(ranks):
    """Mean of the per-rank losses == the global loss; each rank's gradients / world == the global gradients of its
    images (the engine averages gradients over ranks). SIGReg all-reduces its cos/sin sums, EMP-SSL gathers the
    patches for the rate; both ranks draw the same SIGReg directions without communicating."""
    for name, (_, pure) in cases().items():
        loss, grads = value_and_grads(pure, *_inputs(name))
        assert torch.stack([r[name][0] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5), name
        for i, expected in enumerate(grads):
            gathered = torch.cat([r[name][1][i] for r in ranks], dim=1) / WORLD
            torch.testing.assert_close(gathered, expected, atol=1e-6, rtol=1e-4, msg=name)
    assert ranks[0]["lejepa"][0].item() != pytest.approx(ranks[1]["lejepa"][0].item())  # the prediction term is local


# --------------------------------------------------------------------------------- methods on their defaults
@pytest.fixture(scope="module")
def digits():
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "lejepa",
                                                  "data": {"dataset": "digits", "image_size": 16}}]})
    return prepare_data(cfg.stages[0].data, 0)


TINY_VIT = ("vit_tiny", {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2})
SMALL_CNN = ("small_cnn", {"width": 8})
SMALL_HEADS = {"lejepa": {"proj_hidden_dim": 64, "proj_dim": 16, "num_slices": 64},
               "emp_ssl": {"n_patches": 4, "proj_hidden_dim": 64, "proj_dim": 32}}


@pytest.mark.parametrize("name,backbone,overrides", [("lejepa", SMALL_CNN, False), ("emp_ssl", SMALL_CNN, False),
                                                     ("lejepa", TINY_VIT, True), ("emp_ssl", TINY_VIT, True)])
def test_method_trains_on_its_defaults(name, backbone, overrides, digits):
    """Two steps with the method's recommended optimizer (a small CNN on the method's defaults alone; a tiny ViT
    with small heads): finite losses, both loss terms logged, the backbone moves, the SIGReg draw counter
    advances, the collapse watch reports."""
    keys = SMALL_HEADS[name] if overrides else {}
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": name, **keys,
                                                  "data": {"dataset": "digits", "image_size": 16}}]}).stages[0]
    torch.manual_seed(0)
    model = build_method(name)(cfg, build_backbone(backbone[0], 1, 16, backbone[1]), digits.info)
    batch_size = 8 if name == "emp_ssl" else 16
    batch = Batch(x=digits.train.images[:batch_size], y=digits.train.labels[:batch_size])
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, batch_size)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    for step in range(2):
        out = model.training_step(batch, Progress(step, 2, 0, 2))
        assert math.isfinite(out["loss"].item()) and out["probe_loss"].item() > 0
        terms = ("sigreg", "prediction") if name == "lejepa" else ("coding_rate", "patch_similarity")
        assert all(math.isfinite(out[t].item()) and out[t].item() > 0 for t in terms), out
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        model.after_optimizer_step(Progress(step, 2, 0, 2))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters()))
    assert model.epoch_metrics()[f"{name}/embedding_std"] > 0
    if name == "lejepa":
        assert int(model.loss_fn.step) == 2 and len(model.view_list()) == 8
        assert cfg.optimizer.name == "adamw" and cfg.optimizer.weight_decay == 0.05
    else:
        assert len(model.view_list()) == cfg.n_patches and cfg.optimizer.name == "lars"
