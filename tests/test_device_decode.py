"""`data.decode: gpu`: JPEGs decoded on the training device. The device path is the same code on the CPU (torchvision's
decode_jpeg with device='cpu'), so these tests run it here: orientation, crops, the per-file fallback and bad files,
against the CPU path of the workers."""
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.config import DataConfig
from ssl_kit.data.crops import CropSpec, expand_views
from ssl_kit.data.decode import _UPRIGHT
from ssl_kit.data.device_decode import cut_view, plan_jpeg, upright_tensor
from ssl_kit.data.sources import build_index
from ssl_kit.data.stream import StreamLoader
from ssl_kit.engine.loading import device_decode
from ssl_kit.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))


def photo(width: int, height: int, phase: float = 0.0) -> np.ndarray:
    """A smooth RGB test image, uint8 (height, width, 3)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [128 + 100 * np.sin(x / 17.0 + k + phase) * np.cos(y / 11.0 - k) for k in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("turn", range(1, 9))
def test_upright_tensor_turns_as_pil_does(turn):
    stored = photo(7, 5)
    expected = np.asarray(Image.fromarray(stored).transpose(_UPRIGHT[turn])) if turn in _UPRIGHT else stored
    got = upright_tensor(torch.from_numpy(stored).permute(2, 0, 1), turn).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_cut_view_is_antialiased_bilinear_as_pil():
    image = photo(96, 64)
    box = (5, 9, 40, 60)  # top, left, h, w
    expected = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR, box=(9, 5, 69, 45)), dtype=float)
    got = cut_view(torch.from_numpy(image).permute(2, 0, 1), box, 16, False).permute(1, 2, 0).numpy()
    assert np.abs(got - expected).mean() < 1.0  # both antialiased bilinear; float rounding apart
    flipped = cut_view(torch.from_numpy(image).permute(2, 0, 1), box, 16, True).permute(1, 2, 0).numpy()
    assert np.array_equal(flipped, got[:, ::-1])


def jpeg_bytes(array: np.ndarray, turn: int = 1, mode: str = "RGB") -> bytes:
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    if turn != 1:
        exif = Image.Exif()
        exif[0x0112] = turn
        image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    else:
        image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_plan_takes_rgb_and_grey_jpegs_and_leaves_the_rest_to_the_cpu():
    views = expand_views([CropSpec(8, count=2, flip=True)])
    job = plan_jpeg(jpeg_bytes(photo(40, 30), turn=6), "a.jpg", views, 3, 11)
    assert job is not None and job.turn == 6 and len(job.boxes) == 2
    assert all(top + h <= 40 and left + w <= 30 for top, left, h, w in job.boxes)  # upright grid: 30 wide, 40 high
    assert plan_jpeg(jpeg_bytes(photo(40, 30), mode="L"), "g.jpg", views, 3, 11) is not None
    png = io.BytesIO()
    Image.fromarray(photo(40, 30)).save(png, "PNG")
    assert plan_jpeg(png.getvalue(), "p.png", views, 3, 11) is None
    cmyk = io.BytesIO()
    Image.fromarray(photo(40, 30)).convert("CMYK").save(cmyk, "JPEG")
    assert plan_jpeg(cmyk.getvalue(), "c.jpg", views, 3, 11) is None


def folder(root, count=24):
    """JPEGs of several sizes and EXIF orientations, a PNG, a CMYK JPEG and a truncated JPEG (header intact)."""
    root.mkdir()
    for i in range(count):
        width, height = 60 + 7 * i, 44 + 5 * (i % 4)
        (root / f"{i:03d}.jpg").write_bytes(jpeg_bytes(photo(width, height, i), turn=1 + i % 8))
    Image.fromarray(photo(50, 40)).save(root / "png.png")
    Image.fromarray(photo(50, 40)).convert("CMYK").save(root / "cmyk.jpg")
    whole = jpeg_bytes(photo(200, 150, 9.0))
    (root / "truncated.jpg").write_bytes(whole[:len(whole) // 3])
    return build_index("images", str(root))


def test_device_decoded_batches_match_the_workers_cpu_decode(tmp_path):
    index = folder(tmp_path / "f")
    n = len(index)
    names = [index.path(i).rsplit("/", 1)[-1] for i in range(n)]
    truncated = names.index("truncated.jpg")
    keep = np.array([i for i in range(n) if i != truncated])
    views = [CropSpec(16, scale=(0.3, 1.0), count=2, flip=True), CropSpec(8, scale=(0.1, 0.4))]
    kw = dict(views=views, workers=0, unlabeled=keep, mu=1, u_views=[CropSpec(12)])
    cpu = StreamLoader(index, keep, 8, 5, **kw)
    device = StreamLoader(index, keep, 8, 5, decode_on_device=True, **kw)
    for step in range(3):  # every good file once, labeled and unlabeled
        a, b = cpu.batch(step), device.batch(step)
        assert torch.equal(a.x_index, b.x_index) and torch.equal(a.u_image_index, b.u_image_index)
        for u, v in zip(a.views + a.u_views, b.views + b.u_views):
            difference = (u.float() - v.float()).abs()
            # the CPU path decodes at a JPEG DCT reduction and resizes with PIL; the same boxes, flips and turns
            # give views a few grey levels apart (a wrong box, flip or turn would be ~50 apart)
            assert difference.mean() < 4.0, difference.mean()
    assert cpu.bad.count == device.bad.count == 0


def test_a_jpeg_the_decoders_refuse_is_a_bad_file_with_grey_views(tmp_path):
    index = folder(tmp_path / "f", count=4)
    truncated = [index.path(i).endswith("truncated.jpg") for i in range(len(index))].index(True)
    loader = StreamLoader(index, np.array([truncated]), 1, 0, [CropSpec(8)], workers=0, decode_on_device=True,
                          max_bad_fraction=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = loader.batch(0)
    assert batch.x_index.tolist() == [-1] and bool((batch.x == 128).all())
    assert list(loader.bad.files) == [index.path(truncated)]
    assert any("skipping bad image" in str(w.message) for w in caught)


def test_a_file_that_is_no_image_is_substituted_in_the_worker_as_on_the_cpu_path(tmp_path):
    index = folder(tmp_path / "f", count=6)
    (tmp_path / "f" / "000.jpg").write_bytes(b"not a jpeg at all")
    kw = dict(views=[CropSpec(8)], workers=0, max_bad_fraction=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = StreamLoader(index, np.arange(6), 6, 0, **kw).batch(0)
        b = StreamLoader(index, np.arange(6), 6, 0, decode_on_device=True, **kw).batch(0)
    assert torch.equal(a.x_index, b.x_index) and 0 not in a.x_index.tolist()


def test_gpu_decode_is_refused_without_cuda_and_with_worker_photometric():
    with pytest.raises(ConfigError, match="data.decode: gpu .*CUDA.* trains on cpu"):
        device_decode("gpu", torch.device("cpu"))
    assert device_decode("cpu", torch.device("cpu")) is False
    with pytest.raises(ValueError, match="data.photometric: device"):
        DataConfig(dataset="digits", decode="gpu", photometric="workers")
    with pytest.raises(DataError, match="cannot run the photometric"):
        StreamLoader(build_index_stub(), np.arange(1), 1, 0, [CropSpec(8)], workers=0, decode_on_device=True,
                     photometric=[lambda x: x])


def build_index_stub():
    class Index:
        labels = np.zeros(1, dtype=np.int64)

        def __len__(self):
            return 1
    return Index()


def test_jobs_cross_worker_processes_unchanged(tmp_path):
    """The compressed bytes travel from DataLoader workers to the trainer (shared memory): the same batch with 0 and
    2 workers."""
    index = folder(tmp_path / "f", count=10)
    good = np.array([i for i in range(len(index)) if not index.path(i).endswith("truncated.jpg")])
    views = [CropSpec(16, scale=(0.3, 1.0), count=2, flip=True)]
    here = StreamLoader(index, good, 8, 5, views, workers=0, decode_on_device=True).batch(1)
    there = StreamLoader(index, good, 8, 5, views, workers=2, decode_on_device=True).batch(1)
    assert torch.equal(here.x_index, there.x_index)
    assert all(torch.equal(u, v) for u, v in zip(here.views, there.views))
