"""Decode one image file into view crops, at reduced resolution where the format allows.

`decode_views` opens the file once, reads its geometry from the header, computes every view's crop box in the
original grid, asks PIL for the smallest JPEG DCT reduction (1/2, 1/4, 1/8 via `Image.draft`) that still keeps
every crop at least as large as its output size, maps the boxes into the reduced grid and resizes each box to its
view size with PIL's antialiased bilinear filter. A 4000 px photo cut into 224 px crops is thus decoded at 1000 px
or less. Modes are converted as `formats.read_image` does: 16-bit and 32-bit integer images scaled to 8 bits,
palette/CMYK/RGBA/LA to RGB (alpha dropped), RGB -> gray by ITU-R 601 luma.

EXIF orientation is honoured (as `ImageOps.exif_transpose` does, and on every path: views, evaluation crops, the
in-memory resize, `formats.read_image`): a portrait phone photo stored sideways with Orientation = 6 is read
upright. Crop boxes are drawn in the upright (displayed) grid; the file is decoded in its stored grid, with draft
mode too (a DCT reduction divides both sides by the same factor, so the reduction chosen for the upright boxes is
the one for the stored grid), and the decoded, reduced image is then flipped/rotated upright before the boxes are
cut. The orientation tag is read from the header (no pixels decoded); an unreadable EXIF block counts as
orientation 1 (as stored), as do values outside 1..8.

Anything wrong with a file (zero bytes, not an image, truncated, a decompression bomb over PIL's
`Image.MAX_IMAGE_PIXELS`, an unreadable path) raises `BadImage` naming the file and the reason; the loader decides
whether to substitute or stop (`data.bad_images`).
"""
from __future__ import annotations

import io
import math
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image

from ..errors import DataError
from ..limits import how_to_raise, limit
from .crops import CropSpec, center_box, crop_box, flip_bit


SUBSTITUTE_GREY = 128  # uint8 value of every pixel of the views that stand in for a file no one could decode


class BadImage(DataError):
    """A file that cannot be decoded as an image. `name` is the file (or tar member), `reason` why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"image file {name!r} cannot be used: {reason}")
        self.name, self.reason = name, reason



@contextmanager
def pil_pixel_limit():
    """PIL's own decompression-bomb check (at open, 2 × Image.MAX_IMAGE_PIXELS) follows MAX_IMAGE_PIXELS while the
    block runs; PIL's global is restored afterwards, so a lowered cap never leaks into other code."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit("MAX_IMAGE_PIXELS")
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous

def _open(data: bytes, name: str) -> Image.Image:
    if len(data) == 0:
        raise BadImage(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with pil_pixel_limit():
                image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImage(name, f"decompression bomb refused by PIL: {exc}") from None
    except Exception as exc:  # PIL raises many types for garbage input
        raise BadImage(name, f"not a readable image ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width * height > limit("MAX_IMAGE_PIXELS"):  # from the header: nothing decoded yet
        raise BadImage(name, f"decompression bomb: {width}×{height} = {width * height} pixels; "
                             f"{how_to_raise('MAX_IMAGE_PIXELS')} (raise it only for files you trust)")
    if width < 1 or height < 1:
        raise BadImage(name, f"image of size {width}×{height} has no pixels")
    return image


ORIENTATION_TAG = 0x0112
_UPRIGHT = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
            6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}  # as ImageOps.exif_transpose


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) from an opened image's header; 1 (as stored) when absent or unreadable."""
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a malformed EXIF block must not make the image unreadable
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def upright_size(image: Image.Image, turn: int) -> tuple[int, int]:
    """(width, height) as displayed: swapped for the orientations that rotate by 90° (5..8)."""
    width, height = image.size
    return (height, width) if turn >= 5 else (width, height)


def upright(image: Image.Image, turn: int) -> Image.Image:
    """A decoded image flipped/rotated as EXIF orientation `turn` asks (1: unchanged)."""
    return image.transpose(_UPRIGHT[turn]) if turn in _UPRIGHT else image


