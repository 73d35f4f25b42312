"""Batched augmentation on the training device. Inputs are uint8 or float (N, C, H, W) batches; every op
draws its random parameters per sample from torch's RNG on the batch's device, so a seed fixes the result.

Ops return float images in [0, 1]; `Normalize` comes last.
"""
from __future__ import annotations

import math
from typing import Optional

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import StrongAugConfig, ViewsConfig
from .crops import CropSpec
from .photometric_draws import BlurDraw, JitterDraw, PhotometricDraw, gaussian_taps


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]; float input is returned as float32."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _uniform(n: int, low: float, high: float, device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _warp(x: Tensor, matrix: Tensor, padding: str, out_size: int | None = None) -> Tensor:
    """Sample x (N, C, H, W) through per-sample affine maps matrix (N, 2, 3) in normalised coordinates.
    -> (N, C, out_size, out_size), or x's size when out_size is None."""
    shape = list(x.shape) if out_size is None else [x.shape[0], x.shape[1], out_size, out_size]
    grid = F.affine_grid(matrix, shape, align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def random_translate_flip(x: Tensor, max_shift: float, hflip: bool) -> Tensor:
    """Weak view: shift by up to max_shift·size in x and y (reflect padding), optional horizontal flip."""
    n = x.shape[0]
    shift = _uniform(2 * n, -2 * max_shift, 2 * max_shift, x.device).view(n, 2)  # normalised coords span 2
    sign = torch.ones(n, device=x.device)
    if hflip:
        sign = torch.where(torch.rand(n, device=x.device) < 0.5, -sign, sign)
    matrix = torch.zeros(n, 2, 3, device=x.device)
    matrix[:, 0, 0] = sign
    matrix[:, 1, 1] = 1.0
    matrix[:, :, 2] = shift
    return _warp(x, matrix, "reflection")


def random_resized_crop(x: Tensor, scale: tuple[float, float], ratio=(3 / 4, 4 / 3), hflip: bool = True,
                        out_size: int | None = None) -> Tensor:
    """Crop a random area fraction in `scale` with aspect ratio in `ratio`, resize to out_size (default: the input
    size), optionally flip."""
    n = x.shape[0]
    area = _uniform(n, scale[0], scale[1], x.device)
    log_ratio = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), x.device)
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
    return _warp(x, matrix, "border", out_size)


def grayscale(x: Tensor) -> Tensor:
    """(N, C, H, W) -> luma (N, 1, H, W) for 3 channels; 1-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """factor·a + (1 − factor)·b per sample, clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1 - f) * b).clamp(0, 1)


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
    brightness = _uniform(n, max(0, 1 - s), 1 + s, device)
    contrast = _uniform(n, max(0, 1 - s), 1 + s, device)
    colour = hue = None
    if channels == 3:
        colour = _uniform(n, max(0, 1 - s), 1 + s, device)
        hue = _uniform(n, -0.2 * strength, 0.2 * strength, device).clamp(-0.5, 0.5)
    return JitterDraw(apply, brightness, contrast, colour, hue)


def apply_color_jitter(x: Tensor, draw: Optional[JitterDraw]) -> Tensor:
    """Brightness, contrast, saturation, hue (in this order, each clamped to [0, 1]) on the rows that drew jitter.
    x: float (N, C, H, W) in [0, 1] -> same."""
    if draw is None:
        return x

    def jitter(rows_x: Tensor, rows: Tensor) -> Tensor:
        y = (rows_x * draw.brightness[rows].view(-1, 1, 1, 1)).clamp(0, 1)
        y = _blend(y, grayscale(y).mean(dim=(1, 2, 3), keepdim=True).expand_as(y), draw.contrast[rows])
        if draw.colour is not None:
            y = _blend(y, grayscale(y).expand_as(y), draw.colour[rows])
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
    sigmas = _uniform(n, sigma[0], sigma[1], device)
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


