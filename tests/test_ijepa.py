"""I-JEPA: the multi-block mask sampler (block shapes within the stated scale/aspect ranges, targets disjoint from the
context, reproducible from a seed), the loss against its formula computed by hand (values and gradients), the
predictor's shapes and block-by-block prediction, the linear EMA of the target encoder, bad settings named, the
refusal of a CNN, and a few optimizer steps on the method's own defaults on digits with a tiny ViT."""
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from ssl_kit.config import validate_recipe
from ssl_kit.data.loader import Batch
from ssl_kit.data.pipeline import prepare_data
from ssl_kit.engine.optim import build_optimizer
from ssl_kit.errors import ConfigError
from ssl_kit.losses import ijepa_loss
from ssl_kit.methods import build_method
from ssl_kit.methods.base import Progress
from ssl_kit.methods.ijepa import predictor_shape, sample_multiblock_masks
from ssl_kit.models.jepa_predictor import JEPAPredictor
from ssl_kit.models.registry import build_backbone

TINY_VIT = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}
PAPER = dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cells(index: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major patch numbers -> (rows, columns)."""
    return index // grid, index % grid


# ---------------------------------------------------------------------------------------------------- masks
def test_blocks_have_the_papers_scales_and_aspect_ratios_and_are_rectangles():
    """On a 32 x 32 grid, where rounding to whole patches moves a side by at most half a patch: every target block is
    an h x w rectangle with h·w / L in (0.15, 0.2) and h / w in (0.75, 1.5), the context block a square of area
    (0.85, 1.0), each up to that rounding; both ranges are covered, not a single value."""
    grid, patches = 32, 32 * 32
    side = 1 / 16  # relative tolerance of a side: half a patch of the shortest side (10) plus the area's floor
    areas, aspects = [], []
    for seed in range(30):
        masks = sample_multiblock_masks(3, grid, min_context=1, generator=generator(seed), **PAPER)
        h, w = masks.target_shape
        areas.append(h * w / patches)
        aspects.append(h / w)
        assert 0.15 * (1 - side) ** 2 <= h * w / patches <= 0.2 * (1 + side) ** 2
        assert 0.75 * (1 - side) / (1 + side) <= h / w <= 1.5 * (1 + side) / (1 - side)
        ch, cw = masks.context_shape
        assert ch == cw and 0.85 * (1 - 1 / 29) ** 2 <= ch * cw / patches <= 1.0
        rows, cols = cells(masks.targets, grid)  # (3, 4, h·w) each
        assert masks.targets.shape == (3, 4, h * w)
        span_rows = rows.amax(-1) - rows.amin(-1) + 1
        span_cols = cols.amax(-1) - cols.amin(-1) + 1
        assert (span_rows == h).all() and (span_cols == w).all()  # h·w distinct cells spanning h x w: the rectangle
        ctx_rows, ctx_cols = cells(masks.context, grid)
        assert (ctx_rows.amax(-1) - ctx_rows.amin(-1) < ch).all() and (ctx_cols.amax(-1) - ctx_cols.amin(-1) < cw).all()
    assert max(areas) - min(areas) > 0.025 and max(aspects) - min(aspects) > 0.4


@pytest.mark.parametrize("grid", [4, 8, 14])
def test_targets_are_disjoint_from_the_context_which_keeps_its_minimum(grid):
    for seed in range(10):
        minimum = max(1, math.ceil(0.04 * grid * grid))
        masks = sample_multiblock_masks(16, grid, min_context=minimum, generator=generator(seed), **PAPER)
        context, targets = masks.context, masks.targets
        assert context.shape[0] == 16 and context.shape[1] >= minimum
        assert (context.diff(dim=1) > 0).all() and (targets.diff(dim=2) > 0).all()  # ascending, no repeats
        assert 0 <= int(context.min()) and int(context.max()) < grid * grid
        overlap = (context[:, :, None, None] == targets[:, None]).any(dim=(1, 2, 3))
        assert not overlap.any(), f"grid {grid}, seed {seed}: a context patch is also a target"


def test_the_same_seed_gives_the_same_masks_and_another_seed_other_ones():
    first = sample_multiblock_masks(8, 14, min_context=8, generator=generator(3), **PAPER)
    again = sample_multiblock_masks(8, 14, min_context=8, generator=generator(3), **PAPER)
    other = sample_multiblock_masks(8, 14, min_context=8, generator=generator(4), **PAPER)
    assert torch.equal(first.context, again.context) and torch.equal(first.targets, again.targets)
    assert first.target_shape == again.target_shape and first.context_shape == again.context_shape
    assert not (first.targets.shape == other.targets.shape and torch.equal(first.targets, other.targets))
    torch.manual_seed(11)  # without a generator: the global stream the trainer seeds
    seeded = sample_multiblock_masks(8, 14, min_context=8, **PAPER)
    torch.manual_seed(11)
    assert torch.equal(seeded.targets, sample_multiblock_masks(8, 14, min_context=8, **PAPER).targets)


def test_targets_that_cover_the_whole_context_are_refused_clearly():
    with pytest.raises(ConfigError, match=r"target blocks .* covered every patch .* lower num_targets or target_scale"):
        sample_multiblock_masks(2, 4, num_targets=1, target_scale=(1.0, 1.0), target_aspect=(1.0, 1.0))


# ----------------------------------------------------------------------------------------------------- loss
def naive_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, beta: float = 1.0) -> torch.Tensor:
    """The formula element by element: targets standardised per token over D (biased variance, eps 1e-5), then the
    Huber (smooth L1) or squared error, averaged over every element."""
    mean = target.mean(dim=-1, keepdim=True)
    var = ((target - mean) ** 2).mean(dim=-1, keepdim=True)
    normalised = ((target - mean) / torch.sqrt(var + 1e-5)).detach()
    diff = pred - normalised
    if kind == "l2":
        return (diff ** 2).mean()
    return torch.where(diff.abs() < beta, 0.5 * diff ** 2 / beta, diff.abs() - 0.5 * beta).mean()


@pytest.mark.parametrize("kind, beta", [("smooth_l1", 1.0), ("smooth_l1", 0.3), ("l2", 1.0)])
def test_loss_equals_the_formula_in_value_and_gradient(kind, beta):
    torch.manual_seed(0)
    pred = (torch.randn(3, 4, 5, 8) * 1.5).requires_grad_(True)
    target = (torch.randn(3, 4, 5, 8) * 3 + 2).requires_grad_(True)
    ours = ijepa_loss(pred, target, kind, beta)
    expected = naive_loss(pred, target, kind, beta)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    grad, = torch.autograd.grad(ours, pred)
    expected_grad, = torch.autograd.grad(expected, pred)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)
    assert ours.item() > 0.1  # a real value, not a degenerate zero
    ijepa_loss(pred, target, kind, beta).backward()
    assert target.grad is None  # the targets are constants: no gradient reaches the target encoder


def test_loss_is_zero_for_the_normalised_targets_themselves():
    target = torch.randn(2, 3, 6) * 4 + 1
    normalised = torch.nn.functional.layer_norm(target, (6,))
    assert ijepa_loss(normalised, target).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(2, 3), torch.zeros(2, 4)), r"predictions and targets must have the same shape"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), "l1"), r"loss must be one of \('smooth_l1', 'l2'\), got 'l1'"),
    ((torch.zeros(2, 3), torch.zeros(2, 3), "smooth_l1", 0.0), r"beta must be a number > 0, got 0.0"),
    ((torch.zeros(4), torch.zeros(4)), r"predictions must be a non-empty \(\.\.\., D\) tensor"),
])
def test_bad_loss_arguments_are_named(args, message):
    with pytest.raises(ValueError, match=message):
        ijepa_loss(*args)


# ------------------------------------------------------------------------------------------------ predictor
def test_predictor_shapes_and_each_block_is_predicted_from_the_context_alone():
    torch.manual_seed(0)
    predictor = JEPAPredictor(encoder_dim=32, grid=4, dim=16, depth=2, heads=2)
    context = torch.randn(3, 5, 32)
    context_index = torch.tensor([[0, 1, 2, 3, 4]] * 3)
    targets = torch.tensor([[[8, 9], [12, 13], [10, 11]]] * 3)
    out = predictor(context, context_index, targets)
    assert out.shape == (3, 3, 2, 32) and torch.isfinite(out).all()
    moved = targets.clone()
    moved[:, 2] = torch.tensor([14, 15])  # another position for block 2 only
    again = predictor(context, context_index, moved)
    torch.testing.assert_close(again[:, :2], out[:, :2])  # blocks 0 and 1 do not see block 2's mask tokens
    assert not torch.allclose(again[:, 2], out[:, 2])  # block 2 reads its own positions
    shifted = predictor(context, context_index[:, [1, 0, 2, 3, 4]], targets)
    assert not torch.allclose(shifted, out)  # the context tokens carry their patches' positions


def test_predictor_defaults_follow_the_papers_vit_b16_proportions():
    def encoder(dim, depth, heads):
        return SimpleNamespace(num_features=dim, depth=depth, blocks=[SimpleNamespace(heads=heads)])

    stage = validate_recipe({"stages": [{"name": "p", "method": "ijepa"}]}).stages[0]
    assert predictor_shape(stage, encoder(768, 12, 12)) == (384, 6, 12)  # the paper's ViT-B/16 predictor
    assert predictor_shape(stage, encoder(32, 2, 2)) == (16, 1, 2)
    assert predictor_shape(stage, encoder(192, 12, 3)) == (96, 6, 3)  # a multiple of 4 and of 3 heads
    given = stage.model_copy(update={"predictor_dim": 24, "predictor_depth": 3, "predictor_heads": 3})
    assert predictor_shape(given, encoder(768, 12, 12)) == (24, 3, 3)
    with pytest.raises(ConfigError, match=r"stages\[p\]\.predictor_dim 20 must be a multiple of 4 .* 3 predictor"):
        predictor_shape(given.model_copy(update={"predictor_dim": 20}), encoder(768, 12, 12))


# --------------------------------------------------------------------------------------------------- method
@pytest.fixture(scope="module")
def digits():
    cfg = validate_recipe({"seed": 0, "stages": [{"name": "p", "method": "ijepa", "backbone": {"name": "vit_tiny"},
                                                  "data": {"dataset": "digits", "image_size": 16}}]}).stages[0]
    data = prepare_data(cfg.data, 0)
    return cfg, data, Batch(x=data.train.images[:16], y=data.train.labels[:16])


def build(cfg, data, backbone: str = "vit_tiny", kwargs=None):
    """The method on a tiny backbone (seed 0); a ViT without global_pool draws the [cls] warning."""
    kwargs = kwargs or TINY_VIT
    torch.manual_seed(0)
    warned = backbone == "vit_tiny" and not kwargs.get("global_pool")
    with pytest.warns(UserWarning, match="global_pool: true") if warned else contextlib.nullcontext():
        return build_method("ijepa")(cfg, build_backbone(backbone, 1, 16, kwargs), data.info)


def test_the_target_encoder_follows_the_context_encoder_on_a_linear_ramp(digits):
    cfg, data, _ = digits
    model = build(cfg, data)
    (online, target), = model.momentum_pairs()
    assert online is model.backbone and target is model.target_encoder and model.get_backbone() is target
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    model.after_optimizer_step(Progress(step=5, total_steps=20, epoch=0, steps_per_epoch=20))
    m = 0.996 + (1 - 0.996) * 5 / 20  # the paper: linear from 0.996 to 1
    assert model.current_momentum == pytest.approx(m)
    for o, t, t0 in zip(online.parameters(), target.parameters(), before):
        torch.testing.assert_close(t, m * t0 + (1 - m) * o, atol=1e-6, rtol=1e-6)
    model.after_optimizer_step(Progress(step=20, total_steps=20, epoch=0, steps_per_epoch=20))
    assert model.current_momentum == 1.0


def test_the_method_trains_on_its_defaults_with_a_tiny_vit(digits):
    """Three steps with nothing but the method named (its reference optimizer via `recommended`): finite losses,
    the context encoder and the predictor move, the target encoder follows, the collapse watch reports."""
    cfg, data, batch = digits
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.base_batch_size) == ("adamw", 0.001, 2048)
    model = build(cfg, data)
    model.train()
    assert not model.target_encoder.training  # targets without stochastic depth
    optimizer = build_optimizer(model.parameter_groups(), cfg.optimizer, 16)
    watched = {"context": model.backbone, "predictor": model.predictor, "target": model.target_encoder}
    before = {name: [p.detach().clone() for p in module.parameters()] for name, module in watched.items()}
    for step in range(3):
        out = model.training_step(batch, Progress(step, 3, 0, 3))
        assert math.isfinite(out["ijepa_loss"].item()) and out["ijepa_loss"].item() > 0
        assert out["probe_loss"].item() > 0 and 0 < out["ijepa/context_fraction"].item() < 1
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert all(p.grad is None for p in model.target_encoder.parameters())
        optimizer.step()
        model.after_optimizer_step(Progress(step, 3, 0, 3))
    for name, module in watched.items():
        assert any(not torch.equal(a, p) for a, p in zip(before[name], module.parameters())), name
    metrics = model.epoch_metrics()
    assert metrics["ijepa/embedding_std"] > 0 and metrics["ijepa/target_momentum"] > 0.996


def test_a_cnn_is_refused_and_bad_settings_are_named(digits):
    cfg, data, _ = digits
    with pytest.raises(ConfigError, match=r"stages\[p\]: I-JEPA needs a ViT backbone .* got SmallCNN"):
        build(cfg, data, "small_cnn", {"width": 8})
    for key, value, message in [("target_scale", [0.3, 0.2], r"target_scale must satisfy 0 < low <= high <= 1"),
                                ("target_aspect", [0.0, 1.0], r"target_aspect must satisfy 0 < low <= high"),
                                ("context_scale", [0.5, 1.2], r"context_scale must satisfy"),
                                ("num_targets", 0, r"num_targets: .*greater than or equal to 1")]:
        with pytest.raises(ConfigError, match=r"stages\[p\]" + r".*" + message):
            validate_recipe({"stages": [{"name": "p", "method": "ijepa", key: value}]})
