import pytest
import torch

from ssl_kit.config import StrongAugConfig, ViewsConfig
from ssl_kit.data import augment as A
from ssl_kit.data import randaugment as RA
from ssl_kit.data import views as V


def batch(channels=3, n=8, size=16):
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("channels", [1, 3])
def test_views_shapes_dtypes_and_seed_determinism(channels):
    x = batch(channels)
    normalize = V.Normalize([0.5] * channels, [0.25] * channels)
    views = [V.WeakView(normalize, 0.125, True), V.ContrastiveView.from_config(normalize, ViewsConfig(blur_prob=0.5), True, solarize_prob=0.2),
             V.StrongView(normalize, StrongAugConfig(), 0.125, True)]
    for view in views:
        torch.manual_seed(3)
        first = view(x)
        torch.manual_seed(3)
        second = view(x)
        assert first.shape == (8, channels, 16, 16) and first.dtype == torch.float32
        assert torch.equal(first, second)
        torch.manual_seed(4)
        assert not torch.equal(first, view(x))
        # normalised values of [0, 1] images stay within (0 - 0.5)/0.25 .. (1 - 0.5)/0.25
        assert first.min() >= -2.0 - 1e-5 and first.max() <= 2.0 + 1e-5


def test_weak_view_without_randomness_is_exact_normalisation():
    x = batch(1)
    normalize = V.Normalize([0.5], [0.5])
    assert torch.allclose(V.WeakView(normalize, 0.0, False)(x), (x.float() / 255 - 0.5) / 0.5)


def test_translate_moves_content_by_whole_pixels_at_most_the_limit():
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 8, 8] = 1.0
    torch.manual_seed(0)
    moved = A.random_translate_flip(x.repeat(64, 1, 1, 1), 0.125, hflip=False)
    peaks = moved.flatten(1).argmax(1)
    rows, cols = peaks // 16, peaks % 16
    assert (rows - 8).abs().max() <= 2 and (cols - 8).abs().max() <= 2
    assert len(set(peaks.tolist())) > 5


def test_rand_augment_output_range_and_per_sample_ops():
    x = torch.rand(64, 3, 16, 16)
    torch.manual_seed(1)
    y = RA.rand_augment(x, num_ops=2, magnitude_max=1.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    changed = (y - x).abs().flatten(1).amax(1) > 1e-6
    assert 0 < changed.sum() < 64 or changed.all()  # some samples may draw identity twice
    for name, op in RA.RANDAUGMENT_OPS.items():
        out = op(x, torch.full((64,), 0.5))
        assert out.shape == x.shape and out.min() >= -1e-6 and out.max() <= 1 + 1e-6, name


def test_cutout_fills_a_square_with_gray():
    x = torch.zeros(32, 1, 16, 16)
    torch.manual_seed(0)
    y = RA.cutout(x, 0.5, fill=0.5)
    filled = (y == 0.5).flatten(1).sum(1)
    assert filled.max() <= 8 * 8 + 2 * 8 + 1 and filled.sum() > 0


def test_grayscale_for_gray_input_is_identity():
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(A.random_grayscale(x, 1.0), x)
    assert A.color_jitter(x, 0.5, 1.0).shape == x.shape


def _rand_augment_op_by_op(x, num_ops, magnitude_max):
    """The previous RandAugment: every op applied in turn to the rows that drew it (reference for the fast path)."""
    names = list(RA.RANDAUGMENT_OPS)
    out = x.clone()
    n = x.shape[0]
    for _ in range(num_ops):
        choice = torch.randint(len(names), (n,))
        magnitude = torch.rand(n) * (max(0.05, magnitude_max) - 0.05) + 0.05
        for op_index in torch.unique(choice).tolist():
            rows = (choice == op_index).nonzero().squeeze(1)
            if names[op_index] != "identity":
                out[rows] = RA.RANDAUGMENT_OPS[names[op_index]](out[rows], magnitude[rows]).clamp(0, 1)
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_rand_augment_fast_path_equals_op_by_op(channels):
    """Grouped rows and one warp for all geometric rows of a round: the same images as applying each op in turn
    (same random draws, same order)."""
    x = torch.rand(96, channels, 12, 12)
    torch.manual_seed(3)
    fast = RA.rand_augment(x, num_ops=3, magnitude_max=0.9)
    torch.manual_seed(3)
    reference = _rand_augment_op_by_op(x, num_ops=3, magnitude_max=0.9)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-6)
    assert not torch.equal(fast, x)


def test_cutout_masked_fill_matches_where():
    x = torch.rand(32, 3, 10, 10)
    torch.manual_seed(5)
    y = RA.cutout(x, 0.5, fill=0.25)
    torch.manual_seed(5)
    n, _, h, w = x.shape
    side, cy, cx = torch.rand(n) * 0.5 * 10, torch.rand(n) * h, torch.rand(n) * w
    ys, xs = torch.arange(h).view(1, h, 1) + 0.5, torch.arange(w).view(1, 1, w) + 0.5
    inside = ((ys - cy.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2) & \
        ((xs - cx.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2)
    assert torch.equal(y, torch.where(inside.unsqueeze(1), torch.full_like(x, 0.25), x))
