"""The trainer's source of batches: the in-memory `DeviceLoader`, or for streamed data a `StreamLoader` whose
DataLoader workers decode each image once and cut the crops of every view the method declares.

What is cut where on streamed data:
  methods with views (`view_list()`: SimCLR, MoCo, BYOL, DINO multi-crop, ...): one crop per view, with the view's
      own scale/ratio/size and flip (`ContrastiveView.crop_spec`); the device runs only the photometric part.
  methods without views (supervised, FixMatch family, KD, MAE/SimMIM): one base crop per image at the stage's image
      size (`Method.stream_crop`: RandomResizedCrop over `data.stream_crop_scale`, MAE/SimMIM their `crop_scale`);
      the device derives its weak/strong views from it (FixMatch: weak and strong from one decode).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..data.views import ContrastiveView
from ..data.crops import CropSpec
from ..data.loader import DeviceLoader
from ..data.pipeline import PreparedData
from ..data.stream import BadImageLog, StreamLoader
from ..errors import ConfigError
from ..methods.base import Method

Loader = Union[DeviceLoader, StreamLoader]


def stream_views(method: Method, image_size: int) -> tuple[list[CropSpec], Optional[list[CropSpec]]]:
    """(labeled stream's CropSpecs in view order, unlabeled stream's: None = the same)."""
    views = method.view_list()
    if views:
        return [view.crop_spec(image_size) for view in views], None
    base = method.stream_crop(image_size)
    return [base], [base]


def worker_photometric(method: Method, mode: str, device: torch.device) -> Optional[list]:
    """The per-view photometric functions the streaming workers run (`data.photometric`), or None when the device
    runs them: `workers` always, `auto` when training on the CPU (there the batched ops would run in the training
    process after the workers; in the workers they run in parallel with it). Only for views that are
    ContrastiveViews (methods without views make their weak/strong views on the device)."""
    views = method.view_list()
    if mode == "device" or (mode == "auto" and device.type != "cpu") or not views:
        return None
    if not all(isinstance(view, ContrastiveView) for view in views):
        return None
    return [view.photometric_uint8 for view in views]


def build_loader(method: Method, data: PreparedData, cfg, seed: int, rank: int, world: int,
                 device: torch.device) -> Loader:
    """The loader of a training stage: global batches of cfg.train.batch_size labeled (+ μ× unlabeled when the
    method uses them) images, this rank's share."""
    batch_size = cfg.train.batch_size
    needs = method.data_needs(cfg)
    unlabeled = data.unlabeled if needs.unlabeled else None
    mu = needs.unlabeled_ratio
    if not data.streamed:
        images = data.train.images.to(device)
        labels = data.train.labels.to(device)
        return DeviceLoader(images, labels, data.labeled, batch_size, seed, unlabeled, mu, rank, world)
    dc, positions = cfg.data, data.train.positions
    views, u_views = stream_views(method, dc.image_size)
    return StreamLoader(data.train.index, positions[data.labeled.numpy()], batch_size, seed, views,
                        channels=data.train.channels,
                        unlabeled=None if unlabeled is None else positions[unlabeled.numpy()], mu=mu,
                        u_views=u_views, rank=rank, world_size=world, workers=dc.workers, prefetch=dc.prefetch,
                        device=device, bad_images=dc.bad_images, max_bad_fraction=dc.max_bad_fraction,
                        photometric=worker_photometric(method, dc.photometric, device),
                        decode_on_device=device_decode(dc.decode, device))


def device_decode(mode: str, device: torch.device) -> bool:
    """`data.decode`: True for gpu, which needs a CUDA training device (nvJPEG)."""
    if mode == "gpu" and device.type != "cuda":
        raise ConfigError(f"data.decode: gpu decodes JPEGs with nvJPEG on a CUDA training device; this stage trains "
                          f"on {device.type}. Use data.decode: cpu (the default)")
    return mode == "gpu"


def bad_image_log(loader: Loader) -> Optional[BadImageLog]:
    """The bad-file log of a streamed loader (None in memory: decoded images cannot be bad)."""
    return loader.bad if isinstance(loader, StreamLoader) else None
