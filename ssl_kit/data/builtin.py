"""Builtin offline datasets: scikit-learn digits, digits rendered from fonts, rotated digits."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..errors import DataError
from .imageset import ImageSet

DIGIT_CLASSES = [str(i) for i in range(10)]
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0  # fixed: every run sees the same train/test split of digits


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split -> (train_index, test_index); `fraction` of each class goes to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(index) * fraction))
        test.append(index[:n_test])
        train.append(index[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split(images: torch.Tensor, labels: np.ndarray, name: str, fraction: float, seed: int) -> dict[str, ImageSet]:
    train_index, test_index = stratified_holdout(labels, fraction, seed)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return {
        "train": ImageSet(images[train_index], labels_t[train_index], DIGIT_CLASSES, f"{name}/train"),
        "test": ImageSet(images[test_index], labels_t[test_index], DIGIT_CLASSES, f"{name}/test"),
    }


@functools.lru_cache(maxsize=4)
def _digits_arrays() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits  # deferred: heavy optional import (scikit-learn, ~1 s), digits only

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    return torch.from_numpy(images), bunch.target.astype(np.int64)


def load_digits_dataset() -> dict[str, ImageSet]:
    """scikit-learn's 1797 8×8 digits (ink = bright), fixed stratified 75/25 train/test split."""
    images, labels = _digits_arrays()
    return _split(images, labels, "digits", DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)


def rotate_images(images: torch.Tensor, angle: float, size: int = 32) -> torch.Tensor:
    """uint8 (N, C, h, w) -> uint8 (N, C, size, size), upsampled then rotated counter-clockwise by `angle` degrees."""
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
    theta = torch.tensor(np.deg2rad(angle), dtype=torch.float32)
    cos, sin = torch.cos(theta), torch.sin(theta)
    matrix = torch.stack([torch.stack([cos, sin, torch.zeros(())]), torch.stack([-sin, cos, torch.zeros(())])])
    grid = F.affine_grid(matrix.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    rotated = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated.round().clamp(0, 255).to(torch.uint8)


def load_rotated_digits(angle: float) -> dict[str, ImageSet]:
    """The digits split of `load_digits_dataset`, every image rotated by `angle` degrees (RotatedMNIST-style)."""
    images, labels = _digits_arrays()
    return _split(rotate_images(images, angle), labels, f"digits-rotated:{angle:g}", DIGITS_TEST_FRACTION,
                  DIGITS_SPLIT_SEED)


def candidate_font_files() -> list[Path]:
    """TrueType fonts matplotlib ships plus the system's (Debian font packages), sorted for determinism."""
    # deferred: heavy optional import (matplotlib), only to render digits-printed
    import matplotlib
    from matplotlib import font_manager  # deferred: as above

    shipped = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = set(shipped.glob("*.ttf"))
    for path in font_manager.findSystemFonts(fontext="ttf"):
        paths.add(Path(path))
    return sorted(p for p in paths if p.suffix.lower() in (".ttf", ".otf"))


def _render(font: ImageFont.FreeTypeFont, digit: str, canvas: int, stroke: int, dx: float, dy: float) -> np.ndarray:
    image = Image.new("L", (canvas * 2, canvas * 2), 0)
    draw = ImageDraw.Draw(image)
    draw.text((canvas, canvas), digit, font=font, fill=255, anchor="mm", stroke_width=stroke, stroke_fill=255)
    box = image.getbbox()
    if box is None:
        return np.zeros((canvas, canvas), np.uint8)
    glyph = image.crop(box)
    out = Image.new("L", (canvas, canvas), 0)
    out.paste(glyph, (int(round((canvas - glyph.width) / 2 + dx)), int(round((canvas - glyph.height) / 2 + dy))))
    return np.asarray(out)


def _font_draws_digits(path: Path) -> bool:
    """A font qualifies when it draws all ten digits as ten different, non-empty glyphs."""
    try:
        font = ImageFont.truetype(str(path), 24)
    except OSError:
        return False
    glyphs = [_render(font, d, 32, 0, 0, 0) for d in DIGIT_CLASSES]
    if any(g.sum() == 0 for g in glyphs):
        return False
    return len({g.tobytes() for g in glyphs}) == 10


NON_DIGIT_FONTS = ("cmsy", "cmex", "stixsiz", "lastresort")  # symbol fonts: their "digits" are other glyphs


@functools.lru_cache(maxsize=2)
def digit_fonts() -> tuple[Path, ...]:
    """Usable fonts, one per file name (matplotlib's copy and the system's of the same font count once)."""
    by_name: dict[str, Path] = {}
    for path in candidate_font_files():
        if path.name in by_name or path.name.lower().startswith(NON_DIGIT_FONTS):
            continue
        if _font_draws_digits(path):
            by_name[path.name] = path
    return tuple(sorted(by_name.values(), key=lambda p: p.name))


def load_printed_digits(per_font: int = 20, seed: int = 0, canvas: int = 32) -> dict[str, ImageSet]:
    """Digits 0–9 rendered from every usable font with random scale, shift and stroke; split 75/25 by seed."""
    fonts = digit_fonts()
    if not fonts:
        raise DataError("digits-printed: no TrueType font that draws the digits 0-9 was found")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for path in fonts:
        for _ in range(per_font):
            size = int(rng.integers(int(canvas * 0.55), int(canvas * 0.9)))
            font = ImageFont.truetype(str(path), size)
            for label, digit in enumerate(DIGIT_CLASSES):
                stroke = int(rng.integers(0, 2))
                dx, dy = rng.uniform(-0.12, 0.12, size=2) * canvas
                images.append(_render(font, digit, canvas, stroke, dx, dy))
                labels.append(label)
    images_t = torch.from_numpy(np.stack(images)[:, None].copy())
    return _split(images_t, np.asarray(labels), "digits-printed", DIGITS_TEST_FRACTION, seed)


def font_count() -> int:
    return len(digit_fonts())


os.environ.setdefault("MPLBACKEND", "Agg")
