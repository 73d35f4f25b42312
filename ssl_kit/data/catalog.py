"""Every dataset kind ssl_kit knows, registered in one place (see kinds.py for what a kind declares).

    digits                      scikit-learn digits (builtin)
    digits-printed[,per_font=N] digits rendered from fonts (builtin)
    digits-rotated:ANGLE        digits rotated by ANGLE degrees (builtin)
    fashion-mnist[:ROOT]        IDX files (default root /usr/share/datasets/fashion-mnist)
    mnist:ROOT  cifar10:ROOT  cifar100:ROOT  svhn:ROOT  stl10:ROOT   the published file formats (formats.py)
    imagefolder:ROOT  images:ROOT  filelist:FILE  webdataset:PATTERN  file-indexed, can stream (sources.py)

A file-indexed kind loads into memory through its index (specs.py), with the same holdout as training
(holdout.py). A new source: a module with its loader (or its file-index builder), and a `register_kind` call below.
"""
from __future__ import annotations

from pathlib import Path

import torchvision.datasets as tvd

from . import builtin, formats, sources
from .imageset import ImageSet
from .kinds import DatasetKind, register_kind

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"


def _mnist(spec, size: int) -> dict[str, ImageSet]:
    root = Path(spec.arg)
    if (root / "MNIST" / "raw").is_dir():  # where torchvision's download puts the files
        root = root / "MNIST" / "raw"
    return formats.load_idx_dataset(root, "mnist", [str(i) for i in range(10)])


register_kind(DatasetKind("digits", "scikit-learn's 8x8 digits, 10 classes (builtin)", "none",
                          load=lambda spec, size: builtin.load_digits_dataset()))
register_kind(DatasetKind("digits-printed", "digits rendered from the installed fonts (builtin)", "none",
                          load=lambda spec, size: builtin.load_printed_digits(per_font=spec.option("per_font", 20),
                                                                              seed=spec.option("seed", 0)),
                          options=("per_font",)))
register_kind(DatasetKind("digits-rotated", "digits rotated by ANGLE degrees (builtin)", "angle",
                          load=lambda spec, size: builtin.load_rotated_digits(float(spec.arg))))
register_kind(DatasetKind("fashion-mnist", "Fashion-MNIST IDX files", "optional_root",
                          load=lambda spec, size: formats.load_idx_dataset(
                              Path(spec.arg or FASHION_MNIST_DEFAULT_ROOT), "fashion-mnist", formats.FASHION_CLASSES)))
register_kind(DatasetKind("mnist", "MNIST IDX files", load=_mnist,
                          download=lambda root: [tvd.MNIST(root.parent, train=t, download=True) for t in (True, False)]))
register_kind(DatasetKind("cifar10", "CIFAR-10 python pickles", load=lambda spec, size: formats.load_cifar10(
    Path(spec.arg)), download=lambda root: tvd.CIFAR10(root, download=True)))
register_kind(DatasetKind("cifar100", "CIFAR-100 python pickles", load=lambda spec, size: formats.load_cifar100(
    Path(spec.arg)), download=lambda root: tvd.CIFAR100(root, download=True)))
register_kind(DatasetKind("svhn", "SVHN .mat files", load=lambda spec, size: formats.load_svhn(Path(spec.arg)),
                          download=lambda root: [tvd.SVHN(root, split=s, download=True) for s in ("train", "test")]))
register_kind(DatasetKind("stl10", "STL-10 binaries (with its 100k unlabeled images)",
                          load=lambda spec, size: formats.load_stl10(Path(spec.arg)),
                          download=lambda root: tvd.STL10(root, split="train", download=True)))
register_kind(DatasetKind("imagefolder", "ROOT/<class>/<image>, optional ROOT/train|val|test split folders",
                          index=sources.index_imagefolder))
register_kind(DatasetKind("images", "every image under ROOT, unlabeled (labels from a CSV)",
                          index=sources.index_images, unlabeled=True))
register_kind(DatasetKind("filelist", "a CSV/TSV/text file of path[,label] rows", index=sources.index_filelist))
register_kind(DatasetKind("webdataset", "tar shards of KEY.jpg|png|webp [+ KEY.cls]", index=sources.index_webdataset))
