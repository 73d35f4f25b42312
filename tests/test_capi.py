"""CAPI: the loss against lightly's CAPILoss (values and gradients, with and without gathered positions, and as the
clustering head's own loss), the position-wise Sinkhorn-Knopp assignment against a naive loop over the paper's
formula, the inverse-block masks, the predictor's cross-attention (queries do not see each other), the momentum
schedule, bad settings named, and a few optimizer steps on the method's own defaults on digits with a tiny ViT."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.engine.optim import build_optimizer
from ssl_kit.errors import ConfigError
from ssl_kit.losses import capi_assignments, capi_cross_entropy, capi_loss
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.methods.capi import capi_momentum, inverse_block_masks
from ssl_kit.models.capi_predictor import CAPIPredictor, grid_coordinates
from ssl_kit.models.registry import build_backbone
from tests.oracle import assert_same, randn, value_and_grads
from tests.test_distributed import _set_env, spawn_ranks

TINY_VIT = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}


# ------------------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_loss_equals_lightly_with_gathered_positions(scale):
    lightly_loss = pytest.importorskip("lightly.loss")
    teacher, student = randn(6, 9, 40, seed=1) * scale, randn(6, 3, 40, seed=2) * scale
    index = torch.randint(0, 9, (6, 3), generator=torch.Generator().manual_seed(3))
    oracle = lightly_loss.CAPILoss(teacher_temperature=0.06, student_temperature=0.12, sinkhorn_iterations=3)
    ours = value_and_grads(lambda s: capi_loss(s, teacher, index, 0.06, 0.12, 3), student)
    theirs = value_and_grads(lambda s: oracle(teacher, s, index), student)
    assert_same(ours, theirs)
    assert ours[1][0].abs().sum() > 0
    leaf = teacher.clone().requires_grad_(True)
    assert not capi_loss(student, leaf, index).requires_grad  # the teacher takes no gradient


def test_loss_equals_lightly_aligned_and_as_the_clustering_loss():
    lightly_loss = pytest.importorskip("lightly.loss")
    oracle = lightly_loss.CAPILoss(teacher_temperature=0.1, student_temperature=0.2, sinkhorn_iterations=5)
    teacher, student = randn(4, 7, 16, seed=4), randn(4, 7, 16, seed=5)
    assert_same(value_and_grads(lambda s: capi_loss(s, teacher, None, 0.1, 0.2, 5), student),
                value_and_grads(lambda s: oracle(teacher, s), student))
    # the clustering head's loss: its own logits as the prediction of their own (detached) assignments
    assert_same(value_and_grads(lambda z: capi_loss(z, z, None, 0.1, 0.2, 5), teacher),
                value_and_grads(lambda z: oracle(z, z), teacher))
    z = teacher.clone().requires_grad_(True)
    split = capi_cross_entropy(z, capi_assignments(z, 0.1, 5), 0.2)  # what the method computes, in two calls
    torch.testing.assert_close(split, capi_loss(teacher, teacher, None, 0.1, 0.2, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_equals_the_formula_for_any_target_mass(dtype):
    """The one-buffer cross-entropy against −Σ_k q · log softmax(z / T) averaged over tokens, computed in float64 by
    autograd, for targets whose rows do not sum to one (the gradient's m · softmax term) and bfloat16 logits."""
    z = (randn(3, 5, 11, seed=6) * 4).to(dtype)
    q = torch.rand(3, 5, 11, generator=torch.Generator().manual_seed(7)) * 0.3  # row masses 1.2-2.3, not 1

    def formula(x):
        return -(q.double() * F.log_softmax(x.double() / 0.12, dim=-1)).sum(dim=-1).mean()

    leaf = z.clone().requires_grad_(True)
    loss = capi_cross_entropy(leaf, q, 0.12)
    grad, = torch.autograd.grad(loss, leaf)
    reference = z.double().requires_grad_(True)
    expected = formula(reference)
    expected_grad, = torch.autograd.grad(expected, reference)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the gradient is rounded to its dtype
    torch.testing.assert_close(grad.double(), expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max())
    assert z.dtype != torch.float32 or torch.equal(leaf.detach(), z)  # the logits are not written in place


def naive_assignments(logits: torch.Tensor, temp: float, iterations: int) -> torch.Tensor:
    """The paper's position-wise Sinkhorn-Knopp, one position, one prototype and one token at a time."""
    b, length, k = logits.shape
    out = torch.zeros(b, length, k, dtype=torch.float64)
    for pos in range(length):
        q = [[math.exp(float(logits[i, pos, c]) / temp) for c in range(k)] for i in range(b)]
        for _ in range(iterations):
            for c in range(k):
                column = sum(q[i][c] for i in range(b))
                for i in range(b):
                    q[i][c] /= column
            for i in range(b):
                row = sum(q[i])
                q[i] = [v / row for v in q[i]]
        out[:, pos] = torch.tensor(q, dtype=torch.float64)
    return out


@pytest.mark.parametrize("iterations", [1, 3])
def test_assignments_follow_the_papers_formula(iterations):
    logits = randn(5, 4, 6, seed=6)
    ours = capi_assignments(logits, 0.5, iterations)
    torch.testing.assert_close(ours.double(), naive_assignments(logits, 0.5, iterations), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(-1), torch.ones(5, 4))
    # each position is balanced on its own: changing another position's logits leaves it unchanged
    other = logits.clone()
    other[:, 1:] = randn(5, 3, 6, seed=7)
    torch.testing.assert_close(capi_assignments(other, 0.5, iterations)[:, 0], ours[:, 0])
    assert not torch.allclose(capi_assignments(other, 0.5, iterations)[:, 1], ours[:, 1])


def test_bad_loss_arguments_are_named():
    z = randn(2, 3, 4)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        capi_assignments(z, 0.0)
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        capi_assignments(z, 0.1, 0)
    with pytest.raises(ValueError, match=r"logits must be a non-empty \(batch, tokens, clusters\)"):
        capi_assignments(z[0])
    with pytest.raises(ValueError, match="predictions .* and assignments .* must have the same shape"):
        capi_cross_entropy(z, z[:, :2])


# ----------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("grid,ratio", [(4, 0.65), (8, 0.65), (16, 0.65), (8, 0.3)])
def test_inverse_block_masks_keep_one_rectangle_visible_and_predict_masked_patches(grid, ratio):
    torch.manual_seed(0)
    patches = grid * grid
    masked = int(patches * ratio)
    masks = inverse_block_masks(32, grid, ratio, 0.05, roll=False)
    assert masks.visible.shape == (32, patches - masked)
    assert masks.predict.shape == (32, max(1, int(masked * 0.05)))
    for visible, predict in zip(masks.visible, masks.predict):
        assert not set(predict.tolist()) & set(visible.tolist())  # only masked patches are predicted
        rows, cols = visible // grid, visible % grid
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert height * width - len(visible) < max(height, width)  # a rectangle, its last row possibly cut
        assert 0.5 / 2 <= height / width <= 2 * 2  # the aspect range, up to the rounding of small blocks
    rolled = inverse_block_masks(64, grid, ratio, 0.05, roll=True).visible
    assert rolled.shape[1] == masks.visible.shape[1]
    spans = [(v // grid).max() - (v // grid).min() + 1 for v in rolled]
    assert max(spans) == grid  # some blocks wrap around the grid's edge: the roll


def test_masks_refuse_a_ratio_leaving_nothing_visible_or_masked():
    with pytest.raises(ValueError, match="mask_ratio 0.01 masks 0 of 16 patches"):
        inverse_block_masks(2, 4, 0.01, 0.05)


# ------------------------------------------------------------------------------------------------- predictor
def test_predictor_queries_only_see_the_context_and_their_own_position():
    torch.manual_seed(0)
    predictor = CAPIPredictor(16, depth=2, heads=2).eval()
    coords = grid_coordinates(4)
    context, context_coords = torch.randn(2, 5, 16), coords[torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])]
    queries = coords[torch.tensor([[10, 11, 12], [13, 14, 15]])]
    out = predictor(context, context_coords, queries)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(predictor(context, context_coords, queries[:, :1]), out[:, :1])  # no self-attention
    moved = queries.clone()
    moved[:, 1] = coords[0]
    assert not torch.allclose(predictor(context, context_coords, moved)[:, 1], out[:, 1])
    assert not torch.allclose(predictor(context, context_coords.flip(1), queries), out)  # keys carry positions


# ---------------------------------------------------------------------------------------------------- method
@pytest.fixture(scope="module")
def digits():
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "capi", "backbone": {"name": "vit_tiny"},
                                                  "data": {"dataset": "digits", "image_size": 16}}]}).stages[0]
    data = prepare_data(cfg.data, 0)
    return cfg, data, Batch(x=data.train.images[:16], y=data.train.labels[:16])


