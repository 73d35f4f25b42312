"""Loaders of the real on-disk formats: IDX (MNIST, Fashion-MNIST), CIFAR pickles, SVHN .mat,
STL-10 binaries and image folders. Each returns {split: ImageSet}; nothing is ever downloaded."""
from __future__ import annotations

import gzip
import math
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..limits import how_to_raise, limit
from .decode import exif_upright, pil_pixel_limit
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
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _check_declared_bytes(declared: int, path: Path, what: str) -> None:
    if declared > limit("MAX_DATA_BYTES"):
        raise DataError(f"{what} {str(path)!r} declares {declared:,} bytes of data; {how_to_raise('MAX_DATA_BYTES')}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as in LeCun's MNIST format: magic 0x0000 TT DD, dims, data.
    The header's declared size is checked against MAX_DATA_BYTES and the bytes present before the data is read (a
    gzip member is never expanded past what the header declares)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DataError(f"IDX file {str(path)!r} has no IDX header ({len(head)} bytes)")
            dtype_code, ndim = head[2], head[3]
            if dtype_code not in IDX_DTYPES:
                raise DataError(f"IDX file {str(path)!r}: unknown data type code 0x{dtype_code:02x}")
            dims = handle.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataError(f"IDX file {str(path)!r} is truncated inside its header")
            shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
            dtype = np.dtype(IDX_DTYPES[dtype_code])
            expected = math.prod(shape) * dtype.itemsize
            _check_declared_bytes(expected, path, "IDX file")
            data = handle.read(expected + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"IDX file {str(path)!r} cannot be read: {exc}") from None
    if len(data) != expected:
        raise DataError(
            f"IDX file {str(path)!r} is truncated or padded: header says {shape} ({expected} bytes), "
            f"file holds {len(data)}{'+' if len(data) > expected else ''}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. a zero dimension beside dimensions whose product overflows numpy's size
        raise DataError(f"IDX file {str(path)!r} declares an impossible shape {shape}") from None


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    """Labels must be integers in [0, num_classes): nothing is silently remapped. -> int64 array."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{what}: labels have dtype {labels.dtype}, expected integers")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise DataError(f"{what}: label {int(bad)} is out of range for {num_classes} classes")
    return labels.astype(np.int64)


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
        if images.dtype != np.uint8:
            raise DataError(f"{name} {split}: images are {images.dtype}, expected uint8 pixels (IDX type 0x08)")
        out[split] = ImageSet(torch.from_numpy(images.copy()).unsqueeze(1),
                              torch.from_numpy(_check_labels(labels, len(classes), f"{name} {split}")), classes,
                              f"{name}/{split}")
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


def _unpickle_cifar(path: Path):
    """The object in a CIFAR pickle (allow-listed classes only), the file first checked against MAX_DATA_BYTES."""
    size = path.stat().st_size
    if size > limit("MAX_DATA_BYTES"):
        raise DataError(f"CIFAR batch {str(path)!r} is {size:,} bytes; {how_to_raise('MAX_DATA_BYTES')}")
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="latin1").load()
    except DataError:
        raise
    except Exception as exc:  # pickle raises many types for corrupt bytes
        raise DataError(f"CIFAR batch {str(path)!r} is corrupt: {type(exc).__name__}: {str(exc)[:200]}") from None
    return batch


def _read_cifar_batch(path: Path) -> dict:
    batch = _unpickle_cifar(path)
    if not isinstance(batch, dict) or "data" not in batch:
        raise DataError(f"CIFAR batch {str(path)!r} has no 'data' entry")
    return batch


def _cifar_images(batch: dict, path: Path) -> torch.Tensor:
    """batch['data'] must be the uint8 (N, 3072) array CIFAR ships: a list (which could repeat one shared row
    millions of times) or another dtype is refused before anything is allocated."""
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"{data.dtype} array" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"CIFAR batch {str(path)!r}: 'data' is a {kind}, expected a uint8 array (N, 3072)")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR batch {str(path)!r}: data of shape {data.shape}, expected (N, 3072)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _cifar_labels(batch: dict, key: str, count: int, num_classes: int, path: Path) -> torch.Tensor:
    labels = batch.get(key)
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != count:
        got = f"{len(labels)} entries" if isinstance(labels, (list, np.ndarray)) else type(labels).__name__
        raise DataError(f"CIFAR batch {str(path)!r}: {key!r} must list {count} labels (one per image), got {got}")
    if isinstance(labels, list) and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in labels):
        raise DataError(f"CIFAR batch {str(path)!r}: {key!r} holds non-integer labels")
    return torch.from_numpy(_check_labels(np.asarray(labels), num_classes, f"CIFAR batch {str(path)!r}"))


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
        classes = _read_cifar_batch_meta(meta, "label_names", 10)
    out = {}
    for split, files in (("train", names[:5]), ("test", names[5:])):
        batches = [(folder / n, _read_cifar_batch(folder / n)) for n in files]
        parts = [(_cifar_images(b, p), b, p) for p, b in batches]
        images = torch.cat([x for x, _, _ in parts])
        labels = torch.cat([_cifar_labels(b, "labels", len(x), 10, p) for x, b, p in parts])
        out[split] = ImageSet(images, labels, classes, f"cifar10/{split}")
    return out


def _read_cifar_batch_meta(path: Path, key: str, count: int):
    """The `count` class names of a meta file; DataError when `key` holds anything else."""
    meta = _unpickle_cifar(path)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not (isinstance(names, list) and len(names) == count and all(isinstance(n, str) and len(n) < 200
                                                                     for n in names)):
        raise DataError(f"CIFAR meta file {str(path)!r}: {key!r} must list {count} class names")
    return names


def load_cifar100(root: Path) -> dict[str, ImageSet]:
    folder = root / "cifar-100-python" if (root / "cifar-100-python").is_dir() else root
    _require_root(folder, "cifar100", ["train", "test", "meta"])
    for name in ("train", "test"):
        if not (folder / name).is_file():
            raise DataError(f"cifar100: {name!r} missing in {str(folder)!r} (expected train, test, meta)")
    classes = [f"class_{i}" for i in range(100)]
    if (folder / "meta").is_file():
        classes = _read_cifar_batch_meta(folder / "meta", "fine_label_names", 100)
    out = {}
    for split in ("train", "test"):
        batch = _read_cifar_batch(folder / split)
        images = _cifar_images(batch, folder / split)
        labels = _cifar_labels(batch, "fine_labels", len(images), 100, folder / split)
        out[split] = ImageSet(images, labels, classes, f"cifar100/{split}")
    return out


# ----------------------------------------------------------------------------------------- SVHN
def _svhn_declared(path: Path) -> None:
    """Check the shapes and classes the .mat header declares (scipy's whosmat reads headers only) before loadmat
    allocates anything: X uint8 (32, 32, 3, N), y (N, 1), N × 3072 within MAX_DATA_BYTES."""
    from scipy.io import whosmat  # deferred: heavy optional import (scipy, ~0.15 s), only for SVHN's .mat files

    try:
        declared = {name: (tuple(shape), kind) for name, shape, kind in whosmat(path)}
    except Exception as exc:  # scipy raises several types for corrupt files
        raise DataError(f"svhn: {str(path)!r} is not a readable .mat file: {type(exc).__name__}: "
                        f"{str(exc)[:200]}") from None
    if "X" not in declared or "y" not in declared:
        raise DataError(f"svhn: {str(path)!r} holds {sorted(declared)[:10]}, expected variables 'X' and 'y'")
    (x_shape, x_kind), (y_shape, _) = declared["X"], declared["y"]
    if len(x_shape) != 4 or x_shape[:3] != (32, 32, 3) or x_kind != "uint8":
        raise DataError(f"svhn: {str(path)!r}: X is {x_kind} {x_shape}, expected uint8 (32, 32, 3, N)")
    if math.prod(y_shape) != x_shape[3]:
        raise DataError(f"svhn: {str(path)!r}: y has shape {y_shape} for {x_shape[3]} images")
    _check_declared_bytes(math.prod(x_shape), path, "svhn file")


def _svhn_labels(y: np.ndarray, path: Path) -> np.ndarray:
    """SVHN stores digit 0 as label 10: labels 1..10 -> 1..9, 0; any other value is an error, never wrapped."""
    y = np.asarray(y).reshape(-1)
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"svhn: {str(path)!r}: labels are not whole numbers")
    elif y.dtype.kind not in "iu":
        raise DataError(f"svhn: {str(path)!r}: labels have dtype {y.dtype}, expected integers 1..10")
    if y.size and (y.min() < 1 or y.max() > 10):
        bad = y[(y < 1) | (y > 10)][0].item()
        raise DataError(f"svhn: {str(path)!r}: label {bad} is outside 1..10 (10 stands for the digit 0)")
    labels = y.astype(np.int64)
    labels[labels == 10] = 0
    return labels


def load_svhn(root: Path) -> dict[str, ImageSet]:
    from scipy.io import loadmat  # deferred: heavy optional import (scipy, ~0.15 s), only for SVHN's .mat files

    _require_root(root, "svhn", ["train_32x32.mat", "test_32x32.mat"])
    out = {}
    for split in ("train", "test", "extra"):
        path = root / f"{split}_32x32.mat"
        if not path.is_file():
            if split == "extra":
                continue
            raise DataError(f"svhn: {path.name!r} missing in {str(root)!r} (expected train_32x32.mat, test_32x32.mat)")
        _svhn_declared(path)
        try:
            mat = loadmat(path, variable_names=["X", "y"])
        except Exception as exc:  # scipy raises several types for corrupt files
            raise DataError(f"svhn: {str(path)!r} is not a readable .mat file: {exc}") from None
        if mat["X"].dtype != np.uint8 or mat["X"].ndim != 4:
            raise DataError(f"svhn: {str(path)!r}: X is {mat['X'].dtype} {mat['X'].shape}, expected uint8 4-D")
        images = np.transpose(mat["X"], (3, 2, 0, 1))  # (32, 32, 3, N) -> (N, 3, 32, 32)
        labels = _svhn_labels(mat["y"], path)
        out[split] = ImageSet(torch.from_numpy(images.copy()), torch.from_numpy(labels), [str(i) for i in range(10)],
                              f"svhn/{split}")
    return out


# --------------------------------------------------------------------------------------- STL-10
def _read_stl_images(path: Path) -> torch.Tensor:
    size = path.stat().st_size
    _check_declared_bytes(size, path, "stl10 file")
    if size % (3 * 96 * 96):
        raise DataError(f"stl10: {str(path)!r} holds {size} bytes, not a whole number of 3×96×96 images")
    raw = np.fromfile(path, dtype=np.uint8)
    # stored column-major per channel: (N, 3, 96, 96) with H and W swapped
    return torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())


def _read_stl_labels(path: Path, count: int) -> torch.Tensor:
    """One byte per image, 1..10 -> 0..9; another count or value is an error."""
    size = path.stat().st_size
    if size != count:
        raise DataError(f"stl10: {str(path)!r} holds {size} labels for {count} images")
    raw = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1
    return torch.from_numpy(_check_labels(raw, 10, f"stl10: {str(path)!r} (labels 1..10)"))


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
        labels = _read_stl_labels(folder / f"{split}_y.bin", len(images))
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
        with pil_pixel_limit(), Image.open(path) as image:
            if image.width * image.height > limit("MAX_IMAGE_PIXELS"):  # header only: nothing decoded yet
                raise DataError(f"image file {str(path)!r} is {image.width}×{image.height} pixels; "
                                f"{how_to_raise('MAX_IMAGE_PIXELS')}")
            image.load()
            image = exif_upright(image)  # EXIF orientation honoured, as on the streamed path (decode.py)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.asarray(image, dtype=np.float64)
                peak = 65535.0 if array.max() > 255 else 255.0
                image = Image.fromarray((array / peak * 255).round().astype(np.uint8))
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    except Image.DecompressionBombError as exc:
        raise DataError(f"image file {str(path)!r} is too large to decode ({exc}); "
                        f"{how_to_raise('MAX_IMAGE_PIXELS')}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
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