class Normalize(torch.nn.Module):
    """(x − mean) / std per channel; mean, std: sequences of length C."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (to_unit_float(x) - self.mean.to(x.device)) / self.std.to(x.device)


class WeakView(torch.nn.Module):
    """uint8 (N, C, H, W) -> normalised float: random translate (+ flip)."""

    def __init__(self, normalize: Normalize, translate: float, hflip: bool) -> None:
        super().__init__()
        self.normalize, self.translate, self.hflip = normalize, translate, hflip

    def forward(self, x: Tensor) -> Tensor:
        y = to_unit_float(x)
        if self.translate > 0 or self.hflip:
            y = random_translate_flip(y, self.translate, self.hflip)
        return self.normalize(y)


class ContrastiveView(torch.nn.Module):
    """SimCLR / MoCo / BYOL / DINO view, every strength an explicit keyword (lightly's transforms are the model):
    random resized crop (`crop_scale`, `crop_ratio`, `out_size`: None keeps the input size), horizontal flip
    (`hflip`), colour jitter (`jitter_prob`, `jitter_strength` s: brightness/contrast/saturation 0.8·s, hue 0.2·s),
    grayscale (`grayscale_prob`), Gaussian blur (`blur_prob`), solarize (`solarize_prob`); then normalise."""

    def __init__(self, normalize: Normalize, *, crop_scale: tuple[float, float] = (0.2, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), out_size: int | None = None, hflip: bool = True,
                 jitter_prob: float = 0.8, jitter_strength: float = 0.5, grayscale_prob: float = 0.2,
                 blur_prob: float = 0.0, solarize_prob: float = 0.0) -> None:
        super().__init__()
        self.normalize = normalize
        self.crop_scale, self.crop_ratio, self.out_size, self.hflip = tuple(crop_scale), tuple(crop_ratio), out_size, hflip
        self.jitter_prob, self.jitter_strength, self.grayscale_prob = jitter_prob, jitter_strength, grayscale_prob
        self.blur_prob, self.solarize_prob = blur_prob, solarize_prob

    @classmethod
    def from_config(cls, normalize: Normalize, views: ViewsConfig, hflip: bool, **overrides) -> "ContrastiveView":
        """A view with a recipe's `views` strengths (crop scale, jitter, grayscale, blur; no solarize unless given),
        any keyword overriding them."""
        kwargs = dict(crop_scale=views.crop_scale, jitter_prob=views.jitter_prob,
                      jitter_strength=views.jitter_strength, grayscale_prob=views.grayscale_prob,
                      blur_prob=views.blur_prob, hflip=hflip)
        return cls(normalize, **{**kwargs, **overrides})

    def crop_spec(self, image_size: int) -> CropSpec:
        """The geometry of this view for streamed data, where DataLoader workers cut (and flip) the crop."""
        return CropSpec(self.out_size or image_size, self.crop_scale, self.crop_ratio, flip=self.hflip)

    def draw_photometric(self, n: int, channels: int, size: int, device=None) -> PhotometricDraw:
        """The random numbers of the photometric part for n images of `channels` × size × size."""
        return PhotometricDraw(draw_color_jitter(n, channels, self.jitter_strength, self.jitter_prob, device),
                               draw_rows(n, channels, self.grayscale_prob, device),
                               draw_blur(n, size, self.blur_prob, device=device),
                               draw_rows(n, 3, self.solarize_prob, device))

    def photometric(self, y: Tensor) -> Tensor:
        """The photometric part: colour jitter, grayscale, blur, solarize. float (N, C, S, S) in [0, 1] -> same."""
        draw = self.draw_photometric(y.shape[0], y.shape[1], y.shape[-1], y.device)
        y = apply_color_jitter(y, draw.jitter)
        y = apply_grayscale(y, draw.grayscale)
        y = apply_blur(y, draw.blur)
        return apply_solarize(y, draw.solarize)

    def photometric_uint8(self, x: Tensor, backend: str = "auto") -> Tensor:
        """What a streaming worker hands over when it runs the photometric part (`data.photometric: workers`):
        uint8 (N, C, S, S) crops -> uint8 (N, C, S, S), rounded once to the nearest level. backend `opencv`: the
        same ops with the same random numbers, image by image with OpenCV's float32 kernels (6-7× less CPU than
        the batched torch ops; equal before rounding within 1e-4); `torch`: the batched ops; `auto`: OpenCV for CPU
        tensors."""
        if backend == "opencv" or (backend == "auto" and x.device.type == "cpu"):
            # deferred: heavy optional import (cv2; photometric_cv sets its threads), only where it runs
            from .photometric_cv import photometric_uint8_cv
            return photometric_uint8_cv(x, self.draw_photometric(x.shape[0], x.shape[1], x.shape[-1]))
        return self.photometric(to_unit_float(x)).mul_(255).round_().to(torch.uint8)

    def forward(self, x: Tensor, precropped: bool = False, augmented: bool = False) -> Tensor:
        """uint8 (N, C, H, W) -> normalised float (N, C, out_size, out_size). `precropped`: x is this view's crop
        already cut and flipped by the streaming workers; only the photometric part runs. `augmented`: the workers
        ran the photometric part too (`photometric_uint8`); only normalisation is left."""
        y = to_unit_float(x)
        if augmented:
            return self.normalize(y)
        if not precropped:
            y = random_resized_crop(y, self.crop_scale, self.crop_ratio, hflip=self.hflip, out_size=self.out_size)
        return self.normalize(self.photometric(y))


# ---------------------------------------------------------------------------------- RandAugment
def _autocontrast(x: Tensor, m: Tensor) -> Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(high > low, 1.0 / (high - low).clamp_min(1e-6), torch.ones_like(high))
    return ((x - low) * scale).clamp(0, 1)


def _equalize(x: Tensor, m: Tensor) -> Tensor:
    return kornia.enhance.equalize(x)


def _brightness(x: Tensor, m: Tensor) -> Tensor:
    return (x * _signed_factor(m).view(-1, 1, 1, 1)).clamp(0, 1)


def _color(x: Tensor, m: Tensor) -> Tensor:
    return _blend(x, grayscale(x).expand_as(x), _signed_factor(m)) if x.shape[1] == 3 else x


def _contrast(x: Tensor, m: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), _signed_factor(m))


def _sharpness(x: Tensor, m: Tensor) -> Tensor:
    return kornia.enhance.sharpness(x, _signed_factor(m)).clamp(0, 1)


def _posterize(x: Tensor, m: Tensor) -> Tensor:
    bits = (8 - (m * 4).round()).clamp(4, 8)  # 8..4 bits kept
    return kornia.enhance.posterize(x, bits)


def _solarize(x: Tensor, m: Tensor) -> Tensor:
    threshold = (1.0 - m).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 1.0 - x, x)


def _signed_factor(m: Tensor) -> Tensor:
    """Magnitude m in [0, 1] -> enhancement factor 1 ± 0.9·m with a random sign (identity at m = 0)."""
    sign = torch.where(torch.rand_like(m) < 0.5, -1.0, 1.0)
    return 1.0 + sign * 0.9 * m


def _geometric_matrix(kind: str, m: Tensor, sign: Tensor) -> Tensor:
    """The affine map (N, 2, 3), in normalised coordinates, of geometric op `kind` with magnitudes m (N,) in [0, 1]
    and directions sign (N,) ±1: rotate up to 30°, shear up to 0.3, translate up to 30% of the size."""
    n = m.shape[0]
    matrix = torch.zeros(n, 2, 3, device=m.device)
    matrix[:, 0, 0] = 1.0
    matrix[:, 1, 1] = 1.0
    if kind == "rotate":  # up to 30 degrees
        angle = sign * m * math.radians(30)
        matrix[:, 0, 0], matrix[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        matrix[:, 1, 0], matrix[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif kind == "shear_x":
        matrix[:, 0, 1] = sign * m * 0.3
    elif kind == "shear_y":
        matrix[:, 1, 0] = sign * m * 0.3
    elif kind == "translate_x":  # up to 30% of the size
        matrix[:, 0, 2] = sign * m * 0.6
    else:
        matrix[:, 1, 2] = sign * m * 0.6
    return matrix


def _random_sign(n: int, device) -> Tensor:
    return torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)


def _geometric(kind: str):
    def op(x: Tensor, m: Tensor) -> Tensor:
        return _warp(x, _geometric_matrix(kind, m, _random_sign(x.shape[0], x.device)), "zeros")

    return op


GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
RANDAUGMENT_OPS = {
    "identity": lambda x, m: x,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "color": _color,
    "contrast": _contrast,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _geometric("rotate"),
    "shear_x": _geometric("shear_x"),
    "shear_y": _geometric("shear_y"),
    "translate_x": _geometric("translate_x"),
    "translate_y": _geometric("translate_y"),
}


def rand_augment(x: Tensor, num_ops: int, magnitude_max: float) -> Tensor:
    """RandAugment as in FixMatch: each sample gets `num_ops` ops drawn uniformly, each with its own magnitude
    in [0.05, magnitude_max]. x: float (N, C, H, W) in [0, 1] -> same shape, in [0, 1].

    Each op runs only on the rows that drew it; within a round the rows that drew any geometric op are warped in
    one `grid_sample` call (their maps stacked), with the random directions drawn op by op in the same order as
    applying the ops one at a time, so the result equals `RANDAUGMENT_OPS[op](rows, m)` op by op."""
    names = list(RANDAUGMENT_OPS)
    out = x.clone()
    n = x.shape[0]
    for _ in range(num_ops):
        choice = torch.randint(len(names), (n,), device=x.device)
        magnitude = _uniform(n, 0.05, max(0.05, magnitude_max), x.device)
        order = torch.argsort(choice, stable=True)
        counts = torch.bincount(choice, minlength=len(names)).tolist()
        geometric_rows, matrices = [], []
        for name, rows in zip(names, order.split(counts)):
            if rows.numel() == 0 or name == "identity":
                continue
            m = magnitude.index_select(0, rows)
            if name in GEOMETRIC_OPS:
                matrices.append(_geometric_matrix(name, m, _random_sign(rows.numel(), x.device)))
                geometric_rows.append(rows)
            else:
                out.index_copy_(0, rows, RANDAUGMENT_OPS[name](out.index_select(0, rows), m).clamp(0, 1))
        if geometric_rows:
            rows = torch.cat(geometric_rows)
            out.index_copy_(0, rows, _warp(out.index_select(0, rows), torch.cat(matrices), "zeros").clamp(0, 1))
    return out


def cutout(x: Tensor, max_fraction: float, fill: float = 0.5) -> Tensor:
    """Fill a square of side U(0, max_fraction)·size at a uniformly random centre with `fill`, per sample."""
    if max_fraction <= 0:
        return x
    n, _, h, w = x.shape
    side = torch.rand(n, device=x.device) * max_fraction * min(h, w)
    cy = torch.rand(n, device=x.device) * h
    cx = torch.rand(n, device=x.device) * w
    ys = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    inside = ((ys - cy.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2) & \
             ((xs - cx.view(-1, 1, 1)).abs() <= side.view(-1, 1, 1) / 2)
    return x.masked_fill(inside.unsqueeze(1), fill)


class StrongView(torch.nn.Module):
    """FixMatch strong view: weak translate/flip, RandAugment, Cutout; then normalise."""

    def __init__(self, normalize: Normalize, cfg: StrongAugConfig, translate: float, hflip: bool) -> None:
        super().__init__()
        self.normalize, self.cfg, self.translate, self.hflip = normalize, cfg, translate, hflip

    def forward(self, x: Tensor) -> Tensor:
        y = random_translate_flip(to_unit_float(x), self.translate, self.hflip)
        y = rand_augment(y, self.cfg.num_ops, self.cfg.magnitude_max)
        y = cutout(y, self.cfg.cutout)
        return self.normalize(y)