def build(cfg, data, backbone: str = "vit_tiny", kwargs=None):
    torch.manual_seed(0)
    return build_method("capi")(cfg, build_backbone(backbone, 1, 16, kwargs or TINY_VIT), data.info)


def test_momentum_follows_the_reference_schedule():
    assert capi_momentum(0.999, 0.1, 0, 1000) == 1.0  # a frozen teacher at first
    assert capi_momentum(0.999, 0.1, 99, 1000) == pytest.approx(0.999)  # the end of the linear warm-up
    assert capi_momentum(0.999, 0.1, 100, 1000) == pytest.approx(0.999)  # the cosine starts at the base value
    end = 1 - 0.001 * 0.5 * (1 + math.cos(0.8 * math.pi))  # the cosine cut at 80%
    assert capi_momentum(0.999, 0.1, 1000, 1000) == pytest.approx(end)


def test_the_method_trains_on_its_defaults_with_a_tiny_vit(digits):
    """Three steps with nothing but the method named: finite losses, the student, predictor, both heads move (the
    clustering head at half the lr, without weight decay), the teacher takes no gradient and follows by EMA."""
    cfg, data, batch = digits
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.betas, cfg.num_clusters) == \
        ("adamw", 0.001, (0.9, 0.95), 16384)
    model = build(cfg, data)
    model.train()
    assert not model.teacher_backbone.training and model.get_backbone() is model.teacher_backbone
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, 16)
    clustering = [g for g in optimizer.param_groups if g["name"].startswith("clustering")]
    assert {g["lr"] for g in clustering} == {0.0005} and {g["weight_decay"] for g in clustering} == {0.0}
    watched = {"student": model.backbone, "predictor": model.predictor, "head": model.student_head,
               "clustering": model.clustering, "teacher": model.teacher_backbone}
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in watched.items()}
    total = 30
    for step in range(3):
        out = model.training_step(batch, Progress(step, total, 0, total))
        for key in ("loss", "capi_loss", "clustering_loss"):
            assert math.isfinite(out[key].item()) and out[key].item() > 0, key
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert all(p.grad is None for p in model.teacher_backbone.parameters())
        optimizer.step()
        model.after_optimizer_step(Progress(step + 4, total, 0, total))  # past the 3-step momentum warm-up
    for name, module in watched.items():
        assert any(not torch.equal(a, p) for a, p in zip(before[name], module.parameters())), name
    metrics = model.epoch_metrics()
    assert metrics["capi/embedding_std"] > 0 and 0.999 < metrics["capi/teacher_momentum"] < 1


