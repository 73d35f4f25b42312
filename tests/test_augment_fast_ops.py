"""The fast photometric ops against kornia's reference implementations and the where-based formulation."""
import math

import kornia
import pytest
import torch

from ssl_kit.data import augment as A


def images(n=12, size=20, seed=0):
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[0] = 0.5  # grey: no hue
    x[1, :, :5, :5] = torch.tensor([1.0, 1.0, 0.0]).view(3, 1, 1)  # ties between the max channels
    x[2] = (x[2] * 8).round() / 8  # many exact ties
    return x


@pytest.mark.parametrize("shift", [0.0, 0.13, -0.2, 0.5, -0.5])
def test_adjust_hue_equals_kornias_hsv_round_trip(shift):
    x = images()
    shifts = torch.full((x.shape[0],), shift)
    shifts[3] = -shift / 3
    expected = kornia.enhance.adjust_hue(x, shifts * 2 * math.pi)
    assert torch.allclose(A.adjust_hue(x, shifts), expected, atol=1e-5)


def test_adjust_hue_keeps_value_and_saturation_and_a_full_turn_is_identity():
    x = images()
    y = A.adjust_hue(x, torch.full((x.shape[0],), 0.3))
    assert torch.allclose(y.amax(1), x.amax(1), atol=1e-6) and torch.allclose(y.amin(1), x.amin(1), atol=1e-6)
    assert torch.allclose(A.adjust_hue(x, torch.zeros(x.shape[0])), x, atol=1e-6)
    third = A.adjust_hue(A.adjust_hue(A.adjust_hue(x, torch.full((12,), 1 / 3)), torch.full((12,), 1 / 3)),
                         torch.full((12,), 1 / 3))
    assert torch.allclose(third, x, atol=1e-5)
    pure_red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(A.adjust_hue(pure_red, torch.tensor([1 / 3])).flatten(), torch.tensor([0.0, 1.0, 0.0]))


@pytest.mark.parametrize("kernel", [3, 5, 23])
def test_separable_gaussian_blur_equals_kornia(kernel):
    x = images(size=32)
    sigmas = torch.linspace(0.1, 2.0, x.shape[0])
    expected = kornia.filters.gaussian_blur2d(x, (kernel, kernel), torch.stack([sigmas, sigmas], 1))
    for grouped_conv in (None, True, False):  # the CPU's per-tap sums and the accelerators' grouped convolutions
        assert torch.allclose(A.gaussian_blur(x, kernel, sigmas, grouped_conv), expected, atol=1e-6)


def test_ops_on_selected_rows_equal_computing_every_row_then_choosing():
    """Each random op draws its numbers for every row and computes only the chosen rows: the result equals the
    where-based formulation (compute all, keep the chosen) with the same random numbers."""
    x = images(n=32)
    torch.manual_seed(5)
    got = A.random_blur(x, 0.5)
    torch.manual_seed(5)
    sigmas = torch.rand(32) * 1.9 + 0.1
    chosen = torch.rand(32) < 0.5
    expected = torch.where(chosen.view(-1, 1, 1, 1), A.gaussian_blur(x, 3, sigmas), x)
    assert 0 < chosen.sum() < 32 and torch.allclose(got, expected, atol=1e-7)
    torch.manual_seed(6)
    got = A.random_solarize(x, 0.3)
    torch.manual_seed(6)
    chosen = torch.rand(32) < 0.3
    assert torch.equal(got, torch.where(chosen.view(-1, 1, 1, 1), torch.where(x >= 0.5, 1 - x, x), x))
    torch.manual_seed(7)
    got = A.color_jitter(x, 1.0, 0.5)
    torch.manual_seed(7)
    chosen = torch.rand(32) < 0.5
    b, c, s = (torch.rand(32) * 1.6 + 0.2 for _ in range(3))
    hue = (torch.rand(32) * 0.4 - 0.2).clamp(-0.5, 0.5)
    y = (x * b.view(-1, 1, 1, 1)).clamp(0, 1)
    gray = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)  # noqa: E731
    y = (c.view(-1, 1, 1, 1) * y + (1 - c.view(-1, 1, 1, 1)) * gray(y).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    y = (s.view(-1, 1, 1, 1) * y + (1 - s.view(-1, 1, 1, 1)) * gray(y)).clamp(0, 1)
    y = kornia.enhance.adjust_hue(y, hue * 2 * math.pi).clamp(0, 1)
    assert torch.allclose(got, torch.where(chosen.view(-1, 1, 1, 1), y, x), atol=1e-5)
    assert torch.equal(A.color_jitter(x, 1.0, 0.0), x) and torch.equal(A.random_blur(x, 0.0), x)
