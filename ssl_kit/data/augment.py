"""Batched augmentation ops on the training device. Inputs are uint8 or float (N, C, H, W) batches; every op
draws its random parameters per sample from torch's RNG on the batch's device, so a seed fixes the result.

Ops return float images in [0, 1]. RandAugment and Cutout: randaugment.py; the views methods compose from these
ops (weak, strong, contrastive) and `Normalize`: views.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .photometric_draws import BlurDraw, JitterDraw, gaussian_taps


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]; float input is returned as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def uniform(n: int, low: float, high: float, device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def warp(x: Tensor, matrix: Tensor, padding: str, out_size: int | None = None, mode: str = "bilinear") -> Tensor:
    """Sample x (N, C, H, W) through per-sample affine maps matrix (N, 2, 3) in normalised coordinates (`mode`:
    bilinear, bicubic or nearest). -> (N, C, out_size, out_size), or x's size when out_size is None."""
    shape = list(x.shape) if out_size is None else [x.shape[0], x.shape[1], out_size, out_size]
    grid = F.affine_grid(matrix, shape, align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


def random_translate_flip(x: Tensor, max_shift: float, hflip: bool) -> Tensor:
    """Weak view: shift by up to max_shift·size in x and y (reflect padding), optional horizontal flip."""
    n = x.shape[0]
    shift = uniform(2 * n, -2 * max_shift, 2 * max_shift, x.device).view(n, 2)  # normalised coords span 2
    sign = torch.ones(n, device=x.device)
    if hflip:
        sign = torch.where(torch.rand(n, device=x.device) < 0.5, -sign, sign)
    matrix = torch.zeros(n, 2, 3, device=x.device)
    matrix[:, 0, 0] = sign
    matrix[:, 1, 1] = 1.0
    matrix[:, :, 2] = shift
    return warp(x, matrix, "reflection")


def random_resized_crop(x: Tensor, scale: tuple[float, float], ratio=(3 / 4, 4 / 3), hflip: bool = True,
                        out_size: int | None = None) -> Tensor:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio`, resize to out_size (default: the input
    size), optionally flip."""
    n = x.shape[0]
    area = uniform(n, scale[0], scale[1], x.device)
    log_ratio = uniform(n, math.log(ratio[0]), math.log(ratio[1]), x.device)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, device=x.device) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, device=x.device) * 2 - 1) * (1 - height)
    sign = torch.ones(n, device=x.device)
    if hflip:
        sign = torch.where(torch.rand(n, device=x.device) < 0.5, -sign, sign)
    matrix = torch.zeros(n, 2, 3, device=x.device)
    matrix[:, 0, 0] = width * sign
    matrix[:, 1, 1] = height
    matrix[:, 0, 2] = cx
    matrix[:, 1, 2] = cy
    return warp(x, matrix, "border", out_size)


def grayscale(x: Tensor) -> Tensor:
    """(N, C, H, W) -> luma (N, 1, H, W) for 3 channels; 1-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """factor·a + (1 − factor)·b per sample, clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


def contrast_enhance(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance.Contrast per sample: blend towards each image's mean luma by factor (N,) (1 = identity).
    x (N, C, H, W) in [0, 1] -> same, clamped."""
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x), factor)


def color_enhance(x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance.Color (saturation) per sample: blend towards each image's luma by factor (N,) (1 =
    identity); 1-channel images are returned as they are. x (N, C, H, W) in [0, 1] -> same, clamped."""
    return blend(x, grayscale(x).expand_as(x), factor) if x.shape[1] == 3 else x


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images x (N, 3, H, W) in [0, 1] by shift (N,) turns (1 = 360°) in HSV space; value
    and saturation are kept. The HSV round trip in closed form: with h the hue in sixths of a turn, V = max and
    Δ = max − min, channel n ∈ (R, G, B) is V − Δ·clamp(min(k, 4 − k), 0, 1) for k = (h + (5, 3, 1)[n]) mod 6
    — the same result as kornia's rgb→hsv→rgb (within 1e-5), in about half the passes over the image."""
    maxc = x.amax(1)
    delta = maxc - x.amin(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    hue = torch.where(maxc == r, (g - b).div_(safe),
                      torch.where(maxc == g, (b - r).div_(safe).add_(2), (r - g).div_(safe).add_(4)))
    hue.add_((6 * shift + 6).view(-1, 1, 1))  # in (−1, 6) + 6·shift + 6: positive for |shift| ≤ 0.5
    out = torch.empty_like(x)
    for channel, offset in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(hue + offset, 6)
        torch.minimum(k, 4 - k, out=k).clamp_(0, 1)
        torch.addcmul(maxc, delta, k, value=-1, out=out[:, channel])
    return out


def _on_rows(x: Tensor, apply: Tensor, op) -> Tensor:
    """op(x[rows]) written back into a copy of x for the rows where apply (N,) is true; x itself when none is.
    Equal to `where(apply, op(x), x)` for a row-wise op, without computing the rows that keep their input."""
    rows = apply.nonzero().flatten()
    if rows.numel() == 0:
        return x
    if rows.numel() == x.shape[0]:
        return op(x, rows)
    return x.index_copy(0, rows, op(x.index_select(0, rows), rows))


def draw_color_jitter(n: int, channels: int, strength: float, prob: float, device=None) -> Optional[JitterDraw]:
    """SimCLR colour jitter's parameters: brightness/contrast/saturation in [1 − 0.8s, 1 + 0.8s], hue in ±0.2s,
    with prob. Drawn for every row, so the stream of random numbers does not depend on which rows jitter. None when
    jitter is off."""
    if strength == 0 or prob == 0:
        return None
    apply = torch.rand(n, device=device) < prob
    s = 0.8 * strength
    brightness = uniform(n, max(0, 1 - s), 1 + s, device)
    contrast = uniform(n, max(0, 1 - s), 1 + s, device)
    colour = hue = None
    if channels == 3:
        colour = uniform(n, max(0, 1 - s), 1 + s, device)
        hue = uniform(n, -0.2 * strength, 0.2 * strength, device).clamp(-0.5, 0.5)
    return JitterDraw(apply, brightness, contrast, colour, hue)


def apply_color_jitter(x: Tensor, draw: Optional[JitterDraw]) -> Tensor:
    """Brightness, contrast, saturation, hue (in this order, each clamped to [0, 1]) on the rows that drew jitter.
    x: float (N, C, H, W) in [0, 1] -> same."""
    if draw is None:
        return x

    def jitter(rows_x: Tensor, rows: Tensor) -> Tensor:
        y = (rows_x * draw.brightness[rows].view(-1, 1, 1, 1)).clamp(0, 1)
        y = contrast_enhance(y, draw.contrast[rows])
        if draw.colour is not None:
            y = color_enhance(y, draw.colour[rows])
            y = adjust_hue(y, draw.hue[rows]).clamp(0, 1)
        return y

    return _on_rows(x, draw.apply, jitter)


def color_jitter(x: Tensor, strength: float, prob: float) -> Tensor:
    """SimCLR colour jitter of x (N, C, H, W) in [0, 1] (`draw_color_jitter`); only the rows that jitter are
    computed."""
    return apply_color_jitter(x, draw_color_jitter(x.shape[0], x.shape[1], strength, prob, x.device))


def draw_rows(n: int, channels: int, prob: float, device=None) -> Optional[Tensor]:
    """Which of n images an op with probability prob applies to (bool (N,)); None when it never does (prob 0, or
    a grayscale op on 1-channel images: pass channels=3 for ops that do not care)."""
    if channels == 1 or prob == 0:
        return None
    return torch.rand(n, device=device) < prob


def apply_grayscale(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    """Luma replicated over the channels on the rows drawn. x: float (N, 3, H, W) -> same."""
    if rows is None:
        return x
    return _on_rows(x, rows, lambda rows_x, _: grayscale(rows_x).expand_as(rows_x).contiguous())


def random_grayscale(x: Tensor, prob: float) -> Tensor:
    return apply_grayscale(x, draw_rows(x.shape[0], x.shape[1], prob, x.device))


def gaussian_blur(x: Tensor, kernel: int, sigmas: Tensor, grouped_conv: Optional[bool] = None) -> Tensor:
    """Separable Gaussian blur of x (N, C, H, W) with an odd `kernel` and per-sample sigmas (N,), reflect padding
    (kornia's gaussian_blur2d). On an accelerator one grouped vertical and one horizontal convolution; on the CPU,
    where grouped convolutions are slow, a multiply-add per tap on shifted slices (same sums, 1.5-2× less CPU).
    grouped_conv: force one or the other (None: by device)."""
    n, c, h, w = x.shape
    radius = kernel // 2
    weights = gaussian_taps(kernel, sigmas, x.dtype)  # (N, kernel)
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    if x.device.type != "cpu" if grouped_conv is None else grouped_conv:
        per_channel = weights.repeat_interleave(c, 0)  # (N·C, kernel)
        y = F.conv2d(padded.reshape(1, n * c, h + 2 * radius, w + 2 * radius),
                     per_channel.view(n * c, 1, kernel, 1), groups=n * c)
        return F.conv2d(y, per_channel.view(n * c, 1, 1, kernel), groups=n * c).view(n, c, h, w)
    rows = torch.zeros(n, c, h + 2 * radius, w, dtype=x.dtype)
    for tap in range(kernel):
        rows.addcmul_(padded[..., tap:tap + w], weights[:, tap].view(-1, 1, 1, 1))
    out = torch.zeros(n, c, h, w, dtype=x.dtype)
    for tap in range(kernel):
        out.addcmul_(rows[:, :, tap:tap + h], weights[:, tap].view(-1, 1, 1, 1))
    return out


def blur_kernel(size: int) -> int:
    """The blur's kernel for images of side `size`: about 10% of it, odd, at least 3 (23 at 224 px)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def draw_blur(n: int, size: int, prob: float, sigma=(0.1, 2.0), device=None) -> Optional[BlurDraw]:
    """Gaussian blur's parameters: sigma uniform in `sigma` per image, applied with prob; None when prob is 0."""
    if prob == 0:
        return None
    sigmas = uniform(n, sigma[0], sigma[1], device)
    return BlurDraw(sigmas, torch.rand(n, device=device) < prob, blur_kernel(size))


def apply_blur(x: Tensor, draw: Optional[BlurDraw]) -> Tensor:
    if draw is None:
        return x
    return _on_rows(x, draw.apply, lambda rows_x, rows: gaussian_blur(rows_x, draw.kernel, draw.sigma[rows]))


def random_blur(x: Tensor, prob: float, sigma=(0.1, 2.0)) -> Tensor:
    """Gaussian blur with per-sample sigma; kernel ≈ 10% of the image side (odd)."""
    return apply_blur(x, draw_blur(x.shape[0], x.shape[-1], prob, sigma, x.device))


def apply_solarize(x: Tensor, rows: Optional[Tensor], threshold: float = 0.5) -> Tensor:
    """1 − x where x ≥ threshold, on the rows drawn."""
    if rows is None:
        return x
    return _on_rows(x, rows, lambda rows_x, _: torch.where(rows_x >= threshold, 1.0 - rows_x, rows_x))


def random_solarize(x: Tensor, prob: float, threshold: float = 0.5) -> Tensor:
    return apply_solarize(x, draw_rows(x.shape[0], 3, prob, x.device), threshold)
