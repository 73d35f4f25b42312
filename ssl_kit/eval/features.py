"""Frozen-backbone features for any dataset: images are converted to the size, channels and normalisation the
backbone was trained with (recorded in backbone.pt), then embedded once and cached.

Large streamed sources (imagefolder, images, filelist, webdataset above the memory budget decoded at the backbone's
size: the recipe's data.memory_budget_gb, `--budget-gb` on the command line; or any of them with the spec option
`storage=stream`) are never decoded into memory: DataLoader workers decode them with the evaluation transform the
backbone was trained with (shorter side -> size/data.eval_resize_ratio, centre crop), and the features go
to an on-disk float16 cache under `$SSL_KIT_CACHE/features` (default ~/.cache/ssl_kit/features), keyed
(data/cache_key.py) by the backbone's weights and pooling (feature_identity), the spec, the split, the transform
and a stamp of every file read (name, size, mtime_ns: images rewritten in place under the same names miss the
cache), so linear-probe, knn and transfer on the same checkpoint embed each image once. An entry is trusted only
when its manifest (format version, shape, byte sizes, sha256 of both files) matches; a truncated, crafted or
other-version entry is recomputed with a warning (verifying reads the cache file once, far cheaper than embedding
it). The cache is handed to them memory-mapped (mapped.py), never as N × F float32. The attentive probe's patch
tokens (token_features) go through the same cache, one row of L × D per image; an entry larger than the cache disk's
free space is refused before it is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from .._version import __version__
from ..common.device import resolve_device
from ..common.files import sha256_file
from ..config import DataConfig
from ..common.metrics import predict
from ..common.versions import library_versions
from ..data.augment import random_resized_crop, to_unit_float
from ..data.views import Normalize
from ..data.fileset import FileSet, image_batches
from ..data.imageset import ImageSet, convert_images
from ..data.opened import OpenedSource, open_source
from ..data.cache_key import CACHE_FORMAT, cache_key, content_stamp
from ..data.sources import cache_dir
from ..data.stream import BadImageLog
from ..engine.checkpoint import load_backbone
from ..errors import DataError, TrainingError
from ..models.external import is_torchvision_reference, torchvision_backbone
from .mapped import open_mapped
from .vit_readout import PatchTokens, vit_readout

DEFAULT_MEMORY_BUDGET_GB = DataConfig.model_fields["memory_budget_gb"].default
MANIFEST_MAX_BYTES = 1 << 16  # a manifest is a few hundred bytes
DEFAULT_EVAL_RESIZE_RATIO = DataConfig.model_fields["eval_resize_ratio"].default  # backbones written before 0.1.1


def feature_cache_dir() -> Path:
    """$SSL_KIT_CACHE/features (beside the file-index cache)."""
    return cache_dir().parent / "features"


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, shapes, bytes): the identity of a backbone's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:24]


def feature_identity(backbone: nn.Module) -> str:
    """What a backbone's features depend on: its weights (weights_digest), its class, the build kwargs a checkpoint
    recorded (`.arch_kwargs`, attached by build_from_record) and its pooling (`global_pool`): a ViT's [cls] and its
    mean patch token come from the same weights and must not share a feature cache entry."""
    config = {"class": type(backbone).__qualname__, "arch": getattr(backbone, "arch", None),
              "kwargs": getattr(backbone, "arch_kwargs", None), "global_pool": getattr(backbone, "global_pool", None)}
    return f"{weights_digest(backbone)}:{json.dumps(config, sort_keys=True, default=repr)}"


def load_eval_backbone(path: str | Path, weights: Optional[str] = None, image_size: Optional[int] = None,
                       n_last_blocks: int = 1, avgpool: bool = False) -> nn.Module:
    """Backbone (eval mode, with .data_info) for evaluation commands; see FeatureExtractor.from_checkpoint.
    n_last_blocks / avgpool > defaults: a ViT read as DINOv2's linear evaluation reads it (vit_readout.py)."""
    if is_torchvision_reference(path):
        return vit_readout(torchvision_backbone(str(path), weights, image_size), n_last_blocks, avgpool)
    if weights is not None:
        raise DataError(f"--weights is for torchvision:NAME checkpoints; {str(path)!r} carries its own weights")
    backbone = load_backbone(path)
    if image_size is not None:
        backbone.data_info = dict(backbone.data_info, image_size=image_size)
    return vit_readout(backbone, n_last_blocks, avgpool)


