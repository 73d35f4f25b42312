"""Frozen-backbone features for any dataset: images are converted to the size, channels and normalisation the
backbone was trained with (recorded in backbone.pt), then embedded once and cached."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..common.device import resolve_device
from ..common.metrics import predict
from ..data.augment import Normalize, random_resized_crop, to_unit_float
from ..data.imageset import ImageSet, convert_images
from ..data.pipeline import load_converted
from ..engine.checkpoint import load_backbone
from ..errors import DataError, TrainingError
from ..models.external import is_torchvision_reference, torchvision_backbone


def load_eval_splits(spec: str, info: dict) -> dict[str, ImageSet]:
    """Every split of `spec` converted to the backbone's input format (image_size, channels)."""
    return load_converted(spec, info["image_size"], info["channels"])


def load_eval_backbone(path: str | Path, weights: Optional[str] = None, image_size: Optional[int] = None) -> nn.Module:
    """Backbone (eval mode, with .data_info) for evaluation commands; see FeatureExtractor.from_checkpoint."""
    if is_torchvision_reference(path):
        return torchvision_backbone(str(path), weights, image_size)
    if weights is not None:
        raise DataError(f"--weights is for torchvision:NAME checkpoints; {str(path)!r} carries its own weights")
    backbone = load_backbone(path)
    if image_size is not None:
        backbone.data_info = dict(backbone.data_info, image_size=image_size)
    return backbone


def check_finite_features(feats: Tensor, name: str) -> None:
    """Features (N, F) with NaN/inf would give a meaningless accuracy: a clear error instead, naming the images."""
    bad = (~torch.isfinite(feats)).any(dim=1)
    if bool(bad.any()):
        raise TrainingError(f"{name}: the backbone produced non-finite features for {int(bad.sum())} of "
                            f"{feats.shape[0]} images (a diverged or corrupt checkpoint); no accuracy is reported")


class FeatureExtractor:
    """Embeds ImageSets with a frozen backbone in eval mode; results are cached per (dataset name, split).
    `forward_passes` counts the images actually sent through the backbone."""

    def __init__(self, backbone: nn.Module, device: str = "auto", batch_size: int = 512) -> None:
        self.device = resolve_device(device)
        self.backbone = backbone.to(self.device).eval()
        info = backbone.data_info
        self.info = info
        self.normalize = Normalize(info["mean"], info["std"]).to(self.device)
        self.batch_size = batch_size
        self._cache: dict[str, Tensor] = {}
        self._splits: dict[str, dict[str, ImageSet]] = {}
        self.forward_passes = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", weights: Optional[str] = None,
                        image_size: Optional[int] = None) -> "FeatureExtractor":
        """An ssl_kit backbone.pt / run dir / training checkpoint, or 'torchvision:NAME' with local `weights`.
        `image_size` overrides the input size the backbone was trained at (images are resized to it)."""
        return cls(load_eval_backbone(path, weights, image_size), device)

    def features(self, images: ImageSet, key: Optional[str] = None) -> Tensor:
        """uint8 images of any size/channels -> float32 features (N, F) on the CPU (cached under `key`)."""
        if key is not None and key in self._cache:
            return self._cache[key]
        x = images.images
        if x.shape[1] not in (1, 3, 4):
            raise DataError(f"{images.name}: images with {x.shape[1]} channels cannot be converted to the backbone's "
                            f"{self.info['channels']}")
        x = convert_images(x, self.info["image_size"], self.info["channels"])
        feats = predict(self.backbone, x, self.normalize, self.device, self.batch_size)
        self.forward_passes += x.shape[0]
        check_finite_features(feats, images.name)
        if key is not None:
            self._cache[key] = feats
        return feats

    @torch.no_grad()
    def augmented_features(self, images: ImageSet, seed: int, scale: tuple[float, float] = (0.2, 1.0),
                           hflip: bool = False) -> Tensor:
        """Features (N, F) of randomly resized crops (+ flips) of `images`, never cached; the same `seed` gives the
        same crops. The ImageNet linear-probe protocol re-extracts these every epoch."""
        x = convert_images(images.images, self.info["image_size"], self.info["channels"])
        out = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, x.shape[0], self.batch_size):
                chunk = to_unit_float(x[start:start + self.batch_size].to(self.device))
                view = random_resized_crop(chunk, scale, hflip=hflip)
                out.append(self.backbone(self.normalize(view)).float().cpu())
        self.forward_passes += x.shape[0]
        return torch.cat(out)

    def dataset_splits(self, spec: str) -> dict[str, ImageSet]:
        """Every split of `spec` converted to the backbone's input format, loaded once per extractor."""
        if spec not in self._splits:
            self._splits[spec] = load_eval_splits(spec, self.info)
        return self._splits[spec]

    def dataset_features(self, spec: str) -> dict[str, tuple[Tensor, Tensor, list[str]]]:
        """{split: (features (N, F), labels (N,), classes)} for every split of a dataset spec."""
        out = {}
        for split, images in self.dataset_splits(spec).items():
            out[split] = (self.features(images, key=f"{spec}|{split}"), images.labels, images.classes)
        return out