def test_the_clustering_loss_only_trains_the_clustering_head(digits):
    cfg, data, batch = digits
    model = build(cfg, data)
    x = model.view(batch.x)
    masks = model.masks(x.shape[0], x.device)
    _, clustering_loss, _ = model.teacher_targets(x, masks.predict)
    clustering_loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.predictor.parameters())
    assert model.clustering.layer.weight.grad.abs().sum() > 0


def test_a_cnn_is_refused_and_bad_settings_are_named(digits):
    cfg, data, _ = digits
    with pytest.raises(ConfigError, match=r"stages\[p\]: CAPI needs a ViT backbone .* got SmallCNN"):
        build(cfg, data, "small_cnn", {"width": 8})
    for key, value, message in [("mask_ratio", 1.0, r"mask_ratio: .*less than 1"),
                                ("crop_scale", [0.8, 0.6], r"crop_scale must satisfy 0 < low <= high <= 1"),
                                ("mask_aspect", [2.0, 0.5], r"mask_aspect must satisfy 0 < low <= high"),
                                ("teacher_temp", 0, r"teacher_temp: .*greater than 0"),
                                ("num_clusters", 1, r"num_clusters: .*greater than or equal to 2"),
                                ("no_such_option", 1, r"no_such_option")]:
        with pytest.raises(ConfigError, match=r"stages\[p\]" + r".*" + message):
            validate_recipe({"stages": [{"name": "p", "method": "capi", key: value}]})


# ---------------------------------------------------------------------------------- two ranks == global batch
def _assignment_worker(rank, world, port, out_dir):
    _set_env(rank, world, port)
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        logits = randn(6, 5, 7, seed=70) * 4  # (B, L, K): 3 images per rank
        torch.save(capi_assignments(logits[rank * 3:(rank + 1) * 3], 0.06, 3), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_position_wise_sinkhorn_over_two_ranks_equals_the_global_batch(tmp_path):
    """Under torchrun each position is balanced over the global batch (the reference's reduced_sum / stable_exp);
    computed per rank alone, the targets differ."""
    ranks = spawn_ranks(_assignment_worker, 2, tmp_path)
    logits = randn(6, 5, 7, seed=70) * 4
    together = torch.cat(ranks)
    torch.testing.assert_close(together, capi_assignments(logits, 0.06, 3), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ranks[0], capi_assignments(logits[:3], 0.06, 3), atol=1e-4)
