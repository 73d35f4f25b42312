"""Crop boxes, reduced-resolution decode, bad files and the StreamLoader (determinism across workers, resume,
rank slicing), on files the tests write."""
import functools
import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.data.crops import CropSpec, center_box, crop_box, expand_views, flip_bit
from ssl_kit.data.decode import BadImage, decode_eval, decode_views
from ssl_kit.data.loader import DeviceLoader
from ssl_kit.data.sources import build_index
from ssl_kit.data.stream import StreamLoader, check_index
from ssl_kit.errors import DataError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))


def photo(width, height):
    """A smooth natural-looking RGB test image (gradients + low-frequency waves)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [128 + 100 * np.sin(x / 37.0 + k) * np.cos(y / 23.0 - k) for k in range(3)]
    return Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))


def encoded(image, fmt="JPEG", **kw):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def pool(root, n, size=(20, 14)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i:05d}.jpg")
    return build_index("images", str(root))


# ------------------------------------------------------------------------------------------------ crops
def test_crop_boxes_inside_and_follow_ranges():
    spec = CropSpec(32, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    h, w = 300, 400
    boxes = [crop_box(h, w, spec, seed=3, position=p, view=v) for p in range(1500) for v in range(2)]
    areas, aspects = [], []
    for top, left, bh, bw in boxes:
        assert 0 <= top and 0 <= left and top + bh <= h and left + bw <= w
        areas.append(bh * bw / (h * w))
        aspects.append(math.log(bw / bh))
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.2 - 0.01 and areas.max() <= 0.6 + 0.01
    assert aspects.min() >= math.log(0.5) - 0.02 and aspects.max() <= math.log(2.0) + 0.02
    # the same distribution as torchvision's RandomResizedCrop (rejection of boxes that do not fit included)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    reference = [RandomResizedCrop.get_params(torch.zeros(1, h, w), [0.2, 0.6], [0.5, 2.0]) for _ in range(1000)]
    ref_areas = np.array([bh * bw / (h * w) for _, _, bh, bw in reference])
    ref_aspects = np.array([math.log(bw / bh) for _, _, bh, bw in reference])
    assert abs(areas.mean() - ref_areas.mean()) < 0.015 and abs(areas.std() - ref_areas.std()) < 0.015
    assert abs(aspects.mean() - ref_aspects.mean()) < 0.06 and abs(aspects.std() - ref_aspects.std()) < 0.03
    assert crop_box(h, w, spec, 3, 7, 1) == crop_box(h, w, spec, 3, 7, 1)
    assert len(set(boxes)) > 2900  # distinct (position, view) give distinct boxes


def test_crop_box_fallback_is_torchvision_centre_crop():
    spec = CropSpec(8, scale=(0.99, 1.0), ratio=(1.0, 1.0))
    assert crop_box(10, 100, spec, 0, 0, 0) == (0, 45, 10, 10)  # no square of 99% area fits: centre crop
    assert center_box(300, 400, 224, 0.875) == (19, 69, 262, 262)  # shorter 300 -> 256, crop 224 = 262 px
    flips = [flip_bit(0, p, 0) for p in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55 and flips == [flip_bit(0, p, 0) for p in range(2000)]
    with pytest.raises(DataError, match=r"scale must satisfy 0 < low <= high <= 1, got \(0.5, 0.2\)"):
        CropSpec(8, scale=(0.5, 0.2))


# ----------------------------------------------------------------------------------------------- decode
def test_reduced_resolution_decode_matches_full_decode():
    """Tolerance: mean |difference| ≤ 3 grey levels of 255 between DCT-scaled decode + box resize and full decode
    + the same box resize (the JPEG decoder's own scaled IDCT differs from resampling by a few levels)."""
    image = photo(1600, 1200)
    data = encoded(image, quality=92)
    views = expand_views([CropSpec(64, scale=(0.3, 1.0), count=3, flip=True), CropSpec(32, scale=(0.05, 0.3), count=2)])
    reduced = decode_views(data, "p.jpg", views, seed=1, position=5, channels=3)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    for v, (spec, got) in enumerate(zip(views, reduced)):
        top, left, h, w = crop_box(1200, 1600, spec, 1, 5, v)
        want = full.resize((spec.size, spec.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if spec.flip and flip_bit(1, 5, v):
            want = want.transpose(Image.FLIP_LEFT_RIGHT)
        want = np.asarray(want).transpose(2, 0, 1).astype(np.float64)
        assert got.shape == (3, spec.size, spec.size) and got.dtype == np.uint8
        assert np.abs(got - want).mean() <= 3.0, v
    opened = Image.open(io.BytesIO(data))
    opened.draft("RGB", (1600 // 4, 1200 // 4))
    assert opened.size == (400, 300)  # the reduction decode_views relies on exists for this file


def test_modes_and_channels_and_eval_view():
    gray16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    rgba = Image.new("RGBA", (40, 30), (200, 100, 50, 0))
    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))
    palette = Image.new("P", (40, 30))
    for image, fmt in ((gray16, "PNG"), (rgba, "PNG"), (cmyk, "JPEG"), (palette, "PNG")):
        for channels in (1, 3):
            out = decode_views(encoded(image, fmt), "x", [CropSpec(8)], 0, 0, channels)[0]
            assert out.shape == (channels, 8, 8) and out.dtype == np.uint8
    red = decode_views(encoded(rgba, "PNG"), "x", [CropSpec(8)], 0, 0, 3)[0]
    assert red[:, 0, 0].tolist() == [200, 100, 50]  # alpha dropped, as formats.read_image does
    luma = decode_views(encoded(rgba, "PNG"), "x", [CropSpec(8)], 0, 0, 1)[0]
    assert abs(int(luma[0, 0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1
    wide = np.zeros((100, 200, 3), dtype=np.uint8)
    wide[:, 50:150] = 255  # the centre square is white, the sides black
    view = decode_eval(encoded(Image.fromarray(wide), "PNG"), "w", 16, 3, 0.875)
    assert view.shape == (3, 16, 16) and view.min() == 255


@pytest.mark.parametrize("kind", ["zero", "text", "truncated", "bomb"])
def test_bad_file_kinds_raise_bad_image_naming_the_file(kind, monkeypatch):
    good = encoded(photo(200, 150), quality=90)
    data = {"zero": b"", "text": b"hello, I am not an image", "truncated": good[:len(good) // 2], "bomb": good}[kind]
    if kind == "bomb":
        monkeypatch.setenv("SSL_KIT_MAX_IMAGE_PIXELS", "1000")  # the cap ssl_kit applies (and hands to PIL)
    reason = {"zero": r"empty file \(0 bytes\)", "text": "not a readable image", "truncated": "decoding failed",
              "bomb": "decompression bomb"}[kind]
    with pytest.raises(BadImage, match=rf"image file 'f.jpg' cannot be used: {reason}"):
        decode_views(data, "f.jpg", [CropSpec(16)], 0, 0, 3)


# ----------------------------------------------------------------------------------------------- loader
def batches(loader, steps):
    return [loader.batch(s) for s in steps]


def same(a, b):
    assert torch.equal(a.y, b.y) and torch.equal(a.x_index, b.x_index)
    assert all(torch.equal(u, v) for u, v in zip(a.views, b.views))
    if a.u_views is not None:
        assert torch.equal(a.u_index, b.u_index) and all(torch.equal(u, v) for u, v in zip(a.u_views, b.u_views))


def test_same_views_across_worker_counts_and_resume(tmp_path):
    index = pool(tmp_path / "p", 40)
    index.labels[:] = np.arange(40) % 4
    views = [CropSpec(12, count=2, flip=True), CropSpec(6, scale=(0.05, 0.4))]
    kw = dict(views=views, unlabeled=np.arange(40), mu=2, u_views=[CropSpec(10), CropSpec(10, (0.2, 1.0))])
    runs = {w: batches(StreamLoader(index, np.arange(0, 40, 2), 4, 7, workers=w, **kw), range(6)) for w in (0, 1, 2)}
    for w in (1, 2):
        for a, b in zip(runs[0], runs[w]):
            same(a, b)
    first = runs[0][0]
    assert [v.shape for v in first.views] == [(4, 3, 12, 12)] * 2 + [(4, 3, 6, 6)]
    assert first.u.shape == (8, 3, 10, 10) and first.u is first.u_views[0] and first.x is first.views[0]
    assert not torch.equal(first.views[0], first.views[1])  # two crops of the same images
    resumed = StreamLoader(index, np.arange(0, 40, 2), 4, 7, workers=2, **kw)
    for step in (4, 5, 2):  # jump ahead, continue, jump back
        same(resumed.batch(step), runs[0][step])


def test_order_matches_device_loader_and_ranks_cover_the_epoch(tmp_path):
    index = pool(tmp_path / "p", 24)
    views = [CropSpec(8)]
    stream = StreamLoader(index, np.arange(24), 8, 3, views, workers=0)
    device = DeviceLoader(torch.zeros(24, 1, 2, 2, dtype=torch.uint8), torch.zeros(24, dtype=torch.long),
                          torch.arange(24), 8, 3)
    assert stream.steps_per_epoch == device.steps_per_epoch == 3
    for step in range(3):
        assert torch.equal(stream.batch(step).x_index, device.batch(step).x_index)
    shares = {r: StreamLoader(index, np.arange(24), 8, 3, views, rank=r, world_size=2, workers=0) for r in (0, 1)}
    seen = [shares[r].batch(s).x_index for s in range(3) for r in (0, 1)]
    assert sorted(torch.cat(seen).tolist()) == list(range(24))  # disjoint and covering
    full = stream.batch(1)
    assert torch.equal(torch.cat([shares[0].batch(1).views[0], shares[1].batch(1).views[0]]), full.views[0])


def corrupt_pool(tmp_path, n, bad):
    index = pool(tmp_path / "p", n)
    for i in bad:
        (tmp_path / "p" / f"{i:05d}.jpg").write_bytes(b"")
    return index


def test_bad_images_skip_substitutes_and_counts(tmp_path):
    index = corrupt_pool(tmp_path, 200, [3])
    loader = StreamLoader(index, np.arange(200), 50, 0, [CropSpec(8)], workers=0, max_bad_fraction=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = batches(loader, range(8))  # two epochs: the bad file comes twice
    assert loader.bad.count == 1 and loader.bad.bad_reads == 2
    assert loader.bad.lines() == [f"{tmp_path}/p/00003.jpg\tempty file (0 bytes)"]
    assert sum("skipping bad image" in str(w.message) for w in caught) == 1  # one warning per file
    assert all(3 not in b.x_index.tolist() for b in got)  # a substitute took its place
    again = StreamLoader(index, np.arange(200), 50, 0, [CropSpec(8)], workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in zip(got, batches(again, range(8))):
            same(a, b)  # the substitute is deterministic


def test_bad_images_error_and_max_fraction(tmp_path):
    index = corrupt_pool(tmp_path, 100, [0, 1, 2])
    strict = StreamLoader(index, np.arange(100), 100, 0, [CropSpec(8)], workers=0, bad_images="error")
    with pytest.raises(DataError, match=r"0000[012].jpg: empty file \(0 bytes\) \(data.bad_images=error"):
        strict.batch(0)
    lenient = StreamLoader(index, np.arange(100), 100, 0, [CropSpec(8)], workers=0, max_bad_fraction=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"3 bad image files \(3 of 100 reads\) exceed data.max_bad_fraction=0.01"):
            lenient.batch(0)
    reads, bad = check_index(index, workers=0)
    assert reads == 100 and sorted(os.path.basename(p) for p, _ in bad) == ["00000.jpg", "00001.jpg", "00002.jpg"]


def test_symlinked_and_missing_files_are_bad_not_tracebacks(tmp_path):
    index = pool(tmp_path / "p", 10)
    os.remove(tmp_path / "p" / "00004.jpg")  # deleted after indexing
    loader = StreamLoader(index, np.arange(10), 10, 0, [CropSpec(8)], workers=2, max_bad_fraction=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader.batch(0)
    assert list(loader.bad.files) == [f"{tmp_path}/p/00004.jpg"]
    assert loader.bad.files[f"{tmp_path}/p/00004.jpg"].startswith("cannot read the file (No such file")


def _stream_peak_rss(root: str, n: int, steps: int) -> tuple[int, int]:
    """(peak RSS in bytes, index bytes) of a fresh process streaming `steps` batches over n generated JPEGs."""
    import subprocess
    import sys

    code = f"""
import resource, numpy as np, sys, warnings
from pathlib import Path

from PIL import Image
from pathlib import Path
root = Path({root!r})
root.mkdir(parents=True, exist_ok=True)
tiny = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8))
for i in range({n}):
    tiny.save(root / f"{{i:06d}}.jpg", quality=80)
from ssl_kit.data.sources import build_index
from ssl_kit.data.stream import StreamLoader
from ssl_kit.data.crops import CropSpec
index = build_index("images", str(root))
loader = StreamLoader(index, np.arange(len(index)), 64, 0, [CropSpec(16, count=2)], workers=0)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for step in range({steps}):
    loader.batch(step)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, index.nbytes())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    rss_kb, index_bytes = map(int, out.stdout.split())
    return rss_kb * 1024, index_bytes


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Peak RSS streaming 40 batches over 20,000 JPEGs exceeds the same over 2,000 by at most the index growth plus
    4 MB (allocator noise, Python objects of the index build)."""
    small, small_index = _stream_peak_rss(str(tmp_path / "small"), 2000, 40)
    large, large_index = _stream_peak_rss(str(tmp_path / "large"), 20000, 40)
    assert large - small <= (large_index - small_index) + 4 * 2 ** 20, (small, large, large_index)


# ------------------------------------------------------------------------- photometric in the workers
def _contrastive_views(n_views=3):
    from ssl_kit.data.views import ContrastiveView, Normalize

    normalize = Normalize([0.5] * 3, [0.25] * 3)
    return [ContrastiveView(normalize, jitter_strength=1.0, blur_prob=0.5, solarize_prob=0.2) for _ in range(n_views)]


def test_worker_photometric_is_a_pure_function_of_the_key(tmp_path):
    """Photometric augmentation in the workers: the same uint8 views for 0/1/2 workers, after a jump (resume) and
    whatever the trainer's RNG did meanwhile; the trainer's RNG is not moved by it (workers=0 runs it in-process)."""
    index = pool(tmp_path / "p", 40)
    crops = [CropSpec(12, count=2, flip=True), CropSpec(6, scale=(0.05, 0.4))]
    views = _contrastive_views()
    photometric = [v.photometric_uint8 for v in views]
    plain = StreamLoader(index, np.arange(40), 4, 7, crops, workers=0)
    runs = {}
    for w in (0, 1, 2):
        torch.manual_seed(w)
        runs[w] = batches(StreamLoader(index, np.arange(40), 4, 7, crops, workers=w, photometric=photometric), range(5))
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    in_process = StreamLoader(index, np.arange(40), 4, 7, crops, workers=0, photometric=photometric).batch(3)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is untouched
    same(in_process, runs[0][3])
    for w in (1, 2):
        for a, b in zip(runs[0], runs[w]):
            same(a, b)
    resumed = StreamLoader(index, np.arange(40), 4, 7, crops, workers=2, photometric=photometric)
    for step in (4, 1):
        same(resumed.batch(step), runs[0][step])
    first, raw = runs[0][0], plain.batch(0)
    assert first.views_augmented and not raw.views_augmented
    assert [v.dtype for v in first.views] == [torch.uint8] * 3
    assert torch.equal(first.y, raw.y) and torch.equal(first.x_index, raw.x_index)
    assert not torch.equal(first.views[0], raw.views[0])  # jittered
    assert not torch.equal(runs[0][1].views[0], runs[0][2].views[0])


def test_worker_photometric_equals_the_device_ops_rounded_once(tmp_path):
    """The workers apply the device's photometric ops (seeded), rounded once to uint8 — exactly with the torch
    backend, within one level with OpenCV (what CPU workers use); identity views leave the crops as they are; the
    trainer then only normalises (ContrastiveView(..., augmented=True))."""
    from ssl_kit.data.views import ContrastiveView, Normalize
    from ssl_kit.data.crops import view_rng
    from ssl_kit.data.stream import PHOTOMETRIC_CHUNK, PHOTOMETRIC_VIEW

    index = pool(tmp_path / "p", 16)
    crops = [CropSpec(10, count=2)]
    views = _contrastive_views(2)
    raw = StreamLoader(index, np.arange(16), 8, 5, crops, workers=0).batch(1)
    got = StreamLoader(index, np.arange(16), 8, 5, crops, workers=0,
                       photometric=[functools.partial(v.photometric_uint8, backend="torch") for v in views]).batch(1)
    opencv = StreamLoader(index, np.arange(16), 8, 5, crops, workers=0,
                          photometric=[v.photometric_uint8 for v in views]).batch(1)
    for v, view in enumerate(views):
        torch.manual_seed(view_rng(5 * 2, 8, PHOTOMETRIC_VIEW + v).getrandbits(63))  # step 1 starts at position 8
        expected = torch.cat([(view.photometric(chunk.float() / 255) * 255).round().to(torch.uint8)
                              for chunk in raw.views[v].split(PHOTOMETRIC_CHUNK)])  # 8 images: 2 chunks
        assert torch.equal(got.views[v], expected)
        assert (opencv.views[v].int() - expected.int()).abs().max() <= 1
        normalised = view(got.views[v], precropped=True, augmented=True)
        assert torch.allclose(normalised, (got.views[v].float() / 255 - 0.5) / 0.25)
    identity = ContrastiveView(Normalize([0.5] * 3, [0.25] * 3), jitter_prob=0.0, grayscale_prob=0.0)
    same_crops = StreamLoader(index, np.arange(16), 8, 5, crops, workers=0,
                              photometric=[identity.photometric_uint8] * 2).batch(1)
    assert all(torch.equal(a, b) for a, b in zip(same_crops.views, raw.views))
    with pytest.raises(DataError, match="photometric: 1 functions for 2 views"):
        StreamLoader(index, np.arange(16), 8, 5, crops, workers=0, photometric=[identity.photometric_uint8])
