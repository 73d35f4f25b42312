"""Issue 25, the data side: no stale result from a cache (features, file index), bad files of a held-out test split
reported, conflicting file-list labels refused, EXIF orientation honoured, bounded reads of data files."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_kit.cli import main as cli_main
from ssl_kit.data.sources import build_index, cache_dir
from ssl_kit.engine.checkpoint import atomic_save, backbone_record
from ssl_kit.eval.features import FeatureExtractor, feature_cache_dir
from ssl_kit.models.registry import build_backbone

INFO = {"image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_KIT_CACHE", str(tmp_path / "cache"))


def write_folder(root: Path, flip: bool = False, per_class: int = 10) -> None:
    """imagefolder ROOT/a|b: class a red, class b green; `flip` swaps the colours (same names, other content)."""
    for c, name in enumerate("ab"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            array = np.full((20, 20, 3), 30, np.uint8)
            array[:, :, (c + flip) % 2] = 220
            array[i % 20, :, 2] = 100 + 10 * i  # not all identical
            Image.fromarray(array).save(root / name / f"{i:02d}.png")


def rewrite_in_place(root: Path) -> None:
    """New content under the same names, with an mtime that differs from the first write."""
    write_folder(root, flip=True)
    for path in root.rglob("*.png"):
        stamp = path.stat().st_mtime_ns + 5_000_000_000
        os.utime(path, ns=(stamp, stamp))


def extractor() -> FeatureExtractor:
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", 3, 16, {"width": 8}).eval()
    backbone.data_info = dict(INFO)
    return FeatureExtractor(backbone, "cpu", workers=0)


def streamed_test_features(spec: str) -> tuple[torch.Tensor, int]:
    """(test features as float32, images sent through the backbone) from a fresh extractor (no in-memory cache)."""
    ex = extractor()
    feats = ex.dataset_features(spec)["test"][0].float().clone()
    return feats, ex.forward_passes


def test_images_rewritten_in_place_under_the_same_names_miss_the_feature_cache(tmp_path):
    write_folder(tmp_path / "data")
    spec = f"imagefolder:{tmp_path / 'data'},storage=stream"
    first, passes = streamed_test_features(spec)
    assert passes == 20
    again, passes = streamed_test_features(spec)
    assert passes == 0 and torch.equal(first, again)  # unchanged files: served from the cache
    rewrite_in_place(tmp_path / "data")
    rewritten, passes = streamed_test_features(spec)
    assert passes == 20 and not torch.allclose(first, rewritten)  # the new content, not the stale features


def test_features_cached_under_other_library_releases_are_recomputed(tmp_path, monkeypatch):
    """A Pillow (or torch, ...) upgrade can change decoded pixels and features: the cache key stamps the releases."""
    from ssl_kit.common import versions

    write_folder(tmp_path / "data")
    spec = f"imagefolder:{tmp_path / 'data'},storage=stream"
    first, passes = streamed_test_features(spec)
    assert passes == 20 and streamed_test_features(spec)[1] == 0
    upgraded = dict(versions.library_versions(), pillow="99.0.0")
    monkeypatch.setattr("ssl_kit.eval.features.library_versions", lambda: upgraded)
    again, passes = streamed_test_features(spec)
    assert passes == 20 and torch.equal(first, again)  # recomputed (same pixels here, as nothing really changed)
    assert streamed_test_features(spec)[1] == 0  # and cached under the new key
    monkeypatch.setattr("ssl_kit.eval.features.__version__", "0.0.0-other")
    assert streamed_test_features(spec)[1] == 20  # another ssl_kit version: recomputed too


@pytest.mark.parametrize("damage", ["truncate", "other_version", "crafted_labels", "garbage_manifest"])
def test_a_damaged_feature_cache_is_recomputed_with_a_warning(tmp_path, damage):
    write_folder(tmp_path / "data", per_class=5)
    spec = f"imagefolder:{tmp_path / 'data'},storage=stream"
    first, _ = streamed_test_features(spec)
    folder = feature_cache_dir()
    feats = sorted(folder.glob("*.f16.npy"))[-1]
    manifest = feats.with_name(feats.name.replace(".f16.npy", ".json"))
    if damage == "truncate":
        with open(feats, "r+b") as handle:
            handle.truncate(feats.stat().st_size - 7)
    elif damage == "other_version":
        meta = json.loads(manifest.read_text())
        manifest.write_text(json.dumps(dict(meta, format=1)))
    elif damage == "crafted_labels":  # a labels file swapped for another of the same shape: digest mismatch
        labels = feats.with_name(feats.name.replace(".f16.npy", ".labels.npy"))
        np.save(labels, 1 - np.load(labels))
    else:
        manifest.write_bytes(b"\xff[not json")
    for path in folder.glob("*.json"):  # damage every split's entry the same way (train and test)
        if damage == "garbage_manifest":
            path.write_bytes(b"\xff[not json")
    with pytest.warns(UserWarning, match="feature cache .* is invalid"):
        rebuilt, passes = streamed_test_features(spec)
    assert passes > 0 and torch.equal(first, rebuilt)
    _, passes = streamed_test_features(spec)
    assert passes == 0  # the rebuilt entry is trusted again


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 truncated", None])
def test_a_damaged_index_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    write_folder(tmp_path / "data", per_class=3)
    index = build_index("imagefolder", str(tmp_path / "data"))
    (cached,) = cache_dir().glob("*.npz")
    if damage is None:  # a well-formed cache file whose labels point past the classes (crafted)
        with np.load(cached) as data:
            arrays = {k: data[k] for k in data.files}
        arrays["labels"] = arrays["labels"] + 1000
        np.savez(cached, **arrays)
    else:
        cached.write_bytes(damage)
    with pytest.warns(UserWarning, match="index cache .* rebuilding the index"):
        rebuilt = build_index("imagefolder", str(tmp_path / "data"))
    assert np.array_equal(rebuilt.labels, index.labels) and rebuilt.classes == index.classes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_index("imagefolder", str(tmp_path / "data"))  # rewritten: read back silently


def test_knn_through_the_cli_reports_the_rewritten_images_not_the_cached_result(tmp_path, capsys):
    write_folder(tmp_path / "data")
    backbone = build_backbone("small_cnn", 3, 16, {"width": 8})
    checkpoint = tmp_path / "backbone.pt"
    atomic_save(backbone_record("small_cnn", {"width": 8}, INFO, backbone), checkpoint)
    spec = f"imagefolder:{tmp_path / 'data'},storage=stream"

    def knn() -> dict:
        assert cli_main(["knn", "--checkpoint", str(checkpoint), "--data", spec, "--k", "3", "--device", "cpu",
                         "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    knn()
    entries = sorted(p.stat().st_mtime_ns for p in feature_cache_dir().glob("*.json"))
    rewrite_in_place(tmp_path / "data")
    knn()
    assert len(list(feature_cache_dir().glob("*.json"))) == 2 * len(entries)  # new entries, the old ones unused


# ------------------------------------------------------------------------------ bad files of the test split
def test_a_bad_file_of_the_held_out_test_split_is_warned_about_and_listed(tmp_path):
    from ssl_kit.config import validate_recipe
    from ssl_kit.runner import run_recipe
    from tests.conftest import tiny_stage

    for split, count in (("train", 8), ("test", 4)):
        write_folder(tmp_path / "data" / split, per_class=count)
    broken = tmp_path / "data" / "test" / "a" / "01.png"
    broken.write_bytes(broken.read_bytes()[:60])  # truncated PNG
    stage = tiny_stage("s", data={"dataset": "imagefolder", "root": str(tmp_path / "data"), "image_size": 16,
                                  "storage": "stream", "workers": 0}, train={"steps": 2, "batch_size": 8})
    with pytest.warns(UserWarning, match=r"bad image .*01.png in the held-out test split"):
        run_dir, summary = run_recipe(validate_recipe({"seed": 0, "name": "t", "stages": [stage]}), tmp_path / "run")
    assert "s/test/top1" in summary
    listed = (run_dir / "bad_images.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(f"{broken}\t") and "held-out test split" in listed[0]


# --------------------------------------------------------------------------------------- silent ambiguity
def test_a_file_list_naming_one_image_twice_with_two_labels_is_refused(tmp_path):
    from ssl_kit.errors import DataError

    write_folder(tmp_path / "data", per_class=2)
    listing = tmp_path / "data" / "list.csv"
    listing.write_text("a/00.png,cat\nb/00.png,dog\n./a/00.png,dog\n")
    with pytest.raises(DataError, match=r"list.csv:3: './a/00.png' appears again with label 'dog' "
                                        r"\(line 1 gave 'cat'\)"):
        build_index("filelist", str(listing))
    listing.write_text("a/00.png,cat\nb/00.png,dog\na/00.png,cat\n")  # a repeat with the same label is no conflict
    assert len(build_index("filelist", str(listing))) == 3
    listing.write_text(f"a/00.png,cat\n{tmp_path / 'data' / 'a' / '00.png'},dog\n")  # absolute spelling
    assert cli_main(["data", f"filelist:{listing}"]) == 2


def portrait_jpeg(path: Path, turn: int = 6, size=(160, 320)) -> np.ndarray:
    """A portrait image (width, height = size): top half red, bottom half blue, stored sideways with EXIF
    orientation `turn` (6: rotate 90° clockwise to display) -> the upright array (H, W, 3)."""
    width, height = size
    upright = np.zeros((height, width, 3), np.uint8)
    upright[: height // 2, :, 0] = 250
    upright[height // 2:, :, 2] = 250
    inverse = {6: Image.ROTATE_90, 8: Image.ROTATE_270, 3: Image.ROTATE_180}[turn]
    exif = Image.Exif()
    exif[0x0112] = turn
    Image.fromarray(upright).transpose(inverse).save(path, quality=95, exif=exif.tobytes())
    return upright


@pytest.mark.parametrize("turn", [6, 8, 3])
def test_exif_orientation_is_honoured_on_every_decode_path_draft_mode_included(tmp_path, turn):
    from PIL import ImageOps

    from ssl_kit.data.crops import CropSpec
    from ssl_kit.data.decode import decode_eval, decode_resized, decode_views, image_size
    from ssl_kit.data.formats import read_image

    path = tmp_path / "portrait.jpg"
    portrait_jpeg(path, turn)
    data = path.read_bytes()
    assert Image.open(path).size == ((320, 160) if turn != 3 else (160, 320))  # stored sideways (or upside down)
    assert image_size(data, "p") == ImageOps.exif_transpose(Image.open(path)).size == (160, 320)
    crops = {"eval (draft 1/8)": decode_eval(data, "p", 16, 3, 1.0),
             "resized (draft)": decode_resized(data, "p", 16),
             "resized (full)": decode_resized(data, "p", 160),
             "in-memory read_image": read_image(path, 16)}
    crops["views (draft)"] = decode_views(data, "p", [CropSpec(16, (1.0, 1.0), (0.5, 0.5))], 0, 0)[0]
    for name, crop in crops.items():  # (3, S, S): red on top, blue at the bottom, as displayed
        top, bottom = crop[:, : crop.shape[1] // 4].mean(axis=(1, 2)), crop[:, -crop.shape[1] // 4:].mean(axis=(1, 2))
        assert top[0] > 200 > top[2] + 150 and bottom[2] > 200 > bottom[0] + 150, (name, top, bottom)


# ------------------------------------------------------------------------------------------ bounded reads
def write_shard(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_file_list_row_naming_a_device_or_a_fifo_is_a_bad_image_not_a_hang(tmp_path):
    from ssl_kit.data.stream import check_index

    write_folder(tmp_path / "data", per_class=2)
    os.mkfifo(tmp_path / "data" / "pipe.png")  # no writer: an open() without O_NONBLOCK would block forever
    listing = tmp_path / "data" / "list.csv"
    listing.write_text("a/00.png\n/dev/zero\npipe.png\nb/00.png\n")
    index = build_index("filelist", str(listing))
    reads, bad = check_index(index, workers=0)
    assert reads == 4 and sorted(reason for _, reason in bad) == [
        "cannot read the file ('/dev/zero' is not a regular file (a device, FIFO or socket))",
        f"cannot read the file ({str(tmp_path / 'data' / 'pipe.png')!r} is not a regular file (a device, FIFO or "
        f"socket))"]
    os.mkfifo(tmp_path / "list.fifo")
    assert cli_main(["data", f"filelist:{tmp_path / 'list.fifo'}"]) == 2  # the list itself: refused, no hang


def test_oversized_labels_and_members_are_refused_naming_the_file_and_the_limit(tmp_path, monkeypatch):
    from ssl_kit.data.stream import check_index
    from ssl_kit.errors import DataError

    write_folder(tmp_path / "data", per_class=1)
    listing = tmp_path / "data" / "list.csv"
    listing.write_text("a/00.png,0\nb/00.png,1000000000\n")
    with pytest.raises(DataError, match=r"list.csv: label 1000000000 .* below 65,536; .*SSL_KIT_MAX_ARCH_INT"):
        build_index("filelist", str(listing))
    jpeg = (tmp_path / "data" / "a" / "00.png").read_bytes()
    write_shard(tmp_path / "big-label.tar", {"k0.png": jpeg, "k0.cls": b"1000000000"})
    with pytest.raises(DataError, match=r"big-label.tar.*member 'k0.cls': label 1000000000 .* below 65,536"):
        build_index("webdataset", str(tmp_path / "big-label.tar"))
    write_shard(tmp_path / "huge-cls.tar", {"k0.png": jpeg, "k0.cls": b"0" * 100_000})
    with pytest.raises(DataError, match=r"huge-cls.tar.*member 'k0.cls' is 100,000 bytes; .*at most 64 bytes"):
        build_index("webdataset", str(tmp_path / "huge-cls.tar"))
    # an image member over the size cap (here lowered: 8 bytes per pixel of 1000 pixels + 1 MiB) is left out unread
    write_shard(tmp_path / "big-member.tar", {"k0.png": jpeg, "k1.png": jpeg + b"\0" * (2 << 20)})
    monkeypatch.setenv("SSL_KIT_MAX_IMAGE_PIXELS", "1000")
    with pytest.warns(UserWarning, match=r"k1.png: 2,097,\d+ bytes exceed the image file size cap of 1,056,576"):
        index = build_index("webdataset", str(tmp_path / "big-member.tar"), use_cache=False)
    assert len(index) == 1
    (tmp_path / "data" / "a" / "big.png").write_bytes(jpeg + b"\0" * (2 << 20))  # a loose file over the cap
    reads, bad = check_index(build_index("imagefolder", str(tmp_path / "data"), use_cache=False), workers=0)
    assert reads == 3 and len(bad) == 1 and "exceed the image file size cap of 1,056,576" in bad[0][1]


def test_the_same_weights_pooled_otherwise_miss_the_feature_cache(tmp_path):
    """A ViT's [cls] and its mean patch token (backbone.kwargs.global_pool) come from the same weights: the feature
    cache key holds the pooling, so the second pooling is computed, not served the first's features."""
    write_folder(tmp_path / "data")
    spec = f"imagefolder:{tmp_path / 'data'},storage=stream"

    def vit_features(global_pool: bool) -> tuple[torch.Tensor, int]:
        torch.manual_seed(0)
        kwargs = {"patch_size": 4, "dim": 32, "depth": 1, "heads": 2, "global_pool": global_pool}
        backbone = build_backbone("vit_tiny", 3, 16, kwargs).eval()
        backbone.data_info = dict(INFO)
        ex = FeatureExtractor(backbone, "cpu", workers=0)
        return ex.dataset_features(spec)["test"][0].float().clone(), ex.forward_passes

    cls_features, passes = vit_features(False)
    assert passes == 20 and vit_features(False)[1] == 0  # cached
    mean_features, passes = vit_features(True)
    assert passes == 20 and not torch.allclose(cls_features, mean_features)
    assert vit_features(True)[1] == 0 and vit_features(False)[1] == 0  # both poolings cached side by side
