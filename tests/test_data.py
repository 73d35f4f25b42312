"""Every loader on tiny files written here in the real on-disk formats, splits, and augmentation."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.data.specs import load_splits, parse_spec
from ssl_kit.errors import DataError


def write_idx(path, array, compress=False):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)


def make_idx_root(root, compress, n_train=12, n_test=6):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), compress)
    return root


@pytest.mark.parametrize("compress", [False, True])
def test_idx_loader_mnist_and_fashion(tmp_path, compress):
    root = make_idx_root(tmp_path / f"mnist{compress}", compress)
    for name in ("mnist", "fashion-mnist"):
        splits = load_splits(f"{name}:{root}")
        assert splits["train"].images.shape == (12, 1, 28, 28) and splits["train"].images.dtype == torch.uint8
        assert splits["test"].labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert load_splits(f"fashion-mnist:{root}")["train"].classes[0] == "T-shirt/top"


def test_idx_truncated_and_zero_byte_files_are_named(tmp_path):
    root = make_idx_root(tmp_path / "m", False)
    data = (root / "train-images-idx3-ubyte").read_bytes()
    (root / "train-images-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        load_splits(f"mnist:{root}")
    (root / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*no IDX header"):
        load_splits(f"mnist:{root}")


def test_missing_root_says_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist .*train-images-idx3-ubyte"):
        load_splits(f"mnist:{tmp_path / 'nothing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cifar10: \['data_batch_1'.*missing"):
        load_splits(f"cifar10:{tmp_path / 'empty'}")


def write_cifar_batch(path, n, label_key, n_classes):
    rng = np.random.default_rng(len(str(path)))
    batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(np.arange(n) % n_classes)}
    with open(path, "wb") as handle:
        pickle.dump(batch, handle)
    return batch


def test_cifar10_loader(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    first = write_cifar_batch(folder / "data_batch_1", 4, "labels", 10)
    for i in range(2, 6):
        write_cifar_batch(folder / f"data_batch_{i}", 4, "labels", 10)
    write_cifar_batch(folder / "test_batch", 3, "labels", 10)
    splits = load_splits(f"cifar10:{tmp_path}")
    assert splits["train"].images.shape == (20, 3, 32, 32) and len(splits["test"]) == 3
    # channel-major rows: the first 1024 bytes are the red plane
    assert torch.equal(splits["train"].images[0, 0].flatten(), torch.from_numpy(first["data"][0, :1024]))
    assert splits["train"].classes[0] == "airplane"


def test_cifar100_loader_and_malicious_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(folder / "train", 5, "fine_labels", 100)
    write_cifar_batch(folder / "test", 2, "fine_labels", 100)
    splits = load_splits(f"cifar100:{tmp_path}")
    assert len(splits["train"]) == 5 and splits["train"].num_classes == 100

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    evil_root = tmp_path / "evil" / "cifar-100-python"
    evil_root.mkdir(parents=True)
    with open(evil_root / "train", "wb") as handle:
        pickle.dump({"data": Evil()}, handle)
    write_cifar_batch(evil_root / "test", 2, "fine_labels", 100)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_splits(f"cifar100:{tmp_path / 'evil'}")
    assert not marker.exists()


def test_svhn_loader(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                 "y": (np.arange(n) % 10 + 1).reshape(-1, 1)})
    splits = load_splits(f"svhn:{tmp_path}")
    assert splits["train"].images.shape == (6, 3, 32, 32)
    assert splits["train"].labels.tolist() == [1, 2, 3, 4, 5, 6]
    assert splits["test"].labels.max() < 10


def test_stl10_loader(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 96, 96), dtype=np.uint8)
    for split, n in (("train", 3), ("test", 2)):
        stack = np.stack([image] * n)
        stack.transpose(0, 1, 3, 2).copy().tofile(folder / f"{split}_X.bin")  # column-major as in the real files
        (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    np.stack([image] * 2).transpose(0, 1, 3, 2).copy().tofile(folder / "unlabeled_X.bin")
    splits = load_splits(f"stl10:{tmp_path}")
    assert splits["train"].images.shape == (3, 3, 96, 96)
    assert torch.equal(splits["train"].images[0], torch.from_numpy(image))
    assert splits["train"].labels.tolist() == [0, 1, 2]
    assert len(splits["unlabeled"]) == 2 and splits["unlabeled"].labels.tolist() == [-1, -1]


def make_image_folder(root, per_class=4, modes=("L", "RGB", "RGBA", "CMYK", "I;16")):
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            mode = modes[(c * per_class + i) % len(modes)]
            size = (10 + i, 12 + c)
            if mode == "I;16":
                image = Image.fromarray((np.full(size[::-1], 40000 * (c + 1) // 2)).astype(np.uint16))
            else:
                image = Image.new(mode, size, color=(c * 200,) * len(mode) if mode != "L" else c * 200)
            image.save(root / name / f"{i}.{'tif' if mode in ('CMYK', 'I;16') else 'png'}")


def test_image_folder_mixed_modes_and_sizes(tmp_path):
    make_image_folder(tmp_path / "imgs")
    splits = load_splits(f"imagefolder:{tmp_path / 'imgs'}", folder_size=16)
    total = len(splits["train"]) + len(splits["test"])
    assert total == 8 and splits["train"].classes == ["cat", "dog"]
    assert splits["train"].images.shape[1:] == (3, 16, 16)


def test_image_folder_corrupt_file_is_named_and_left_out(tmp_path):
    """In memory as when training: one bad file is left out with a warning naming it, the run goes on."""
    make_image_folder(tmp_path / "imgs", modes=("RGB",))
    (tmp_path / "imgs" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match=r"left out bad image .*broken\.png: not a readable image"):
        splits = load_splits(f"imagefolder:{tmp_path / 'imgs'}", folder_size=17)
    assert len(splits["train"]) + len(splits["test"]) == 8


def test_image_folder_empty_class(tmp_path):
    make_image_folder(tmp_path / "imgs", modes=("RGB",))
    (tmp_path / "imgs" / "empty").mkdir()
    with pytest.raises(DataError, match=r"without images.*\['empty'\]"):
        load_splits(f"imagefolder:{tmp_path / 'imgs'}", folder_size=18)


def test_builtin_digits_split_is_fixed_and_stratified():
    splits = load_splits("digits")
    assert len(splits["train"]) + len(splits["test"]) == 1797
    counts = torch.bincount(splits["test"].labels)
    assert counts.min() >= 44 and counts.max() <= 46
    assert torch.equal(load_splits("digits")["test"].labels, splits["test"].labels)


def test_printed_and_rotated_digits():
    printed = load_splits("digits-printed,per_font=2")
    assert printed["train"].images.shape[1:] == (1, 32, 32)
    assert set(printed["train"].labels.tolist()) == set(range(10))
    again = load_splits("digits-printed,per_font=2,seed=0")
    assert torch.equal(printed["train"].images, again["train"].images)
    rotated = load_splits("digits-rotated:90")
    assert rotated["train"].images.shape[1:] == (1, 32, 32)
    upright = load_splits("digits-rotated:0")["train"].images
    assert not torch.equal(rotated["train"].images, upright)


@pytest.mark.parametrize("spec,message", [
    ("imagenet", "unknown dataset 'imagenet'"), ("cifar10", "needs a root folder"),
    ("digits-rotated", "give the angle"), ("digits-rotated:abc", "not a number"),
    ("digits,foo=1", "unknown option 'foo'"), ("digits,per_font", "not key=value"), ("", "non-empty"),
])
def test_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        parse_spec(spec)


def test_labeled_split_reproducible_and_errors():
    from ssl_kit.data.splits import labeled_indices, unlabeled_indices

    labels = torch.arange(100) % 10
    a, b = labeled_indices(labels, 4, seed=3), labeled_indices(labels, 4, seed=3)
    assert torch.equal(a, b) and len(a) == 40
    assert torch.bincount(labels[a]).tolist() == [4] * 10
    assert not torch.equal(a, labeled_indices(labels, 4, seed=4))
    with pytest.raises(DataError, match="labels_per_class=11 is larger than class"):
        labeled_indices(labels, 11, seed=0)
    assert len(unlabeled_indices(100, a, include_labeled=False)) == 60
    with pytest.raises(DataError, match="no unlabeled data left"):
        unlabeled_indices(10, torch.arange(10), include_labeled=False)


def test_convert_images_channels_and_size():
    from ssl_kit.data.imageset import convert_images

    rgb = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    rgb[:, 0] = 255
    gray = convert_images(rgb, 16, 1)
    assert gray.shape == (2, 1, 16, 16) and int(gray[0, 0, 0, 0]) == 76  # 0.299 * 255
    assert convert_images(gray, 4, 3).shape == (2, 3, 4, 4)


def test_device_loader_shards_a_global_batch():
    from ssl_kit.data.loader import DeviceLoader

    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    labels = torch.arange(20)
    full = DeviceLoader(images, labels, torch.arange(20), 8, seed=1).batch(3)
    parts = [DeviceLoader(images, labels, torch.arange(20), 8, seed=1, rank=r, world_size=2).batch(3) for r in (0, 1)]
    assert torch.equal(torch.cat([p.y for p in parts]), full.y)
    micro = [DeviceLoader(images, labels, torch.arange(20), 8, seed=1).batch(3, m, 4) for m in range(4)]
    assert torch.equal(torch.cat([m.y for m in micro]), full.y)
