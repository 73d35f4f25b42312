"""The views methods take of a batch, composed from the ops in augment.py and randaugment.py: the weak view
(translate + flip), FixMatch's strong view (weak + RandAugment + Cutout), the contrastive view (random resized crop
+ colour jitter, grayscale, blur, solarize; its crop part runs in the streaming workers on streamed data) and the
final `Normalize`. uint8/float (N, C, H, W) -> normalised float (N, C, S, S)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import StrongAugConfig, ViewsConfig
from .augment import (apply_blur, apply_color_jitter, apply_grayscale, apply_solarize, draw_blur, draw_color_jitter,
                      draw_rows, random_resized_crop, random_translate_flip, to_unit_float)
from .crops import CropSpec
from .photometric_draws import PhotometricDraw
from .randaugment import cutout, rand_augment


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