def require_labeled(spec: str, split: str, labeled: int) -> None:
    """A probe or kNN fits on the labeled training images and scores the labeled test images: none is an error."""
    if labeled == 0:
        if "labels=" in spec and split == "test":  # labels given, but too few per class for the holdout
            raise DataError(f"dataset {spec!r}: split 'test' has no labeled images to score: without a test folder "
                            f"it holds round(test_fraction x n) of each class's n labeled images (test_fraction 0.2 "
                            f"by default), so a class needs 3 or more labeled images to give it one; label more "
                            f"images, or raise ',test_fraction='")
        raise DataError(f"dataset {spec!r}: split {split!r} has no labeled images to fit or score (give labels with "
                        f"',labels=labels.csv' or use a labeled source)")


def require_free_disk(folder: Path, rows: int, width: int, name: str) -> None:
    """A cache entry of rows × width float16 must fit the free space of `folder`'s disk: refused before writing,
    naming the sizes, instead of filling the disk part way through."""
    needed, free = rows * width * 2, shutil.disk_usage(folder).free
    if needed > free:
        raise DataError(f"{name}: its features ({rows} x {width} float16) take {needed / 1e9:.1f} GB in the cache "
                        f"folder {str(folder)!r}, whose disk has {free / 1e9:.1f} GB free; point $SSL_KIT_CACHE at a "
                        f"larger disk")


def check_finite_rows(rows: Tensor, name: str) -> None:
    """check_finite_features for a large (N, F) set (float16 tokens): row by row in chunks, no N × F copy."""
    bad = torch.zeros(rows.shape[0], 1)
    for start in range(0, rows.shape[0], 256):
        bad[start:start + 256, 0] = rows[start:start + 256].float().sum(1)  # non-finite where a row has any
    check_finite_features(bad, name)


def check_finite_features(feats: Tensor, name: str) -> None:
    """Features (N, F) with NaN/inf would give a meaningless accuracy: a clear error instead, naming the images."""
    bad = (~torch.isfinite(feats)).any(dim=1)
    if bool(bad.any()):
        raise TrainingError(f"{name}: the backbone produced non-finite features for {int(bad.sum())} of "
                            f"{feats.shape[0]} images (a diverged or corrupt checkpoint); no accuracy is reported")