def exif_upright(image: Image.Image) -> Image.Image:
    """`ImageOps.exif_transpose` for a loaded image of any mode (unchanged without an orientation tag)."""
    return upright(image, orientation(image)) if orientation(image) != 1 else image


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Loaded PIL image -> 'RGB' (channels 3) or 'L' (channels 1), 16/32-bit integers scaled to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray((np.clip(array, 0, peak) / peak * 255).round().astype(np.uint8))
    elif image.mode == "P":
        image = image.convert("RGBA")
    target = "RGB" if channels == 3 else "L"
    if image.mode == target:
        return image
    if channels == 1 and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return image.convert(target)


def _reduction(boxes: list[tuple[int, int, int, int]], sizes: list[int]) -> float:
    """The largest factor r with every box still ≥ its output size after dividing by r (≥ 1)."""
    return max(1.0, min(min(h, w) / size for (_, _, h, w), size in zip(boxes, sizes)))


def _load(image: Image.Image, name: str, channels: int, reduction: float, turn: int = 1) -> Image.Image:
    """Decode (JPEG: at the largest DCT reduction ≤ `reduction`), convert to the requested channels and turn
    upright (EXIF orientation `turn`)."""
    width, height = image.size
    try:
        if image.format == "JPEG" and reduction >= 2:
            image.draft("L" if channels == 1 else "RGB",
                        (math.ceil(width / reduction), math.ceil(height / reduction)))
        image.load()
        return upright(_to_mode(image, channels), turn)
    except Exception as exc:  # truncated data, broken streams, codec errors
        raise BadImage(name, f"decoding failed ({type(exc).__name__}: {exc})") from None


def _cut(image: Image.Image, box: tuple[int, int, int, int], scale: tuple[float, float], size: int,
         flip: bool) -> np.ndarray:
    """Resize `box` (top, left, h, w in the original grid; the decoded image is `scale` = (sx, sy) of it) to
    size×size -> uint8 (C, size, size)."""
    top, left, h, w = box
    sx, sy = scale
    region = (left * sx, top * sy, min(image.width, (left + w) * sx), min(image.height, (top + h) * sy))
    view = image.resize((size, size), Image.BILINEAR, box=region)
    if flip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(view, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_views(data: bytes, name: str, views: list[CropSpec], seed: int, position: int,
                 channels: int = 3) -> list[np.ndarray]:
    """One decode of `data`, one crop per entry of `views` (already expanded, see `expand_views`); view v's box
    and flip are functions of (seed, position, v). -> list of uint8 (channels, size_v, size_v)."""
    image = _open(data, name)
    turn = orientation(image)
    width, height = upright_size(image, turn)
    boxes = [crop_box(height, width, spec, seed, position, v) for v, spec in enumerate(views)]
    decoded = _load(image, name, channels, _reduction(boxes, [spec.size for spec in views]), turn)
    scale = (decoded.width / width, decoded.height / height)
    return [_cut(decoded, box, scale, spec.size, spec.flip and flip_bit(seed, position, v))
            for v, (box, spec) in enumerate(zip(boxes, views))]


def decode_eval(data: bytes, name: str, size: int, channels: int = 3, resize_ratio: float = 0.875) -> np.ndarray:
    """Evaluation view: shorter side resized to size/resize_ratio, centre crop size×size -> uint8 (C, size, size)."""
    image = _open(data, name)
    turn = orientation(image)
    width, height = upright_size(image, turn)
    box = center_box(height, width, size, resize_ratio)
    decoded = _load(image, name, channels, _reduction([box], [size]), turn)
    return _cut(decoded, box, (decoded.width / width, decoded.height / height), size, False)


def decode_resized(data: bytes, name: str, size: int, channels: int = 3) -> np.ndarray:
    """The in-memory path's transform: the whole image squashed to size×size -> uint8 (C, size, size)."""
    image = _open(data, name)
    turn = orientation(image)
    width, height = upright_size(image, turn)
    box = (0, 0, height, width)
    decoded = _load(image, name, channels, _reduction([box], [size]), turn)
    return _cut(decoded, box, (decoded.width / width, decoded.height / height), size, False)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    image = _open(data, name)
    return upright_size(image, orientation(image))
