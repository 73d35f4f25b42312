"""Loaders of the real on-disk formats: IDX (MNIST, Fashion-MNIST), CIFAR pickles, SVHN .mat,
STL-10 binaries and image folders. Each returns {split: ImageSet}; nothing is ever downloaded."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .imageset import ImageSet

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _require_root(root: Path, what: str, expected: list[str]) -> None:
    if not root.is_dir():
        raise DataError(f"{what}: root {str(root)!r} does not exist (expected a folder holding {', '.join(expected)})")


def _find(root: Path, names: list[str], what: str) -> Path:
    for name in names:
        for candidate in (root / name, root / "raw" / name):
            if candidate.is_file():
                return candidate
    raise DataError(f"{what}: none of {names} found in {str(root)!r}")


# ------------------------------------------------------------------------------------------ IDX
def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as in LeCun's MNIST format: magic 0x0000 TT DD, dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"IDX file {str(path)!r} cannot be read: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"IDX file {str(path)!r} has no IDX header ({len(data)} bytes)")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise DataError(f"IDX file {str(path)!r}: unknown data type code 0x{dtype_code:02x}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise DataError(f"IDX file {str(path)!r} is truncated inside its header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise DataError(
            f"IDX file {str(path)!r} is truncated or padded: header says {shape} ({expected} bytes), "
            f"file holds {len(data) - header_end}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(shape)


def load_idx_dataset(root: Path, name: str, classes: list[str]) -> dict[str, ImageSet]:
    """MNIST-style root with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*."""
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    _require_root(root, name, [f + "[.gz]" for f in files])
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(root, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz",
                                       f"{prefix}-images.idx3-ubyte"], name))
        labels = read_idx(_find(root, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz",
                                       f"{prefix}-labels.idx1-ubyte"], name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{name} {split}: images {images.shape} and labels {labels.shape} do not match")
        out[split] = ImageSet(torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
                              torch.from_numpy(labels.astype(np.int64)), classes, f"{name}/{split}")
    return out


# ---------------------------------------------------------------------------------------- CIFAR
class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays: a crafted file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: CIFAR batches hold only arrays and lists")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"CIFAR batch {str(path)!r} is corrupt: {exc}") from None
    if not isinstance(batch, dict) or "data" not in batch:
        raise DataError(f"CIFAR batch {str(path)!r} has no 'data' entry")
    return batch


def _cifar_images(batch: dict, path: Path) -> torch.Tensor:
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR batch {str(path)!r}: data of shape {data.shape}, expected (N, 3072)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def load_cifar10(root: Path) -> dict[str, ImageSet]:
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    _require_root(folder, "cifar10", names)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"cifar10: {missing} missing in {str(folder)!r} (expected {names})")
    meta = folder / "batches.meta"
    classes = CIFAR10_CLASSES
    if meta.is_file():
        classes = list(_read_cifar_batch_meta(meta, "label_names") or classes)
    out = {}
    for split, files in (("train", names[:5]), ("test", names[5:])):
        batches = [(folder / n, _read_cifar_batch(folder / n)) for n in files]
        images = torch.cat([_cifar_images(b, p) for p, b in batches])
        labels = torch.cat([torch.as_tensor(b["labels"], dtype=torch.long) for _, b in batches])
        out[split] = ImageSet(images, labels, classes, f"cifar10/{split}")
    return out


def _read_cifar_batch_meta(path: Path, key: str):
    with open(path, "rb") as handle:
        meta = _CifarUnpickler(handle, encoding="latin1").load()
    return meta.get(key) if isinstance(meta, dict) else None


def load_cifar100(root: Path) -> dict[str, ImageSet]:
    folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    _require_root(folder, "cifar100", ["train", "test", "meta"])
    for name in ("train", "test"):
        if not (folder / name).is_file():
            raise DataError(f"cifar100: {name!r} missing in {str(folder)!r} (expected train, test, meta)")
    classes = [f"class_{i}" for i in range(100)]
    if (folder / "meta").is_file():
        classes = list(_read_cifar_batch_meta(folder / "meta", "fine_label_names") or classes)
    out = {}
    for split in ("train", "test"):
        batch = _read_cifar_batch(folder / split)
        out[split] = ImageSet(_cifar_images(batch, folder / split),
                              torch.as_tensor(batch["fine_labels"], dtype=torch.long), classes, f"cifar100/{split}")
    return out


# ----------------------------------------------------------------------------------------- SVHN
def load_svhn(root: Path) -> dict[str, ImageSet]:
    from scipy.io import loadmat

    _require_root(root, "svhn", ["train_32x32.mat", "test_32x32.mat"])
    out = {}
    for split in ("train", "test", "extra"):
        path = root / f"{split}_32x32.mat"
        if not path.is_file():
            if split == "extra":
                continue
            raise DataError(f"svhn: {path.name!r} missing in {str(root)!r} (expected train_32x32.mat, test_32x32.mat)")
        try:
            mat = loadmat(path)
        except Exception as exc:  # scipy raises several types for corrupt files
            raise DataError(f"svhn: {str(path)!r} is not a readable .mat file: {exc}") from None
        images = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)  # (32, 32, 3, N) -> (N, 3, 32, 32)
        labels = mat["y"].astype(np.int64).reshape(-1) % 10  # SVHN stores digit 0 as label 10
        out[split] = ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels), [str(i) for i in range(10)],
                              f"svhn/{split}")
    return out


# --------------------------------------------------------------------------------------- STL-10
def _read_stl_images(path: Path) -> torch.Tensor:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise DataError(f"stl10: {str(path)!r} holds {raw.size} bytes, not a whole number of 3×96×96 images")
    # stored column-major per channel: (N, 3, 96, 96) with H and W swapped
    return torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())


def load_stl10(root: Path) -> dict[str, ImageSet]:
    folder = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    needed = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    _require_root(folder, "stl10", needed)
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise DataError(f"stl10: {missing} missing in {str(folder)!r} (expected {needed}, optional unlabeled_X.bin)")
    out = {}
    for split in ("train", "test"):
        images = _read_stl_images(folder / f"{split}_X.bin")
        labels = torch.from_numpy(np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1)
        out[split] = ImageSet(images, labels, STL10_CLASSES, f"stl10/{split}")
    if (folder / "unlabeled_X.bin").is_file():
        images = _read_stl_images(folder / "unlabeled_X.bin")
        out["unlabeled"] = ImageSet(images, torch.full((len(images),), -1, dtype=torch.long), STL10_CLASSES,
                                    "stl10/unlabeled")
    return out


# --------------------------------------------------------------------------------- image folder
def read_image(path: Path, size: int) -> np.ndarray:
    """Any PIL-readable file -> uint8 RGB (3, size, size). Raises DataError naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if array.max() > 255 else 255.0
                image = Image.fromarray((array / peak * 255).round().astype(np.uint8))
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file {str(path)!r} cannot be read as an image: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _scan_classes(root: Path) -> list[tuple[str, list[Path]]]:
    classes = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        classes.append((folder.name, files))
    return classes


def load_image_folder(root: Path, size: int, name: str = "imagefolder") -> ImageSet:
    """root/<class>/<image>: every class a sub-folder. Images are read and resized to size×size RGB."""
    _require_root(root, name, ["one sub-folder of images per class"])
    classes = _scan_classes(root)
    if not classes:
        raise DataError(f"{name}: {str(root)!r} has no class sub-folders")
    empty = [c for c, files in classes if not files]
    if empty:
        raise DataError(f"{name}: class folders without images in {str(root)!r}: {empty}")
    images, labels = [], []
    for label, (_, files) in enumerate(classes):
        for path in files:
            images.append(read_image(path, size))
            labels.append(label)
    return ImageSet(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.long),
                    [c for c, _ in classes], name)
