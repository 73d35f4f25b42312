"""JPEG decoding on the training device (`data.decode: gpu`): the streaming workers read each file and its header
only, the device decodes the compressed bytes in batches and cuts the views.

Split of the work:
  worker (`plan_jpeg`): read the bytes, parse the header (PIL, no pixels decoded), draw every view's crop box and
      flip in the upright (EXIF-oriented) grid exactly as the CPU path does (`crops.crop_box`, `crops.flip_bit`),
      and hand over a `JpegJob`. Files that are not baseline/progressive JPEGs in RGB or grey (PNG, CMYK JPEGs,
      ...) are not jobs: the worker decodes them on the CPU as before, so the fallback is per file.
  device (`decode_jobs`): torchvision's batched `decode_jpeg` (nvJPEG on CUDA), `DECODE_CHUNK` files at a time so
      a batch of large photos never sits decoded on the device at once; EXIF orientation as tensor flips and
      rotations; each box resized to its view size with antialiased bilinear interpolation, flipped, rounded to
      uint8 and written into the batch's view tensors.

The pixels differ slightly from the CPU path's, which decodes at the largest JPEG DCT reduction that keeps every
box at least its output size and resizes with PIL: both are antialiased bilinear resamplings of the same crop, a
few grey levels apart on average (measured in `tests/test_device_decode.py`). A file whose header reads but whose
data the device decoder refuses (a truncated scan, say) is decoded on the CPU in the training process; if that
fails too it is reported as a bad file and its views are mid-grey.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from .crops import CropSpec, crop_box, flip_bit
from .decode import SUBSTITUTE_GREY, BadImage, _open, decode_views, orientation, upright_size

DECODE_CHUNK = 32  # files decoded on the device together: 32 × 12 MP × 3 bytes ≈ 1.2 GB at most
DECODABLE_MODES = ("RGB", "L")  # what nvJPEG returns as RGB or grey without a colour-space conversion of ours


@dataclass
class JpegJob:
    """One file for the device: its compressed bytes (uint8 (N,), on the CPU), where its views go and how they are
    cut. `row` is the file's row in the micro-batch; `boxes[v]` = (top, left, h, w) of view v in the upright grid,
    `flips[v]` its horizontal flip; `turn` the EXIF orientation (1..8); `name` the file for messages."""

    row: int
    data: Tensor
    boxes: list[tuple[int, int, int, int]]
    flips: list[bool]
    turn: int
    name: str
    seed: int
    position: int


def plan_jpeg(data: bytes, name: str, views: list[CropSpec], seed: int, position: int) -> Optional[JpegJob]:
    """The device job of one file (its `row` is set by the caller), or None when the device decoder does not take
    it (not a JPEG, or a JPEG in CMYK/YCCK). Raises BadImage for what the CPU path would refuse at the header (empty, not an image, a
    decompression bomb)."""
    image = _open(data, name)
    if image.format != "JPEG" or image.mode not in DECODABLE_MODES:
        return None
    turn = orientation(image)
    width, height = upright_size(image, turn)
    boxes = [crop_box(height, width, spec, seed, position, v) for v, spec in enumerate(views)]
    flips = [bool(spec.flip and flip_bit(seed, position, v)) for v, spec in enumerate(views)]
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return JpegJob(-1, payload, boxes, flips, turn, name, seed, position)


def upright_tensor(image: Tensor, turn: int) -> Tensor:
    """(C, H, W) as stored -> as displayed under EXIF orientation `turn` (PIL's transposes of
    `decode.upright`: 2 mirror, 3 rotate 180°, 4 flip, 5 transpose, 6 rotate 90° clockwise, 7 transverse,
    8 rotate 90° counter-clockwise)."""
    if turn == 2:
        return image.flip(-1)
    if turn == 3:
        return image.flip(-2, -1)
    if turn == 4:
        return image.flip(-2)
    if turn == 5:
        return image.transpose(-2, -1)
    if turn == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if turn == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if turn == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def cut_view(image: Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> Tensor:
    """uint8 (C, H, W) upright image -> uint8 (C, size, size): the box (top, left, h, w) resized with antialiased
    bilinear interpolation (as PIL's BILINEAR filter does when shrinking), flipped horizontally when `flip`."""
    top, left, h, w = box
    region = image[None, :, top:top + h, left:left + w].float()
    view = F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        view = view.flip(-1)
    return view.round_().clamp_(0, 255).to(torch.uint8)


def _decode(datas: list[Tensor], channels: int, device: torch.device) -> list[Tensor]:
    """torchvision's batched decode_jpeg (nvJPEG on CUDA) -> uint8 (C, H, W) per file on `device`."""
    from torchvision.io import ImageReadMode, decode_jpeg  # deferred: torchvision.io loads its image codecs
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec
        return decode_jpeg(datas, mode=mode, device=device)


def _decode_each(jobs: list[JpegJob], channels: int, device: torch.device) -> list[Optional[Tensor]]:
    """Decode `jobs` together; when the batch call fails, one by one so one bad file costs only itself.
    -> one image per job, None where the device decoder refused the file."""
    try:
        return list(_decode([job.data for job in jobs], channels, device))
    except RuntimeError:
        images: list[Optional[Tensor]] = []
        for job in jobs:
            try:
                images.append(_decode([job.data], channels, device)[0])
            except RuntimeError:
                images.append(None)
        return images


def decode_jobs(jobs: list[JpegJob], views: list[Tensor], views_spec: list[CropSpec], channels: int,
                device: torch.device) -> list[tuple[int, str, str]]:
    """Decode every job on `device` and write its views into `views[v][job.row]` (uint8 (B, C, S_v, S_v) on
    `device`). A file the device refuses is decoded on the CPU (`decode.decode_views`, same boxes); one the CPU
    refuses too gets mid-grey views. -> [(row, file, reason)] of those bad files."""
    bad: list[tuple[int, str, str]] = []
    for start in range(0, len(jobs), DECODE_CHUNK):
        chunk = jobs[start:start + DECODE_CHUNK]
        for job, image in zip(chunk, _decode_each(chunk, channels, device)):
            if image is None:
                bad.extend(_write_on_cpu(job, views, views_spec, channels))
                continue
            image = upright_tensor(image, job.turn)
            for v, (box, flip, spec) in enumerate(zip(job.boxes, job.flips, views_spec)):
                views[v][job.row] = cut_view(image, box, spec.size, flip)
    return bad


def _write_on_cpu(job: JpegJob, views: list[Tensor], views_spec: list[CropSpec],
                  channels: int) -> list[tuple[int, str, str]]:
    """The CPU path for a file the device decoder refused; mid-grey views when the CPU refuses it too."""
    try:
        arrays = decode_views(job.data.numpy().tobytes(), job.name, views_spec, job.seed, job.position, channels)
    except BadImage as exc:
        for v in views:
            v[job.row] = SUBSTITUTE_GREY
        return [(job.row, job.name, exc.reason)]
    for v, array in zip(views, arrays):
        v[job.row] = torch.from_numpy(np.ascontiguousarray(array)).to(v.device)
    return []