class FeatureCacheEntry:
    """One streamed split's features in the cache folder: KEY.f16.npy (float16 (N, F)), KEY.labels.npy (int64
    (N,)) and KEY.json, the manifest written last (format, key, shape, byte sizes and sha256 of both files).
    An entry is trusted only when its manifest matches the files exactly; a truncated, crafted or other-version
    entry is rebuilt with a warning."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder, self.key = folder, key
        self.features = folder / f"{key}.f16.npy"
        self.labels = folder / f"{key}.labels.npy"
        self.manifest = folder / f"{key}.json"

    def load(self, num_classes: int) -> Optional[tuple[Tensor, Tensor]]:
        """(features mapped, labels) when the entry is complete and intact; None (compute) otherwise."""
        if not self.manifest.exists():
            return None
        try:
            return self._verified(num_classes)
        except Exception as exc:  # damaged bytes raise many types (json, numpy, OSError)
            warnings.warn(f"feature cache {str(self.manifest)!r} is invalid ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); recomputing the features")
            return None

    def _verified(self, num_classes: int) -> tuple[Tensor, Tensor]:
        meta = json.loads(self.manifest.read_bytes()[:MANIFEST_MAX_BYTES])
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != self.key:
            raise ValueError(f"not a format-{CACHE_FORMAT} entry for key {self.key}")
        for path, name in ((self.features, "features"), (self.labels, "labels")):
            if not path.is_file() or path.stat().st_size != meta[f"{name}_bytes"]:
                raise ValueError(f"{path.name} is missing or has another size than recorded")
            if sha256_file(path) != meta[f"{name}_sha256"]:
                raise ValueError(f"{path.name} does not match its recorded digest")
        feats = open_mapped(self.features)
        labels = np.load(self.labels, allow_pickle=False)
        if list(feats.shape) != meta["shape"] or labels.dtype != np.int64 or labels.shape != (feats.shape[0],):
            raise ValueError(f"shapes {tuple(feats.shape)}, {labels.shape} do not match the manifest")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels outside [0, {num_classes})")
        return feats, torch.from_numpy(labels)

    def store(self, feats_tmp: Path, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Move a computed float16 .npy into place, write the labels and then the manifest (each atomically)."""
        labels_tmp = self.folder / f".{self.key}.{os.getpid()}.labels.tmp.npy"
        np.save(labels_tmp, labels.numpy().astype(np.int64))
        self.manifest.unlink(missing_ok=True)  # an entry being replaced is never half trusted
        os.replace(feats_tmp, self.features)
        os.replace(labels_tmp, self.labels)
        feats = open_mapped(self.features)
        meta = {"format": CACHE_FORMAT, "key": self.key, "shape": list(feats.shape),
                "features_bytes": self.features.stat().st_size, "features_sha256": sha256_file(self.features),
                "labels_bytes": self.labels.stat().st_size, "labels_sha256": sha256_file(self.labels)}
        manifest_tmp = self.folder / f".{self.key}.{os.getpid()}.json.tmp"
        manifest_tmp.write_text(json.dumps(meta))
        os.replace(manifest_tmp, self.manifest)
        return feats, labels


class FeatureExtractor:
    """Embeds ImageSets with a frozen backbone in eval mode; results are cached per (dataset name, split).
    `forward_passes` counts the images actually sent through the backbone."""

    def __init__(self, backbone: nn.Module, device: str = "auto", batch_size: int = 512, workers: int = 2,
                 memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB) -> None:
        self.device = resolve_device(device)
        self.backbone = backbone.to(self.device).eval()
        info = backbone.data_info
        self.info = info
        self.normalize = Normalize(info["mean"], info["std"]).to(self.device)
        self.batch_size, self.workers = batch_size, workers
        self.memory_budget_gb = memory_budget_gb
        self.resize_ratio = float(info.get("eval_resize_ratio", DEFAULT_EVAL_RESIZE_RATIO))
        self._weights: Optional[str] = None
        self._cache: dict[str, Tensor] = {}
        self._splits: dict[str, dict[str, ImageSet]] = {}
        self._sources: dict[str, OpenedSource] = {}
        self.forward_passes = 0

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", weights: Optional[str] = None,
                        image_size: Optional[int] = None,
                        memory_budget_gb: float = DEFAULT_MEMORY_BUDGET_GB, n_last_blocks: int = 1,
                        avgpool: bool = False) -> "FeatureExtractor":
        """An ssl_kit backbone.pt / run dir / training checkpoint, or 'torchvision:NAME' with local `weights`.
        `image_size` overrides the input size the backbone was trained at (images are resized to it);
        `memory_budget_gb`: streamed sources decoding to more are embedded from files (storage auto);
        `n_last_blocks` / `avgpool`: a ViT's features as DINOv2's linear evaluation reads them (vit_readout.py)."""
        return cls(load_eval_backbone(path, weights, image_size, n_last_blocks, avgpool), device,
                   memory_budget_gb=memory_budget_gb)

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
        """Every split of `spec` converted to the backbone's input format, loaded once per extractor (in memory:
        what needs the images themselves, augmented probes, AdaBN, corruptions)."""
        if spec in self._splits:
            return self._splits[spec]
        source = self.open(spec)
        if source.streams:
            raise DataError(f"dataset {spec!r} streams (too large to decode into memory, or storage=stream): "
                            f"augmented probes, AdaBN and corruptions need the images in memory; use the plain "
                            f"linear probe / knn / transfer, or ',storage=memory' for a small set")
        self._splits[spec] = source.splits()
        return self._splits[spec]

    def open(self, spec: str) -> OpenedSource:
        """`spec` opened as training opens a stage's data (data/opened.py), at the backbone's size and channels;
        once per extractor (its file index, splits and storage decision), however many evaluations read it."""
        if spec not in self._sources:
            self._sources[spec] = open_source(spec, self.info["image_size"], self.info["channels"],
                                              self.memory_budget_gb, workers=max(2, self.workers))
        return self._sources[spec]

    def streams(self, spec: str) -> bool:
        """Whether `spec` is embedded from files in workers (see the module docstring) rather than in memory."""
        return self.open(spec).streams

    def file_features(self, images: FileSet, spec: str, split: str) -> tuple[Tensor, Tensor]:
        """Features (N, F) and labels (N,) of a streamed split: the on-disk float16 cache, memory-mapped (see
        mapped.py), computed in batches and written first if absent or invalid (unreadable files are left out with
        a warning, labels stay aligned). The key stamps the weights, every file read (cache_key.content_stamp), and
        the code and libraries that decode and embed them: ssl_kit's version and library_versions() (Pillow, torch,
        ...), so features computed by other releases are recomputed, not served."""
        if self._weights is None:
            self._weights = feature_identity(self.backbone)
        size, channels = self.info["image_size"], self.info["channels"]
        key = cache_key("features", self._weights, spec, split, size, channels, self.resize_ratio,
                        content_stamp(images.index, images.positions, max(1, self.workers)),
                        __version__, sorted(library_versions().items()))
        entry = FeatureCacheEntry(feature_cache_dir(), key)
        cached = entry.load(images.num_classes)
        if cached is not None:
            return cached
        entry.folder.mkdir(parents=True, exist_ok=True)
        tmp = entry.folder / f".{key}.{os.getpid()}.tmp.npy"
        feats_tmp, labels = self._embed_files(images, size, channels, tmp)
        return entry.store(feats_tmp, labels)

    def _embed_files(self, images: FileSet, size: int, channels: int, tmp: Path) -> tuple[Path, Tensor]:
        """Embed a streamed split into the float16 .npy file `tmp` (rows of unreadable images left out) ->
        (tmp, labels (rows,))."""
        bad = BadImageLog("skip", 1.0, max(1, len(images)))
        store, labels, rows = None, [], 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one summary warning below instead of one per file
            for x, y in image_batches(images, size, channels, self.batch_size, self.workers, self.resize_ratio,
                                      bad):
                feats = predict(self.backbone, x, self.normalize, self.device, self.batch_size)
                if store is None:
                    require_free_disk(tmp.parent, len(images), feats.shape[1], images.name)
                    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                      shape=(len(images), feats.shape[1]))
                store[rows:rows + len(feats)] = feats.numpy().astype(np.float16)
                rows += len(feats)
                labels.append(y)
                self.forward_passes += len(feats)
        if bad.files:
            warnings.warn(f"{images.name}: {len(bad.files)} unreadable images left out of the features, e.g. "
                          f"{list(bad.files.items())[:3]}")
        if store is None:
            raise DataError(f"{images.name}: no image could be decoded")
        store.flush()
        if rows < len(images):
            trimmed = tmp.with_name(tmp.name + ".rows.npy")
            np.save(trimmed, store[:rows])
            del store
            os.replace(trimmed, tmp)
        else:
            del store
        return tmp, torch.cat(labels)

    def _streamed_features(self, spec: str, source: OpenedSource) -> dict[str, tuple[Tensor, Tensor, list[str]]]:
        out = {}
        for split in ("train", "test"):
            images = source.split(split, labeled_only=True)  # unlabeled images cannot be fitted nor scored
            require_labeled(spec, split, len(images))
            key = f"{spec}|{split}"
            if key not in self._cache:
                self._cache[key], self._cache[key + "|labels"] = self.file_features(images, spec, split)
            out[split] = (self._cache[key], self._cache[key + "|labels"], images.classes)
        return out

    def token_features(self, spec: str) -> dict[str, tuple[Tensor, Tensor, list[str]]]:
        """{'train', 'test': (patch tokens (N, L · D) float16, labels (N,), classes)} of the labeled images of a
        dataset spec's train and test splits: each row one image's last-block normalised patch tokens (L of width
        D = backbone.num_features; vit_readout.PatchTokens), the attentive probe's input. A source in memory gives
        them in memory (refused first when they would exceed the memory budget); a streamed one goes through the
        on-disk feature cache (memory-mapped, keyed apart from the backbone's features by feature_identity)."""
        reader = PatchTokens(self.backbone, flat=True)
        source = self.open(spec)
        if source.streams:
            tokens = FeatureExtractor(reader, self.device.type, self.batch_size, self.workers, self.memory_budget_gb)
            tokens._sources = self._sources  # the same opened source: one file index, one holdout
            out = tokens._streamed_features(spec, source)
            self.forward_passes += tokens.forward_passes
            return out
        out = {}
        for split in ("train", "test"):
            images = self.dataset_splits(spec)[split]
            labeled = (images.labels >= 0).nonzero().squeeze(1)
            require_labeled(spec, split, len(labeled))
            images = images if len(labeled) == len(images.labels) else images.subset(labeled)
            x = convert_images(images.images, self.info["image_size"], self.info["channels"])
            out[split] = (self._tokens(reader, x, spec, split), images.labels, images.classes)
        return out

    def _tokens(self, reader: nn.Module, x: Tensor, spec: str, split: str) -> Tensor:
        """uint8 images (N, C, H, W) at the backbone's input -> their flat patch tokens (N, L · D) in float16,
        batch by batch; refused before the first batch when they would exceed the memory budget."""
        first = predict(reader, x[:1], self.normalize, self.device)  # (1, L · D)
        gigabytes = x.shape[0] * first.numel() * 2 / 1e9
        if gigabytes > self.memory_budget_gb:
            raise DataError(f"dataset {spec!r}: the patch tokens of its {x.shape[0]} {split} images take "
                            f"{gigabytes:.1f} GB ({first.numel()} float16 each), more than the memory budget of "
                            f"{self.memory_budget_gb:g} GB (--budget-gb / memory_budget_gb); ',storage=stream' "
                            f"keeps them in the on-disk cache instead")
        tokens = torch.empty((x.shape[0], first.shape[1]), dtype=torch.float16)
        for start in range(0, x.shape[0], self.batch_size):
            chunk = predict(reader, x[start:start + self.batch_size], self.normalize, self.device, self.batch_size)
            tokens[start:start + len(chunk)] = chunk.half()
            self.forward_passes += len(chunk)
        check_finite_rows(tokens, f"{spec} ({split})")
        return tokens

    def dataset_features(self, spec: str) -> dict[str, tuple[Tensor, Tensor, list[str]]]:
        """{'train', 'test': (features (N, F), labels (N,), classes)} of the labeled images of a dataset spec's
        train and test splits, opened as training opens them (data/opened.py: one holdout policy, one storage
        decision); large streamed sources are embedded from files with the on-disk cache."""
        source = self.open(spec)
        if source.streams:
            return self._streamed_features(spec, source)
        out = {}
        splits = self.dataset_splits(spec)
        for split in ("train", "test"):
            images = splits[split]
            labeled = images.labels >= 0  # unlabeled images (a partly labeled source) cannot be fitted nor scored
            require_labeled(spec, split, int(labeled.sum()))
            feats = self.features(images, key=f"{spec}|{split}")
            out[split] = (feats, images.labels, images.classes) if bool(labeled.all()) else \
                (feats[labeled], images.labels[labeled], images.classes)
        return out
